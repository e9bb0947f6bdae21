using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using ViT22B.Parallel;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.GpuTests;

/// <summary>
/// NCCL on real GPUs. The machines this project gets have one GPU, so the multi-rank test runs two processes on it
/// (NCCL ≥ 2.30 with <c>NCCL_MULTI_RANK_GPU_ENABLE=1</c>; older NCCL refuses two ranks on one GPU and the test says so);
/// the in-process test runs one rank per visible GPU.
/// </summary>
public sealed class NcclTests
{
    private const string WorkerOut = "VIT22B_NCCL_WORKER_OUT";

    [NcclFact]
    public void One_rank_raw_collectives_on_device_zero()
    {
        var comms = NcclComm.InitLocal(Nccl.Native, new[] { 0 }, CudaDriver.MakeCurrent, DateTime.UtcNow + TimeSpan.FromSeconds(60));
        using var comm = comms[0];
        Assert.True(Nccl.Version() >= Nccl.MinimumVersion, $"NCCL {Nccl.Version()} is older than 2.14");
        using var x = ScalarMath.Arange(12, ScalarType.BFloat16, torch.CUDA);
        using var y = torch.zeros_like(x);
        torch.cuda.synchronize();
        nint stream = CudaStreams.FromPool(0);
        NcclBuffer Buffer(Tensor t) => new(TensorPointers.DataPointer(t), (nuint)t.numel(), NcclDataType.BFloat16);
        comm.AllReduce(Buffer(x), Buffer(y), NcclRedOp.Sum, stream, DateTime.UtcNow + TimeSpan.FromSeconds(60));
        comm.AllGather(Buffer(x), Buffer(y), stream, DateTime.UtcNow + TimeSpan.FromSeconds(60));
        using (var done = new CudaEvent(0))
        {
            done.Record(stream);
            done.Synchronize();
        }
        Assert.True(y.equal(x).all().item<bool>());
        Assert.Equal(NcclResult.Success, comm.AsyncError());
    }

    [NcclFact]
    public void One_rank_per_visible_gpu_in_one_process_runs_every_collective()
    {
        int n = (int)torch.cuda.device_count();
        var comms = NcclCommunicator.CreateLocal(Enumerable.Range(0, n).ToArray(), TimeSpan.FromSeconds(60));
        Spmd.Run(n, r =>
        {
            using var comm = comms[r];
            CheckCollectives(comm, torch.device($"cuda:{r}"));
            return 0;
        });
    }

    [NcclFact]
    public void Two_processes_sharing_the_first_gpu_run_every_collective()
    {
        int version = Nccl.Version();
        // Both processes see only the first GPU (CUDA_VISIBLE_DEVICES=0), however many the machine has.
        if (version < 23000)
            Assert.Skip($"NCCL {version}: two ranks on one GPU need NCCL ≥ 2.30 with {NcclCommunicator.MultiRankGpuVariable}=1.");
        var dir = Directory.CreateTempSubdirectory("vit22b-nccl-").FullName;
        string dll = typeof(NcclTests).Assembly.Location, apphost = Path.ChangeExtension(dll, null);
        var (file, args) = File.Exists(apphost) ? (apphost, new List<string>()) : ("dotnet", new List<string> { dll });
        args.AddRange(new[] { "-method", $"{typeof(NcclTests).FullName}.{nameof(Collectives_worker)}" });
        var results = LocalLauncher.Run(file, args, 2, TimeSpan.FromSeconds(70),   // within run.sh's 135 s for all GPU tests, so a hang reports
            new Dictionary<string, string> { [NcclCommunicator.MultiRankGpuVariable] = "1", [WorkerOut] = dir, ["CUDA_VISIBLE_DEVICES"] = "0" });
        foreach (var r in results)
        {
            Assert.True(r.ExitCode == 0, $"rank {r.Rank} exited with {r.ExitCode}:\n{r.Output}");
            var marker = Path.Combine(dir, $"rank-{r.Rank}.txt");
            Assert.True(File.Exists(marker), $"rank {r.Rank} did not run its checks:\n{r.Output}");
        }
    }

    /// <summary>One rank of <see cref="Two_processes_sharing_the_first_gpu_run_every_collective"/> (skipped
    /// elsewhere).</summary>
    [Fact]
    public void Collectives_worker()
    {
        var outDir = Environment.GetEnvironmentVariable(WorkerOut);
        if (string.IsNullOrEmpty(outDir))
            Assert.Skip($"A worker of {nameof(Two_processes_sharing_the_first_gpu_run_every_collective)}: it runs only in the processes that test starts.");
        var env = LaunchEnvironment.FromEnvironment();
        var ctx = NcclCommunicator.CreateRankContext(env, data: 1, model: env.WorldSize, TimeSpan.FromSeconds(40));
        using var model = (NcclCommunicator)ctx.Model;
        using var data = (NcclCommunicator)ctx.Data;
        CheckCollectives(model, ctx.Device);
        File.WriteAllText(Path.Combine(outDir, $"rank-{env.Rank}.txt"), "ok");
    }

    // Every collective against its definition, with uneven chunks; inputs are small integers, exact in float32.
    private static void CheckCollectives(ICommunicator comm, Device dev)
    {
        int k = comm.Size, r = comm.Rank, prev = (r + k - 1) % k;
        using var scope = torch.NewDisposeScope();
        Tensor Input(int rank) => ScalarMath.Arange((rank + 2) * 4, ScalarType.Float32, torch.CPU).Plus(rank * 8.0).reshape(rank + 2, 4);
        var x = Input(r).to(dev);
        var counts = Enumerable.Range(0, k).Select(j => (long)(j + 2)).ToArray();
        var all = torch.cat(Enumerable.Range(0, k).Select(Input).ToArray(), 0);
        var sum2 = Enumerable.Range(0, k).Select(j => Input(j).narrow(0, 0, 2)).Aggregate((a, b) => a.Plus(b));
        void Same(Tensor actual, Tensor expected, string what)
        {
            if (!actual.cpu().equal(expected).all().item<bool>()) throw new InvalidOperationException($"rank {r}: {what} differs from its definition.");
        }
        Same(comm.AllGather(x, counts), all, "all-gather (known counts)");
        Same(comm.AllGather(x), all, "all-gather (exchanged counts)");
        Same(comm.Permute(x, 1, receiveRows: prev + 2), Input(prev), "permute");
        Same(comm.Permute(x, 1), Input(prev), "permute (exchanged size)");
        Same(comm.AllReduce(x.narrow(0, 0, 2)), sum2, "all-reduce");
        var stacked = torch.cat(Enumerable.Repeat(x.narrow(0, 0, 2), k).ToArray(), 0);
        Same(comm.ReduceScatter(stacked, Enumerable.Repeat(2L, k).ToArray()), sum2, "reduce-scatter");
        Same(comm.Broadcast(r == 0 ? x.narrow(0, 0, 2) : torch.zeros(2, 4, device: dev), 0), Input(0).narrow(0, 0, 2), "broadcast");
        // The overlapped ring on this rank's chunk equals the plain all-gather + matmul.
        var w = ScalarMath.Arange(12, ScalarType.Float32, torch.CPU).reshape(3, 4).to(dev);
        var ring = Rings.AllGatherMatmul(x, w, comm, counts, CommMode.Overlapped).Y;
        Same(ring, all.matmul(w.cpu().t()), "all-gather + matmul ring");
        comm.Barrier();
    }
}
