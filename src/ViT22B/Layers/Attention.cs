using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Multi-head self-attention of the classic block (timm <c>Attention</c>): fused <c>qkv</c> [3D, D] (rows q | k | v,
/// each head-major), optional per-head QK-norm over the head dimension (<c>q_norm</c>, <c>k_norm</c>, shared across
/// heads), softmax(q·kᵀ/√d)·v, out-projection <c>proj</c> [D, D].
/// </summary>
public sealed class Attention : nn.Module<Tensor, Tensor>
{
    private readonly Linear qkv;
    private readonly Norm? q_norm, k_norm;
    private readonly Linear proj;
    private readonly int _heads;

    /// <summary>Creates the attention layer of a block with options <paramref name="options"/> (width, heads, biases,
    /// QK-norm).</summary>
    public Attention(BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(Attention))
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Check();
        _heads = options.NumHeads;
        qkv = nn.Linear(options.Dim, options.Layout.QkvFeatures, hasBias: options.QkvBias, device: device, dtype: dtype);
        if (options.QkNorm)
        {
            q_norm = options.NewNorm(options.HeadDim, device, dtype);
            k_norm = options.NewNorm(options.HeadDim, device, dtype);
        }
        proj = nn.Linear(options.Dim, options.Dim, hasBias: options.ProjBias, device: device, dtype: dtype);
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, N, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var parts = qkv.forward(x).chunk(3, -1);
        var z = AttentionOps.Attend(parts[0], parts[1], parts[2], _heads, q_norm, k_norm);
        return proj.forward(z).MoveToOuterDisposeScope();
    }
}
