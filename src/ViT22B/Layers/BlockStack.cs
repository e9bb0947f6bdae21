using System.Diagnostics.CodeAnalysis;
using System.Runtime.ExceptionServices;
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
    private ActivationCheckpointing _checkpointing = ActivationCheckpointing.None;
    private ExceptionDispatchInfo? _failure;

    /// <summary>Wraps the given blocks.</summary>
    protected BlockStack(params TBlock[] blocks) : base(blocks) { }

    /// <summary>Which blocks recompute their activations in backward (default none).</summary>
    /// <exception cref="ArgumentException">The set names a block this stack does not have.</exception>
    public ActivationCheckpointing Checkpointing
    {
        get => _checkpointing;
        set
        {
            ArgumentNullException.ThrowIfNull(value);
            value.Validate(Count);
            _checkpointing = value;
        }
    }

    /// <summary>Runs block <paramref name="index"/> as <paramref name="run"/>(<paramref name="x"/>), recomputed in
    /// backward when <see cref="Checkpointing"/> names it and gradients are being recorded.</summary>
    private protected Tensor RunBlock(int index, Tensor x, Func<Tensor, Tensor> run)
    {
        ArgumentNullException.ThrowIfNull(run);
        return _checkpointing.Applies(index) ? Recompute.Apply(x, run, this[index].parameters(), OnRecomputeFailure) : run(x);
    }

    /// <summary>Records a failure of a block's recomputation inside backward, where it cannot be thrown;
    /// <see cref="ThrowIfBackwardFailed"/> throws it.</summary>
    private protected virtual void OnRecomputeFailure(Exception failure)
    {
        var captured = ExceptionDispatchInfo.Capture(failure);
        Interlocked.CompareExchange(ref _failure, captured, null);
    }

    /// <summary>Throws (and forgets) the first failure of a block's recomputation in the last backward pass: the
    /// gradients of that pass are NaN.</summary>
    public void ThrowIfBackwardFailed() => Interlocked.Exchange(ref _failure, null)?.Throw();

    /// <summary>Runs the stack, [B, T, D] → [B, T, D].</summary>
    [SuppressMessage("Style", "IDE1006:Naming Styles", Justification = "TorchSharp's lowercase forward, as in its modules")]
    public abstract Tensor forward(Tensor x);
}

/// <summary>What a model needs of its block stack, whatever the blocks' type.</summary>
internal interface IBlockStack
{
    /// <summary>Which blocks recompute their activations in backward.</summary>
    ActivationCheckpointing Checkpointing { get; set; }

    /// <summary>Throws the first failure of a recomputation in the last backward pass.</summary>
    void ThrowIfBackwardFailed();

    /// <summary>Runs the stack, [B, T, D] → [B, T, D].</summary>
    [SuppressMessage("Style", "IDE1006:Naming Styles", Justification = "TorchSharp's lowercase forward, as in its modules")]
    Tensor forward(Tensor x);
}
