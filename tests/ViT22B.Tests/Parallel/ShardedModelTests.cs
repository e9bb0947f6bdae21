using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Sharded models give the single-rank model's outputs and gradients (1e-5 relative in float32), on the
/// in-process backend and on the NCCL communicator over the NCCL stand-in.</summary>
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

    private static void AssertShardedMatches(Backend backend, ViTConfig c, int data, int model, CommMode mode, bool fsdp = false, Func<int, TimeSpan>? delay = null)
    {
        const long batch = 4;
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries, Full's among them (the rank threads open their own)
        var reference = Full(c, batch);
        var mesh = new DeviceMesh(data, model);
        var plan = new ShardingPlan(c, model, data, fsdp);
        var results = Backends.Run(backend, mesh, ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, mode, ScalarType.Float32);
            shard.LoadFull(reference.State);
            using var scope = torch.NewDisposeScope();
            long per = batch / data;
            var images = reference.Images.narrow(0, shard.DataIndex * per, per);
            var output = shard.Forward(images);
            Loss(output, reference.Probe.narrow(0, shard.DataIndex * per, per)).backward();
            shard.SynchronizeGradients();
            var grads = shard.Module.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone().DetachFromDisposeScope());
            return (Output: output.detach().DetachFromDisposeScope(), Grads: grads, shard.ModelIndex, shard.DataIndex);
        }, delay: delay);
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
    [OnEveryBackend(1, CommMode.Overlapped)]
    [OnEveryBackend(2, CommMode.Overlapped)]
    [OnEveryBackend(4, CommMode.Overlapped)]
    [OnEveryBackend(2, CommMode.Plain)]
    [OnEveryBackend(4, CommMode.Plain)]
    public void Parallel_block_model_matches_single_rank(Backend backend, int model, CommMode mode) =>
        AssertShardedMatches(backend, Config(BlockKind.Parallel), 1, model, mode);

    [Theory]
    [OnEveryBackend(BlockKind.Parallel, 2)]
    [OnEveryBackend(BlockKind.Parallel, 4)]
    [OnEveryBackend(BlockKind.Sequential, 4)]
    public void Single_block_matches_single_rank(Backend backend, BlockKind block, int model) =>
        AssertShardedMatches(backend, Config(block) with { Depth = 1 }, 1, model, CommMode.Overlapped);

    [Theory]
    [OnEveryBackend(BlockKind.Parallel)]
    [OnEveryBackend(BlockKind.Sequential)]
    public void LayerScale_quick_gelu_and_register_models_match_single_rank(Backend backend, BlockKind block) =>
        AssertShardedMatches(backend, Config(block) with { InitValues = 0.3, Act = Activation.QuickGelu, RegTokens = 2 }, 2, 2, CommMode.Overlapped, fsdp: true);

    [Theory]
    [OnEveryBackend]
    public void Random_communication_delays_change_no_result(Backend backend)
    {
        var rng = new Random(17);
        AssertShardedMatches(backend, Config(BlockKind.Parallel), 2, 2, CommMode.Overlapped, fsdp: true,
            delay: _ => { lock (rng) return TimeSpan.FromMilliseconds(rng.Next(0, 4)); });
    }

    [Theory]
    [OnEveryBackend(2)]
    [OnEveryBackend(4)]
    public void Unfused_parallel_block_model_matches_single_rank(Backend backend, int model) =>
        AssertShardedMatches(backend, Config(BlockKind.Parallel, fused: false), 1, model, CommMode.Overlapped);

    [Theory]
    [OnEveryBackend(1)]
    [OnEveryBackend(2)]
    [OnEveryBackend(4)]
    public void Sequential_block_model_matches_single_rank(Backend backend, int model) =>
        AssertShardedMatches(backend, Config(BlockKind.Sequential), 1, model, CommMode.Overlapped);

    [Theory]
    [OnEveryBackend(BlockKind.Parallel, false)]
    [OnEveryBackend(BlockKind.Parallel, true)]
    [OnEveryBackend(BlockKind.Sequential, true)]
    public void Two_by_two_data_model_mesh_matches_single_rank(Backend backend, BlockKind block, bool fsdp) =>
        AssertShardedMatches(backend, Config(block), 2, 2, CommMode.Overlapped, fsdp);

    [Theory]
    [OnEveryBackend]
    public void Plans_that_cannot_work_are_rejected(Backend backend)
    {
        var c = Config(BlockKind.Parallel);
        Assert.Contains("Cannot shard 4 heads over a model axis of 3", Assert.Throws<ArgumentException>(() => new ShardingPlan(c, 3)).Message);
        Assert.Contains("Cannot shard mlp_dim 50 over a model axis of 4", Assert.Throws<ArgumentException>(() => new ShardingPlan(c with { MlpDim = 50 }, 4)).Message);
        var messages = Backends.Run(backend, new DeviceMesh(1, 2), ctx =>
            Assert.Throws<ArgumentException>(() => new ShardedVisionTransformer(new ShardingPlan(c, 4), ctx)).Message);
        Assert.All(messages, m => Assert.Contains("plan is for a 1×4 mesh but the rank belongs to a 1×2 mesh", m));
    }

    [Fact]
    public void Shard_and_unshard_round_trip_a_full_state_dict()
    {
        var c = Config(BlockKind.Parallel);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(model, seed: 5);
        using var scope = torch.NewDisposeScope();
        var full = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        var plan = new ShardingPlan(c, 4, 2, fsdp: true);
        var shards = Enumerable.Range(0, 8).Select(r => (IReadOnlyDictionary<string, Tensor>)plan.Shard(full, r % 4, r / 4)).ToList();
        // in_proj rows per model rank: F/4 + 3·D/4 = 12 + 24 = 36, split over 2 data ranks (FSDP) = 18.
        Assert.Equal(new long[] { 18, 32 }, shards[0]["blocks.0.in_proj.weight"].shape);
        var back = plan.Unshard(shards);
        Assert.Equal(full.Keys.OrderBy(k => k), back.Keys.OrderBy(k => k));
        foreach (var (k, v) in full) Assert.True(back[k].equal(v).all().item<bool>(), k);
    }

    [Theory]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true, true)]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, false, true)]
    [OnEveryBackend(BlockKind.Sequential, 1, 4, false, true)]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true, false)]
    [OnEveryBackend(BlockKind.Parallel, 1, 2, false, true)]
    public void Unshard_over_the_mesh_gives_back_the_full_state_dict_on_every_rank(Backend backend, BlockKind block, int data, int model, bool fsdp, bool fused)
    {
        var c = Config(block, fused);
        using var full = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(full, seed: 21);
        using var scope = torch.NewDisposeScope();
        var expected = full.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var plan = new ShardingPlan(c, model, data, fsdp);
        var results = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx);
            shard.LoadFull(expected);
            return shard.Unshard();
        });
        foreach (var got in results)
        {
            Assert.Equal(expected.Keys.OrderBy(k => k), got.Keys.OrderBy(k => k));
            foreach (var (key, value) in expected)
                Assert.True(got[key].equal(value).all().item<bool>(), $"{key}: [{string.Join(", ", got[key].shape)}] differs from the full parameter");
        }
    }

    [Theory]
    [OnEveryBackend]
    public void Disposing_a_shard_disposes_its_rank_context_and_nothing_reaches_the_communicator_afterwards(Backend backend)
    {
        var c = Config(BlockKind.Parallel);
        var plan = new ShardingPlan(c, 2);
        using var images = TestUtil.RandomImages(c, 1, seed: 3, ScalarType.Float32);
        Backends.Run(backend, new DeviceMesh(1, 2), ctx =>
        {
            var shard = new ShardedVisionTransformer(plan, ctx);
            shard.Dispose();
            shard.Dispose();                                                    // a second dispose does nothing
            Assert.Throws<ObjectDisposedException>(() => shard.Forward(images));
            Assert.Throws<ObjectDisposedException>(() => shard.Save("unused"));
            using var one = torch.ones(1);
            Assert.Throws<ObjectDisposedException>(() => ctx.Model.AllReduce(one));
            return 0;
        });
    }

    [Theory]
    [OnEveryBackend]
    public void Ranks_allocate_only_their_shards(Backend backend)
    {
        var c = Config(BlockKind.Parallel) with { Depth = 4 };
        long fullBytes = ModelAccounting.ParameterBytes(c, ScalarType.Float32);
        var plan = new ShardingPlan(c, 4);
        var bytes = Backends.Run(backend, new DeviceMesh(1, 4), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx);
            return shard.ParameterBytes;
        });
        var p = ModelAccounting.Parameters(c);
        long replicated = (p.Total - p.BlockMatmulWeights - c.Depth * c.MlpDim) * 4;   // everything but the sharded weights and MLP biases
        foreach (long b in bytes) Assert.Equal(replicated + (fullBytes - replicated) / 4, b);
    }

    [Theory]
    [OnEveryBackend]
    public void A_peer_failing_during_backward_is_an_exception_on_the_other_ranks_not_a_crash(Backend backend)
    {
        // libtorch calls the ring functions' backward from native code, where an escaping .NET exception would end
        // the test host; the failure must come back from ShardedVisionTransformer.Backward instead. The in-process world tells the
        // peers at once; NCCL does not, so there the peer's collective fails at its (short) timeout and aborts.
        var c = Config(BlockKind.Parallel);
        var plan = new ShardingPlan(c, 2, 1);
        using var images = TestUtil.RandomImages(c, 2, seed: 43, ScalarType.Float32);
        var models = new ICommunicator[2];
        var e = Assert.Throws<AggregateException>(() => Backends.Run(backend, new DeviceMesh(1, 2), ctx =>
        {
            models[ctx.Rank] = ctx.Model;
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            using var scope = torch.NewDisposeScope();
            var loss = shard.Forward(images).Squared().sum();
            if (ctx.Rank == 1) throw new InvalidOperationException("rank 1 gives up before backward");
            shard.Backward(loss);
            return 0;
        }, timeout: TimeSpan.FromSeconds(backend == Backend.Threaded ? 30 : 3)));
        var failures = e.InnerExceptions.Cast<RankFailedException>().ToDictionary(f => f.Rank, f => f.InnerException!);
        Assert.IsType<InvalidOperationException>(failures[1]);
        var rank0 = Assert.IsType<CommunicatorException>(failures[0]);
        Assert.Contains(backend == Backend.Threaded ? "rank 1 gives up before backward" : "did not finish within 3 s", rank0.Message);
        Assert.False(BackwardFailures.HasFailed(models[0]));    // thrown once, then forgotten
    }
}

public sealed class ShardedCheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-ckpt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static T[] OnMesh<T>(int data, int model, ShardingPlan plan, Func<ShardedVisionTransformer, T> body, Backend backend) =>
        Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx);
            return body(shard);
        });

    /// <summary>On every rank: build a shard, save it to (or load it from) the checkpoint folder, run a forward.</summary>
    private Tensor[] SaveOrLoadThenForward(int data, int model, ShardingPlan plan, bool save, Tensor images, Backend backend) =>
        OnMesh(data, model, plan, shard =>
        {
            if (save) shard.Save(_dir);
            else shard.Load(_dir);
            using var scope = torch.NewDisposeScope();
            using var noGrad = torch.no_grad();
            return shard.Forward(images).DetachFromDisposeScope();
        }, backend);

    [Theory]
    [OnEveryBackend]
    public void Save_at_model_axis_4_load_at_2_and_at_1_gives_equal_outputs(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        using var scope = torch.NewDisposeScope();
        var images = TestUtil.RandomImages(c, 2, seed: 9, ScalarType.Float32);
        torch.manual_seed(11);
        var at4 = SaveOrLoadThenForward(1, 4, new ShardingPlan(c, 4), save: true, images, backend);     // random init, sharded from the start
        Assert.True(File.Exists(Path.Combine(_dir, ShardedCheckpoint.IndexFileName)));
        Assert.Equal(4, Directory.GetFiles(_dir, "rank-*.safetensors").Length);

        var at2 = SaveOrLoadThenForward(1, 2, new ShardingPlan(c, 2), save: false, images, backend);
        using var single = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        var report = single.load_state_dict(ShardedCheckpoint.LoadFull(_dir));
        using var noGrad = torch.no_grad();
        var at1 = single.call(images);
        foreach (var y in at4.Concat(at2))
            Assert.True(TestUtil.RelErr(y, at1) < 1e-5, $"relative error {TestUtil.RelErr(y, at1):E2}");
        Assert.True(at4[0].equal(at4[3]).all().item<bool>(), "replicated outputs are identical on every rank");
    }

    [Theory]
    [OnEveryBackend]
    public void Fsdp_checkpoint_reshards_to_a_plain_mesh(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Sequential);
        var images = TestUtil.RandomImages(c, 2, seed: 12, ScalarType.Float32);
        var before = SaveOrLoadThenForward(2, 2, new ShardingPlan(c, 2, 2, fsdp: true), save: true, images, backend);
        var after = SaveOrLoadThenForward(1, 4, new ShardingPlan(c, 4), save: false, images, backend);
        Assert.True(TestUtil.RelErr(after[0], before[0]) < 1e-5);
    }

    [Theory]
    [OnEveryBackend]
    public void Incomplete_or_foreign_checkpoints_are_rejected(Backend backend)
    {
        var e = Assert.Throws<FileNotFoundException>(() => ShardedCheckpoint.LoadFull(_dir));
        Assert.Contains("has no index.json", e.Message);
        File.WriteAllText(Path.Combine(_dir, ShardedCheckpoint.IndexFileName), "{\"format\": \"other\"}");
        Assert.Contains("not a valid sharded-checkpoint index", Assert.Throws<FormatException>(() => ShardedCheckpoint.LoadFull(_dir)).Message);
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        OnMesh(1, 2, new ShardingPlan(c, 2), shard =>
        {
            ShardedCheckpoint.Save(shard, _dir);
            return 0;
        }, backend);
        File.Delete(Directory.GetFiles(_dir, "rank-00001-*").Single());
        Assert.Contains("which is missing", Assert.Throws<FileNotFoundException>(() => ShardedCheckpoint.LoadFull(_dir)).Message);
    }
}
