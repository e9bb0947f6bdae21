using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// A stack of blocks mapping the token sequence [B, T, D] to [B, T, D]. A <see cref="ModuleList{T}"/>, so the
/// blocks' keys read <c>blocks.N.…</c> in a model. <see cref="Encoder"/> runs the blocks on one device; the
/// sharded encoder of <c>ViT22B.Parallel</c> runs tensor-parallel shards of them.
/// </summary>
public abstract class BlockStack : ModuleList<nn.Module<Tensor, Tensor>>
{
    /// <summary>Wraps the given blocks.</summary>
    protected BlockStack(params nn.Module<Tensor, Tensor>[] blocks) : base(blocks) { }

    /// <summary>Runs the stack, [B, T, D] → [B, T, D].</summary>
    public abstract Tensor forward(Tensor x);
}
