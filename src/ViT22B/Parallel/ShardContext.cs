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

    /// <summary>The model-axis shard of a block weight as used in compute: under FSDP the all-gather of its data-axis
    /// shards, whose backward reduce-scatters the gradient; on a data axis of more than one rank otherwise the stored
    /// tensor through a node whose backward all-reduces the gradient; the stored tensor itself on one data rank. Either
    /// collective is issued in backward, in <see cref="GradientBuckets"/>.</summary>
    public Tensor Use(string key, Tensor stored, long[] fullShape)
    {
        if (Plan.IsFsdpSharded(key, fullShape))
            return Regions.FsdpGather(stored, Rank.Data, Plan.FsdpCounts(key, fullShape, ModelIndex), Plan.FsdpDim(key, fullShape), GradientBuckets);
        // A gradient that is partial on the model axis is summed there first, after backward.
        return Plan.IsPartialOnModelAxis(key, fullShape) ? stored : Regions.AverageOverData(stored, key, Rank.Data, GradientBuckets);
    }

    /// <summary>This rank's data-axis gradient buckets (filled and issued in backward).</summary>
    public DataGradientBuckets GradientBuckets { get; } = new();

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
