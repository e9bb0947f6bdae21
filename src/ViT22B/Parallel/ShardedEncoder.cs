using TorchSharp;
using ViT22B.Layers;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// The sharded block stack: takes the replicated token sequence [B, T, D], keeps this rank's token chunk
/// (token-major [T_r, B, D]), runs the sharded blocks, and all-gathers the chunks back to [B, T, D] for the
/// replicated final norm and head.
/// </summary>
internal sealed class ShardedEncoder : BlockStack<nn.Module<Tensor, long[], Tensor>>
{
    private readonly ShardContext _s;

    /// <summary>Creates the shards of <paramref name="depth"/> blocks of kind <paramref name="kind"/>.</summary>
    public ShardedEncoder(BlockKind kind, int depth, BlockOptions o, ShardContext s, Device device, ScalarType dtype)
        : base(Enumerable.Range(0, depth).Select(i => kind == BlockKind.Parallel
            ? (nn.Module<Tensor, long[], Tensor>)new ShardedParallelBlock(o, i, s, device, dtype)
            : new ShardedSequentialBlock(o, i, s, device, dtype)).ToArray())
    {
        _s = s;
    }

    /// <summary>Records a failed recomputation against the model-axis communicator, so that
    /// <see cref="ShardedVisionTransformer.Backward"/> throws it with the collectives' failures, and takes the rank off
    /// the data axis: the block's weights never reach this rank's data-axis gradient buckets, so its later buckets would
    /// not match its data peers' (whose collectives then fail instead of pairing with the wrong buckets).</summary>
    private protected override void OnRecomputeFailure(Exception failure)
    {
        BackwardFailures.Record(_s.Rank.Model, failure);
        if (_s.Rank.Data.Size > 1) _s.Rank.Data.Abort(failure);
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor x)
    {
        if (_s.Rank.SharesGpuInProcess && torch.is_grad_enabled())
            throw new NotSupportedException(
                $"Rank {_s.Rank.Rank} shares {_s.Rank.Device} with another in-process rank: run its forward under torch.no_grad() or " +
                "torch.inference_mode(). Backward cannot run there (libtorch's autograd engine runs all backward work of one GPU on one " +
                "thread, where the ranks' collectives would wait for each other forever); train with one GPU per rank.");
        using var scope = torch.NewDisposeScope();
        var comm = _s.Rank.Model;
        long total = x.shape[1];
        var counts = TokenPartition.Counts(total, comm.Size);
        var h = Regions.ScatterTokens(x.transpose(0, 1).contiguous(), comm, counts);   // [T_r, B, D], contiguous (see Rings)
        for (int i = 0; i < Count; i++)
        {
            var block = this[i];
            h = RunBlock(i, h, t => block.call(t, counts));   // a recomputed block repeats its collectives in backward
        }
        return Regions.GatherTokens(h, comm, counts).transpose(0, 1).contiguous().MoveToOuterDisposeScope();
    }
}
