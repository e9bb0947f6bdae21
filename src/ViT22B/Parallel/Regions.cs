using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>The differentiable communication regions the sharded modules compose.</summary>
internal static class Regions
{
    /// <summary>All-gather + matmul over the group (forward), matmul + reduce-scatter (backward).</summary>
    public static Tensor AllGatherMatmul(Tensor xLocal, Tensor w, ICommunicator comm, long[] counts, CommMode mode) =>
        AllGatherMatmulFunction.apply(xLocal, w, new RingArgs(comm, counts, mode));

    /// <summary>Matmul + reduce-scatter over the group (forward), all-gather + matmul (backward).</summary>
    public static Tensor MatmulReduceScatter(Tensor h, Tensor w, ICommunicator comm, long[] counts, CommMode mode) =>
        MatmulReduceScatterFunction.apply(h, w, new RingArgs(comm, counts, mode));

    /// <summary>Keep the own token chunk (forward), all-gather gradients (backward).</summary>
    public static Tensor ScatterTokens(Tensor x, ICommunicator comm, long[] counts) =>
        comm.Size == 1 ? x : ScatterTokensFunction.apply(x, new RingArgs(comm, counts, CommMode.Plain));

    /// <summary>All-gather token chunks (forward), keep the own chunk of the gradient (backward).</summary>
    public static Tensor GatherTokens(Tensor x, ICommunicator comm, long[] counts) =>
        comm.Size == 1 ? x : GatherTokensFunction.apply(x, new RingArgs(comm, counts, CommMode.Plain));

    /// <summary>All-gather a data-sharded parameter along <paramref name="dim"/> (forward), reduce-scatter and average
    /// its gradient (backward).</summary>
    public static Tensor FsdpGather(Tensor shard, ICommunicator dataComm, long[] counts, int dim, DataGradientBuckets buckets) =>
        dataComm.Size == 1 ? shard : FsdpGatherFunction.apply(shard, new FsdpGatherArgs(shard, dataComm, counts, dim, buckets));

    /// <summary>A data-replicated parameter as it is (forward), its gradient averaged over the data axis in a bucket
    /// issued inside backward (backward); the parameter itself where no gradient is recorded.</summary>
    public static Tensor AverageOverData(Tensor parameter, string key, ICommunicator dataComm, DataGradientBuckets buckets) =>
        dataComm.Size == 1 || !parameter.requires_grad || !torch.is_grad_enabled()
            ? parameter
            : DataReplicaFunction.apply(parameter, new DataReplicaArgs(parameter, key, dataComm, buckets));
}
