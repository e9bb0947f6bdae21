using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Sharded models give the single-rank model's outputs and gradients (1e-5 relative in float32).</summary>
public class ShardedModelTests
{
    /// <summary>2 blocks, D = 32, 4 heads (so model axes 1, 2, 4 divide), F = 48, 17 tokens with the class token
    /// (uneven chunks for every k &gt; 1).</summary>
    internal static ViTConfig Config(BlockKind block, bool fused = true) => new()
    {
        ImgSize = 16, PatchSize = 4, EmbedDim = 32, Depth = 2, NumHeads = 4, MlpDim = 48, Block = block, ClassToken = true,
        GlobalPool = GlobalPool.Map, NumClasses = 5, FuseOutProj = fused, QkvBias = block == BlockKind.Sequential,
        NormBias = true, QkNorm = true,
    };

    private sealed record Reference(Tensor Output, Dictionary<string, Tensor> Grads, Dictionary<string, Tensor> State, Tensor Images, Tensor Probe);

    // loss = mean over the batch of ⟨output_b, probe⟩: the data axis averages per-rank means of equal halves.
    private static Tensor Loss(Tensor output, Tensor probe) => (output * probe).sum(new long[] { -1 }).mean();

    private static Reference Full(ViTConfig c, long batch)
    {
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(model, seed: 42, scale: 0.3);
        var images = TestUtil.RandomImages(c, batch, seed: 43, ScalarType.Float32);
        var probe = torch.randn(new long[] { batch, 5 }, generator: new torch.Generator(44));
        var output = model.call(images);
        Loss(output, probe).backward();
        return new Reference(output.detach(), model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()),
            model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone()), images, probe);
    }

    private static void AssertShardedMatches(ViTConfig c, int data, int model, CommMode mode, bool fsdp = false)
    {
        const long batch = 4;
        var reference = Full(c, batch);
        var mesh = new DeviceMesh(data, model);
        var world = new ThreadedWorld(mesh.WorldSize, TimeSpan.FromSeconds(60));
        var contexts = RankContext.CreateThreaded(world, mesh);
        var plan = new ShardingPlan(c, model, data, fsdp);
        var results = Spmd.Run(world, r =>
        {
            var s = new ShardContext(plan, contexts[r], mode);
            using var shard = ShardedModel.Create(s, ScalarType.Float32);
            ShardedModel.LoadFull(shard, s, reference.State);
            using var scope = torch.NewDisposeScope();
            long per = batch / data;
            var images = reference.Images.narrow(0, s.DataIndex * per, per);
            var output = shard.call(images);
            Loss(output, reference.Probe.narrow(0, s.DataIndex * per, per)).backward();
            ShardedModel.SynchronizeGradients(shard, s);
            var grads = shard.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone().DetachFromDisposeScope());
            return (Output: output.detach().DetachFromDisposeScope(), Grads: grads, s.ModelIndex, s.DataIndex);
        });
        // The gradient of the k-norm bias is exactly zero in exact arithmetic (softmax is invariant to adding q·b to
        // every logit of a row), so both sides hold rounding noise: errors are measured against the larger of the
        // tensor's own scale and 1% of the largest gradient of the model.
        double globalScale = reference.Grads.Values.Max(g => g.abs().max().item<float>());
        var failures = new List<string>();
        foreach (var res in results)
        {
            long per = batch / data;
            double outErr = TestUtil.RelErr(res.Output, reference.Output.narrow(0, res.DataIndex * per, per));
            Assert.True(outErr < 1e-5, $"rank ({res.DataIndex}, {res.ModelIndex}) output relative error {outErr:E2}");
            Assert.Equal(reference.Grads.Keys.OrderBy(k => k), res.Grads.Keys.OrderBy(k => k));
            foreach (var (key, g) in res.Grads)
            {
                var expected = ShardingPlan.Slice(reference.Grads[key], plan.Spec(key, reference.Grads[key].shape, res.ModelIndex, res.DataIndex));
                double scale = Math.Max(expected.abs().max().item<float>(), 0.01 * globalScale);
                double err = TestUtil.MaxAbs(g, expected) / scale;
                if (!(err < 1e-5)) failures.Add($"rank ({res.DataIndex}, {res.ModelIndex}) gradient of {key}: relative error {err:E2}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    [Theory]
    [InlineData(1, CommMode.Overlapped)]
    [InlineData(2, CommMode.Overlapped)]
    [InlineData(4, CommMode.Overlapped)]
    [InlineData(2, CommMode.Plain)]
    [InlineData(4, CommMode.Plain)]
    public void Parallel_block_model_matches_single_rank(int model, CommMode mode) =>
        AssertShardedMatches(Config(BlockKind.Parallel), 1, model, mode);

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void Unfused_parallel_block_model_matches_single_rank(int model) =>
        AssertShardedMatches(Config(BlockKind.Parallel, fused: false), 1, model, CommMode.Overlapped);

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void Sequential_block_model_matches_single_rank(int model) =>
        AssertShardedMatches(Config(BlockKind.Sequential), 1, model, CommMode.Overlapped);

    [Theory]
    [InlineData(BlockKind.Parallel, false)]
    [InlineData(BlockKind.Parallel, true)]
    [InlineData(BlockKind.Sequential, true)]
    public void Two_by_two_data_model_mesh_matches_single_rank(BlockKind block, bool fsdp) =>
        AssertShardedMatches(Config(block), 2, 2, CommMode.Overlapped, fsdp);

    [Fact]
    public void Plans_that_cannot_work_are_rejected()
    {
        var c = Config(BlockKind.Parallel);
        Assert.Contains("Cannot shard 4 heads over a model axis of 3", Assert.Throws<ArgumentException>(() => new ShardingPlan(c, 3)).Message);
        Assert.Contains("Cannot shard mlp_dim 50 over a model axis of 4", Assert.Throws<ArgumentException>(() => new ShardingPlan(c with { MlpDim = 50 }, 4)).Message);
        var mesh = new DeviceMesh(1, 2);
        var world = new ThreadedWorld(2);
        var ctx = RankContext.CreateThreaded(world, mesh);
        var e = Assert.Throws<ArgumentException>(() => ShardedModel.Create(new ShardContext(new ShardingPlan(c, 4), ctx[0], CommMode.Overlapped)));
        Assert.Contains("plan is for a 1×4 mesh but the rank belongs to a 1×2 mesh", e.Message);
    }

    [Fact]
    public void Shard_and_unshard_round_trip_a_full_state_dict()
    {
        var c = Config(BlockKind.Parallel);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(model, seed: 5);
        var full = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        var plan = new ShardingPlan(c, 4, 2, fsdp: true);
        var shards = Enumerable.Range(0, 8).Select(r => (IReadOnlyDictionary<string, Tensor>)plan.Shard(full, r % 4, r / 4)).ToList();
        // in_proj rows per model rank: F/4 + 3·D/4 = 12 + 24 = 36, split over 2 data ranks (FSDP) = 18.
        Assert.Equal(new long[] { 18, 32 }, shards[0]["blocks.0.in_proj.weight"].shape);
        var back = plan.Unshard(shards);
        Assert.Equal(full.Keys.OrderBy(k => k), back.Keys.OrderBy(k => k));
        foreach (var (k, v) in full) Assert.True(back[k].equal(v).all().item<bool>(), k);
    }

    [Fact]
    public void Ranks_allocate_only_their_shards()
    {
        var c = Config(BlockKind.Parallel) with { Depth = 4 };
        long fullBytes = ModelAccounting.ParameterBytes(c, ScalarType.Float32);
        var mesh = new DeviceMesh(1, 4);
        var world = new ThreadedWorld(4);
        var ctx = RankContext.CreateThreaded(world, mesh);
        var plan = new ShardingPlan(c, 4);
        var bytes = Spmd.Run(world, r =>
        {
            using var shard = ShardedModel.Create(new ShardContext(plan, ctx[r], CommMode.Overlapped));
            return ShardedModel.ParameterBytes(shard);
        });
        var p = ModelAccounting.Parameters(c);
        long replicated = (p.Total - p.BlockMatmulWeights - c.Depth * c.MlpDim) * 4;   // everything but the sharded weights and MLP biases
        foreach (long b in bytes) Assert.Equal(replicated + (fullBytes - replicated) / 4, b);
    }
}
