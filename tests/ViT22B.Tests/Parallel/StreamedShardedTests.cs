using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Block-streamed inference with tensor-parallel block shards gives the in-memory model's outputs on every
/// rank (float64, 1e-12), on model axes 2 and 4 and a 2 × 2 mesh, on both backends.</summary>
public class StreamedShardedTests
{
    [Theory]
    [OnEveryBackend(BlockKind.Parallel, 1, 2, true, false)]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, false, true)]
    [OnEveryBackend(BlockKind.Sequential, 1, 4, true, true)]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true, false)]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, true, false)]
    [OnEveryBackend(BlockKind.Sequential, 2, 2, true, true)]
    public void Streamed_shards_give_the_in_memory_outputs(Backend backend, BlockKind block, int data, int model, bool prefetch, bool shared)
    {
        var c = ShardedModelTests.Config(block) with { Depth = 3, InitValues = 0.5 };
        const long batch = 4;
        using var reference = new SeededWeights(c, seed: 21);
        // Shared: every rank's read of a tensor is a handle onto one computed copy (one reader per rank of the mesh).
        using var weights = shared ? new SeededWeights(c, seed: 21, readersPerTensor: data * model) : reference;
        using var images = TestUtil.RandomImages(c, batch, seed: 22);
        Tensor expected;
        using (var inMemory = new VisionTransformer(c, torch.CPU, ScalarType.Float64))
        using (torch.inference_mode())
        {
            StreamedVisionTransformer.Load(inMemory, reference, "");
            expected = inMemory.call(images);
        }
        using var expectedOwner = expected;
        var plan = new ShardingPlan(c, model, data);
        var results = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new StreamedShardedVisionTransformer(plan, ctx, weights, CommMode.Overlapped, ScalarType.Float64, prefetch);
            long per = batch / data;
            int d = ctx.Mesh.Coordinates(ctx.Rank).Data;
            using var mine = images.narrow(0, d * per, per);
            var output = shard.Forward(mine);
            Assert.Equal(c.Depth, shard.LastPass!.Blocks);
            return (Output: output, Data: d);
        });
        foreach (var (output, d) in results)
        {
            using var o = output;
            using var want = expected.narrow(0, d * (batch / data), batch / data);
            Assert.True(TestUtil.RelErr(o, want) <= 1e-12, $"relative error {TestUtil.RelErr(o, want):E2}");
        }
    }

    /// <summary>Reads through to another source; the first read of <paramref name="failing"/> throws.</summary>
    private sealed class FailingOnce(ITensorSource inner, string failing) : ITensorSource
    {
        private int _failed;
        public string Path => inner.Path;
        public IReadOnlyList<string> Names => inner.Names;
        public IReadOnlyDictionary<string, string> Metadata => inner.Metadata;
        public bool Contains(string name) => inner.Contains(name);
        public long[] ShapeOf(string name) => inner.ShapeOf(name);
        public Tensor Read(string name) => Check(name) ?? inner.Read(name);
        public Tensor ReadSlice(string name, int dim, IReadOnlyList<(long Start, long Length)> segments) => Check(name) ?? inner.ReadSlice(name, dim, segments);
        private Tensor? Check(string name) =>
            name == failing && Interlocked.Exchange(ref _failed, 1) == 0 ? throw new IOException($"injected: '{name}' could not be read") : null;
        public void Dispose() => inner.Dispose();
    }

    [Theory]
    [OnEveryBackend(true)]
    [OnEveryBackend(false)]
    public void A_rank_whose_block_cannot_be_read_mid_pass_aborts_and_never_issues_another_pass(Backend backend, bool prefetch)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 3 };
        using var images = TestUtil.RandomImages(c, 2, seed: 23);
        var plan = new ShardingPlan(c, 2);
        // Rank 1 cannot read block 1's weights once; rank 0 reads them fine and waits in block 1 for rank 1.
        var outcomes = Backends.Run(backend, new DeviceMesh(1, 2), ctx =>
        {
            using var seeded = new SeededWeights(c, seed: 24);
            using var weights = new FailingOnce(seeded, ctx.Rank == 1 ? "blocks.1.in_proj.weight" : "none");
            using var shard = new StreamedShardedVisionTransformer(plan, ctx, weights, CommMode.Overlapped, ScalarType.Float64, prefetch);
            if (ctx.Rank == 0) return Assert.Throws<CommunicatorException>(() => shard.Forward(images)).Message;
            var first = Assert.Throws<IOException>(() => shard.Forward(images));
            Assert.Contains("injected", first.Message, StringComparison.Ordinal);
            // The next pass must not issue collectives that rank 0's first pass would take for its own: it fails at once.
            var again = Assert.Throws<CommunicatorException>(() => shard.Forward(images));
            return again.Message;
        }, timeout: TimeSpan.FromSeconds(5));
        Assert.Contains("injected", outcomes[1], StringComparison.Ordinal);
    }

    [Theory]
    [OnEveryBackend]
    public void FSDP_plans_and_foreign_meshes_are_refused(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        using var weights = new SeededWeights(c, seed: 1);
        Backends.Run(backend, new DeviceMesh(2, 2), ctx =>
        {
            Assert.Contains("FSDP", Assert.Throws<ArgumentException>(() => new StreamedShardedVisionTransformer(new ShardingPlan(c, 2, 2, fsdp: true), ctx, weights)).Message);
            Assert.Contains("1×4 mesh", Assert.Throws<ArgumentException>(() => new StreamedShardedVisionTransformer(new ShardingPlan(c, 4), ctx, weights)).Message);
            return 0;
        });
    }
}
