using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>What a sharded block needs to know about its place in the mesh.</summary>
/// <param name="Plan">The sharding plan.</param>
/// <param name="Rank">The rank's context (mesh coordinates and communicators).</param>
/// <param name="Mode">Overlapped (ring) or plain communication.</param>
internal sealed record ShardContext(ShardingPlan Plan, RankContext Rank, CommMode Mode)
{
    /// <summary>Model-axis index.</summary>
    public int ModelIndex => Rank.Mesh.Coordinates(Rank.Rank).Model;

    /// <summary>Data-axis index.</summary>
    public int DataIndex => Rank.Mesh.Coordinates(Rank.Rank).Data;

    /// <summary>The shape this rank stores for a full parameter.</summary>
    public long[] LocalShape(string key, long[] fullShape) => Plan.Spec(key, fullShape, ModelIndex, DataIndex).LocalShape;

    /// <summary>The model-axis shard of a parameter as used in compute: the stored tensor, or, under FSDP, the
    /// all-gather of its data-axis shards (whose backward reduce-scatters the gradient).</summary>
    public Tensor Use(string key, Tensor stored, long[] fullShape) =>
        Plan.IsFsdpSharded(key, fullShape)
            ? Regions.FsdpGather(stored, Rank.Data, Plan.FsdpCounts(key, fullShape, ModelIndex), Plan.FsdpDim(key, fullShape), FsdpBuckets)
            : stored;

    /// <summary>This rank's FSDP gradient buckets (filled in backward).</summary>
    public FsdpGradientBuckets FsdpBuckets { get; } = new();

    /// <summary>Checks that this rank's token chunk <paramref name="x"/> [T_r, …] is the one the token partition
    /// <paramref name="counts"/> gives it.</summary>
    public void CheckChunk(Tensor x, long[] counts)
    {
        ArgumentNullException.ThrowIfNull(counts);
        int r = Rank.Model.Rank;
        if (counts.Length != Rank.Model.Size || counts[r] != x.shape[0])
            throw new ArgumentException($"Model rank {r} of {Rank.Model.Size} holds {x.shape[0]} tokens but the partition [{string.Join(", ", counts)}] gives it {(counts.Length > r ? counts[r] : 0)}.");
    }

    /// <summary>Creates an uninitialized parameter of this rank's shape for a full parameter.</summary>
    public Parameter NewParameter(string key, long[] fullShape, ScalarType dtype, Device device) =>
        new(torch.empty(LocalShape(key, fullShape), dtype: dtype, device: device).DetachFromDisposeScope());
}
