using TorchSharp;
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
