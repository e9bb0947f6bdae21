using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>The block stack of a <see cref="StreamedShardedVisionTransformer"/>: token chunks as in the sharded
/// encoder, block shards built from the weight source as the pass reaches them.</summary>
internal sealed class StreamedShardedEncoder : StreamedBlockStack
{
    private readonly ShardContext _s;
    private readonly ITensorSource _weights;
    private readonly ScalarType _dtype;

    public StreamedShardedEncoder(ShardContext s, ITensorSource weights, ScalarType dtype, bool prefetch)
        : base(nameof(StreamedShardedEncoder), prefetch)
    {
        (_s, _weights, _dtype) = (s, weights, dtype);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var comm = _s.Rank.Model;
        var counts = TokenPartition.Counts(x.shape[1], comm.Size);
        var h = Regions.ScatterTokens(x.transpose(0, 1).contiguous(), comm, counts);   // [T_r, B, D], contiguous (see Rings)
        var y = Stream(_s.Plan.Config.Depth, Load, (block, t) => block.call(t, counts), h);
        return Regions.GatherTokens(y, comm, counts).transpose(0, 1).contiguous().MoveToOuterDisposeScope();
    }

    private nn.Module<Tensor, long[], Tensor> Load(int index, Device device)
    {
        var c = _s.Plan.Config;
        nn.Module<Tensor, long[], Tensor> block = c.Block == BlockKind.Parallel
            ? new ShardedParallelBlock(c.BlockOptions, index, _s, device, _dtype)
            : new ShardedSequentialBlock(c.BlockOptions, index, _s, device, _dtype);
        try
        {
            using var noGrad = torch.no_grad();
            string prefix = $"blocks.{index}.";
            foreach (var (name, p) in block.named_parameters())
            {
                string key = prefix + name;
                var spec = _s.Plan.Spec(key, _s.Plan.FullShapes()[key], _s.ModelIndex, _s.DataIndex);
                using var slice = spec.IsWhole ? _weights.Read(key) : _weights.ReadSlice(key, spec.Dim, spec.Segments);
                p.copy_(slice);
            }
            return block;
        }
        catch
        {
            block.Dispose();
            throw;
        }
    }
}
