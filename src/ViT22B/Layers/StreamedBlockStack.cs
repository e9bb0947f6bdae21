using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// A block stack that holds no blocks: each is built and loaded by the subclass when the pass reaches it
/// (<see cref="BlockStreaming"/>). Inference only, so nothing is ever recomputed.
/// </summary>
internal abstract class StreamedBlockStack : nn.Module, IBlockStack
{
    private readonly bool _prefetch;

    protected StreamedBlockStack(string name, bool prefetch) : base(name) => _prefetch = prefetch;

    /// <summary>Where the time of the last pass went.</summary>
    public StreamingStats? LastPass { get; private set; }

    public ActivationCheckpointing Checkpointing
    {
        get => ActivationCheckpointing.None;
        set
        {
            if (value != ActivationCheckpointing.None) throw new NotSupportedException("A streamed model runs inference only; there is nothing to recompute.");
        }
    }

    public void ThrowIfBackwardFailed() { }

    public abstract Tensor forward(Tensor x);

    /// <summary><see cref="BlockStreaming.Run"/> with this stack's prefetch setting, recording its statistics.</summary>
    protected Tensor Stream<TBlock>(int depth, Func<int, Device, TBlock> load, Func<TBlock, Tensor, Tensor> run, Tensor x) where TBlock : nn.Module
    {
        var (y, stats) = BlockStreaming.Run(depth, load, run, x, _prefetch);
        LastPass = stats;
        return y;
    }
}
