using TorchSharp;
using ViT22B.Models;
using ViT22B.Parallel;
using ViT22B.Tests.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Cuda;

public sealed class SimulatedRanksTests
{
    [CudaFact]
    public void Two_ranks_sharing_one_gpu_match_the_single_device_model()
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        var gpu = torch.device("cuda:0");
        using var model = new VisionTransformer(c, gpu, ScalarType.Float32);
        TestUtil.Randomize(model, seed: 42, scale: 0.3);
        using var images = TestUtil.RandomImages(c, 2, seed: 43, ScalarType.Float32).to(gpu);
        using var expected = model.call(images).cpu();
        var state = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());

        var mesh = new DeviceMesh(1, 2, new[] { gpu });        // both ranks on the same GPU, threads of this process
        var world = new ThreadedWorld(mesh.WorldSize, TimeSpan.FromSeconds(60));
        var contexts = RankContext.CreateThreaded(world, mesh);
        var plan = new ShardingPlan(c, 2, 1);
        var outputs = Spmd.Run(world, r =>
        {
            var s = new ShardContext(plan, contexts[r], CommMode.Overlapped);
            using var shard = ShardedModel.Create(s, ScalarType.Float32);
            ShardedModel.LoadFull(shard, s, state);
            using var noGrad = torch.no_grad();
            return shard.call(images).cpu().DetachFromDisposeScope();
        });
        // The sharded blocks sum their partial products in another order than one GEMM: float32 rounding only.
        foreach (var o in outputs) Assert.True(TestUtil.RelErr(o, expected) < 1e-4, $"relative error {TestUtil.RelErr(o, expected):E2}");
    }
}
