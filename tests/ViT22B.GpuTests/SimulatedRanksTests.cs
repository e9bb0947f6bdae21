using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using ViT22B.Tests;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.GpuTests;

/// <summary>Ranks that are threads of this process, sharing one GPU through the in-process communicator.</summary>
public sealed class SimulatedRanksTests
{
    // 2 blocks, D = 32, 4 heads, 17 tokens with the class token: uneven token chunks over 2 ranks.
    private static ViTConfig Config() => new()
    {
        ImgSize = 16, PatchSize = 4, EmbedDim = 32, Depth = 2, NumHeads = 4, MlpDim = 48, Block = BlockKind.Parallel, ClassToken = true,
        GlobalPool = GlobalPool.Map, NumClasses = 5, QkvBias = false, NormBias = true, QkNorm = true,
    };

    [CudaFact]
    public void Two_ranks_sharing_one_gpu_match_the_single_device_model()
    {
        var c = Config();
        var gpu = torch.device("cuda:0");
        using var model = new VisionTransformer(c, gpu, ScalarType.Float32);
        TestUtil.Randomize(model, seed: 42, scale: 0.3);
        using var images = TestUtil.RandomImages(c, 2, seed: 43, ScalarType.Float32).to(gpu);
        using var expected = model.call(images).cpu();
        var state = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        // The copies above were queued on this thread's stream; the ranks read them on their own pool streams
        // (review defect 10: nothing ordered the two).
        torch.cuda.synchronize();

        var mesh = new DeviceMesh(1, 2, new[] { gpu });        // both ranks on the same GPU, threads of this process
        var world = new ThreadedWorld(mesh.WorldSize, TimeSpan.FromSeconds(60));
        var contexts = RankContext.CreateThreaded(world, mesh);
        var plan = new ShardingPlan(c, 2, 1);
        var outputs = Spmd.Run(world, r =>
        {
            using var device = contexts[r].UseDevice();          // each rank computes on its own pool stream
            using var shard = new ShardedVisionTransformer(plan, contexts[r], CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(state);
            using var noGrad = torch.no_grad();
            return shard.Forward(images).cpu().DetachFromDisposeScope();
        });
        // The sharded blocks sum their partial products in another order than one GEMM: float32 rounding only.
        foreach (var o in outputs) Assert.True(TestUtil.RelErr(o, expected) < 1e-4, $"relative error {TestUtil.RelErr(o, expected):E2}");
    }

    [CudaFact]
    public void Two_ranks_sharing_one_gpu_stream_their_block_shards_with_prefetch()
    {
        // Each rank computes on its own pool stream; its prefetched block shards are staged in host memory and moved to
        // the GPU on that stream (BlockStreaming), never copied on the prefetch thread's stream.
        var c = Config() with { Depth = 4 };
        var gpu = torch.device("cuda:0");
        using var weights = new SeededWeights(c, seed: 44);
        using var model = new VisionTransformer(c, gpu, ScalarType.Float32);
        StreamedVisionTransformer.Load(model, weights, "");
        using var images = TestUtil.RandomImages(c, 2, seed: 45, ScalarType.Float32).to(gpu);
        Tensor expected;
        using (torch.inference_mode()) expected = model.call(images).cpu();
        using var expectedOwner = expected;
        torch.cuda.synchronize();

        var mesh = new DeviceMesh(1, 2, new[] { gpu });
        var world = new ThreadedWorld(mesh.WorldSize, TimeSpan.FromSeconds(60));
        var contexts = RankContext.CreateThreaded(world, mesh);
        var plan = new ShardingPlan(c, 2, 1);
        var outputs = Spmd.Run(world, r =>
        {
            using var device = contexts[r].UseDevice();
            using var shard = new StreamedShardedVisionTransformer(plan, contexts[r], weights, CommMode.Overlapped, ScalarType.Float32, prefetch: true);
            Tensor last = null!;
            for (int pass = 0; pass < 3; pass++)
            {
                last?.Dispose();
                using var output = shard.Forward(images);
                last = output.cpu().DetachFromDisposeScope();
            }
            return last;
        });
        foreach (var o in outputs) Assert.True(TestUtil.RelErr(o, expected) < 1e-4, $"relative error {TestUtil.RelErr(o, expected):E2}");
    }

    [CudaFact]
    public void Collectives_between_ranks_sharing_one_gpu_match_their_definitions()
    {
        // Copies run on each receiver's communication stream, ordered by events against the ranks' own compute
        // streams; a missing wait shows up as stale or partial values, so the inputs are written just before.
        const int k = 3;
        var gpu = torch.device("cuda:0");
        var mesh = new DeviceMesh(1, k, new[] { gpu });
        var world = new ThreadedWorld(k, TimeSpan.FromSeconds(60));
        var contexts = RankContext.CreateThreaded(world, mesh);
        static Tensor Input(int rank) => ScalarMath.Arange((rank + 2) * 4, ScalarType.Float64, torch.CPU).Plus(rank * 1000.0).reshape(rank + 2, 4);
        var results = Spmd.Run(world, r =>
        {
            using var device = contexts[r].UseDevice();
            var comm = contexts[r].Model;
            using var scope = torch.NewDisposeScope();
            var x = Input(r).to(gpu).Times(1.0);                  // produced on this rank's stream just before use
            var big = torch.randn(new long[] { 1024, 1024 }, dtype: ScalarType.Float64, device: gpu);
            var busy = big.matmul(big);                           // keeps the compute stream busy while copies are queued
            var gathered = comm.AllGather(x);
            var permuted = comm.Permute(x, 1, receiveRows: (r + k - 1) % k + 2);
            var summed = comm.AllReduce(x.narrow(0, 0, 2));
            var scattered = comm.ReduceScatter(torch.cat(new[] { x.narrow(0, 0, 2), x.narrow(0, 0, 2) }, 0), new long[] { 1, 1, 2 });
            busy.sum().item<double>();
            return (gathered.cpu().DetachFromDisposeScope(), permuted.cpu().DetachFromDisposeScope(), summed.cpu().DetachFromDisposeScope(), scattered.cpu().DetachFromDisposeScope());
        });
        var all = torch.cat(Enumerable.Range(0, k).Select(Input).ToArray(), 0);
        var sum2 = Enumerable.Range(0, k).Select(j => Input(j).narrow(0, 0, 2)).Aggregate((a, b) => a.Plus(b));
        var doubled = torch.cat(new[] { sum2, sum2 }, 0);
        long[] starts = { 0, 1, 2 }, counts = { 1, 1, 2 };
        for (int r = 0; r < k; r++)
        {
            var (g, p, s, rs) = results[r];
            Assert.True(g.equal(all).all().item<bool>(), $"rank {r} all-gather");
            Assert.True(p.equal(Input((r + k - 1) % k)).all().item<bool>(), $"rank {r} permute");
            Assert.True(s.equal(sum2).all().item<bool>(), $"rank {r} all-reduce");
            Assert.True(rs.equal(doubled.narrow(0, starts[r], counts[r])).all().item<bool>(), $"rank {r} reduce-scatter");
        }
    }
}
