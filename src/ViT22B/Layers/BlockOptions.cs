using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>Which transformer block an encoder stacks.</summary>
public enum BlockKind
{
    /// <summary>ViT-22B parallel block (arXiv:2302.05442 §2): one shared pre-norm, fused in/out projections,
    /// attention and MLP computed side by side, one residual add. timm <c>ParallelScalingBlock</c>.</summary>
    Parallel,
    /// <summary>Classic pre-norm ViT block (ViT, SoViT): attention then MLP, two residual adds. timm <c>Block</c>.</summary>
    Sequential,
}

/// <summary>
/// The shape and options of one transformer block (and of the MAP head, which uses the blocks' width, heads, MLP
/// size, norm and activation): what <see cref="ParallelBlock"/>, <see cref="SequentialBlock"/>, <see cref="Attention"/>
/// and <see cref="MapHead"/> are built from. A model config supplies it (<c>ViTConfig.BlockOptions</c>); the layers
/// know nothing of the model around them.
/// </summary>
/// <param name="Dim">Width D.</param>
/// <param name="NumHeads">Attention heads H (D must be divisible by H).</param>
/// <param name="MlpDim">MLP hidden size F.</param>
public sealed record BlockOptions(long Dim, int NumHeads, long MlpDim)
{
    /// <summary>Bias on the Q, K, V projections (parallel block: on all F+3D rows of <c>in_proj</c>).</summary>
    public bool QkvBias { get; init; }
    /// <summary>Per-head QK-norm over the head dimension.</summary>
    public bool QkNorm { get; init; } = true;
    /// <summary>Kind of every norm.</summary>
    public NormKind Norm { get; init; } = NormKind.LayerNorm;
    /// <summary>Bias on every norm (LayerNorm only).</summary>
    public bool NormBias { get; init; }
    /// <summary>Epsilon of every norm.</summary>
    public double NormEps { get; init; } = 1e-6;
    /// <summary>Biases of the MLP projections.</summary>
    public bool MlpBias { get; init; } = true;
    /// <summary>Bias of the attention out-projection.</summary>
    public bool ProjBias { get; init; } = true;
    /// <summary>Parallel block: one fused out-projection instead of timm's two.</summary>
    public bool FuseOutProj { get; init; } = true;
    /// <summary>MLP activation.</summary>
    public Activation Act { get; init; } = Activation.GeluTanh;
    /// <summary>LayerScale's initial value (<see cref="LayerScale"/> on each residual branch of the classic block,
    /// keys <c>ls1</c>, <c>ls2</c>; on the parallel block's summed output, key <c>ls</c>), or null for none.</summary>
    public double? InitValues { get; init; }

    /// <summary>Head dimension d = D / H.</summary>
    public long HeadDim => Dim / NumHeads;

    /// <summary>The parallel block's fused projection layout and bias rules for these options.</summary>
    public FusedLayout Layout => new(Dim, MlpDim, QkvBias, MlpBias, ProjBias, FuseOutProj);

    /// <summary>A LayerScale over the block's width when the options ask for one, else null.</summary>
    internal LayerScale? NewLayerScale(Device? device, ScalarType dtype) =>
        InitValues is { } v ? new LayerScale(Dim, v, device, dtype) : null;

    /// <summary>A norm of this block's kind over <paramref name="dim"/> features.</summary>
    internal Norm NewNorm(long dim, Device? device, ScalarType dtype) => new(dim, Norm, NormBias, NormEps, device, dtype);

    /// <summary>Throws <see cref="ArgumentException"/> when a block cannot be built from these options.</summary>
    internal BlockOptions Check()
    {
        if (Dim <= 0 || NumHeads <= 0 || MlpDim <= 0)
            throw new ArgumentException($"Block options need a positive width ({Dim}), head count ({NumHeads}) and MLP size ({MlpDim}).");
        if (Dim % NumHeads != 0)
            throw new ArgumentException($"Block width {Dim} is not divisible by {NumHeads} heads.");
        if (InitValues is { } v && !(double.IsFinite(v) && v > 0))
            throw new ArgumentException($"LayerScale's initial value must be a positive number (or absent), found {v}.");
        return this;
    }
}
