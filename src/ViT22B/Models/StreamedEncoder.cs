using ViT22B.Interop;
using ViT22B.Layers;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>The block stack of a <see cref="StreamedVisionTransformer"/>: holds no blocks, builds each from the
/// weight source when the pass reaches it (<see cref="BlockStreaming"/>).</summary>
internal sealed class StreamedEncoder : StreamedBlockStack
{
    private readonly ViTConfig _config;
    private readonly ITensorSource _weights;
    private readonly ScalarType _dtype;

    public StreamedEncoder(ViTConfig config, ITensorSource weights, ScalarType dtype, bool prefetch)
        : base(nameof(StreamedEncoder), prefetch)
    {
        (_config, _weights, _dtype) = (config, weights, dtype);
    }

    public override Tensor forward(Tensor x) => Stream(_config.Depth, Load, (block, h) => block.call(h), x);

    private nn.Module<Tensor, Tensor> Load(int index, Device device)
    {
        nn.Module<Tensor, Tensor> block = _config.Block == BlockKind.Parallel
            ? new ParallelBlock(_config.BlockOptions, device, _dtype)
            : new SequentialBlock(_config.BlockOptions, device, _dtype);
        try
        {
            StreamedVisionTransformer.Load(block, _weights, $"blocks.{index}.");
            return block;
        }
        catch
        {
            block.Dispose();
            throw;
        }
    }
}
