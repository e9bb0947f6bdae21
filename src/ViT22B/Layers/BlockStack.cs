using System.Diagnostics.CodeAnalysis;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// A stack of blocks mapping the token sequence [B, T, D] to [B, T, D]. A <see cref="ModuleList{T}"/> (of modules of
/// whatever signature its own <see cref="forward"/> calls them with), so the
/// blocks' keys read <c>blocks.N.…</c> in a model. <see cref="Encoder"/> runs the blocks on one device; the
/// sharded encoder of <c>ViT22B.Parallel</c> runs tensor-parallel shards of them.
/// </summary>
public abstract class BlockStack : ModuleList<nn.Module>
{
    /// <summary>Wraps the given blocks.</summary>
    protected BlockStack(params nn.Module[] blocks) : base(blocks) { }

    /// <summary>Runs the stack, [B, T, D] → [B, T, D].</summary>
    [SuppressMessage("Style", "IDE1006:Naming Styles", Justification = "TorchSharp's lowercase forward, as in its modules")]
    public abstract Tensor forward(Tensor x);
}
