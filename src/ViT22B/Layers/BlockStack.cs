using System.Diagnostics.CodeAnalysis;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// A stack of blocks of type <typeparamref name="TBlock"/> mapping the token sequence [B, T, D] to [B, T, D]. A
/// <see cref="ModuleList{T}"/>, so the blocks' keys read <c>blocks.N.…</c> in a model. <see cref="Encoder"/> runs
/// <see cref="ParallelBlock"/>s or <see cref="SequentialBlock"/>s on one device; the sharded encoder of
/// <c>ViT22B.Parallel</c> runs tensor-parallel shards of them, which also take the token partition.
/// </summary>
public abstract class BlockStack<TBlock> : ModuleList<TBlock>, IBlockStack where TBlock : nn.Module
{
    /// <summary>Wraps the given blocks.</summary>
    protected BlockStack(params TBlock[] blocks) : base(blocks) { }

    /// <summary>Runs the stack, [B, T, D] → [B, T, D].</summary>
    [SuppressMessage("Style", "IDE1006:Naming Styles", Justification = "TorchSharp's lowercase forward, as in its modules")]
    public abstract Tensor forward(Tensor x);
}

/// <summary>What a model needs of its block stack, whatever the blocks' type.</summary>
internal interface IBlockStack
{
    /// <summary>Runs the stack, [B, T, D] → [B, T, D].</summary>
    [SuppressMessage("Style", "IDE1006:Naming Styles", Justification = "TorchSharp's lowercase forward, as in its modules")]
    Tensor forward(Tensor x);
}
