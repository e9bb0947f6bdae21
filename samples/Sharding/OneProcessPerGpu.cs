using ViT22B.Cuda;
using ViT22B.Parallel;

/// <summary>This process is one rank of a multi-process run, one per GPU, communicating through NCCL. The processes
/// find each other through the torchrun variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), set by
/// <c>launch</c>, torchrun or a cluster scheduler.</summary>
internal static class OneProcessPerGpu
{
    public static int Run(MeshArgs a)
    {
        if (Environment.GetEnvironmentVariable("WORLD_SIZE") is null)
            throw new ArgumentException("`nccl` runs one rank per process: start the processes with `launch N --nccl`, or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (torchrun's variables) for each.");
        var plan = a.Plan();
        var reference = Reference.Compute(MeshArgs.Config, a.Batch);
        var env = LaunchEnvironment.FromEnvironment();
        var ctx = NcclCommunicator.CreateRankContext(env, a.Data, a.Model, TimeSpan.FromMinutes(5));
        var device = ctx.Device;
        var x = RankCheck.Step(plan, ctx, a.Mode, reference, a.Batch, forwardOnly: false, a.Recompute);   // disposes ctx with the shard
        Console.WriteLine($"rank {x.Rank} (data {x.DataIndex}, model {x.ModelIndex}) on {device}: parameter MB {x.Bytes / 1e6:F2}, " +
                          $"max rel. err logits {x.OutErr:E1}, grads {x.GradErr:E1}");
        return x.OutErr < RankCheck.GpuTolerance && x.GradErr < RankCheck.GpuTolerance ? 0 : 2;
    }
}
