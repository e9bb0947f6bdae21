using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>Normalization of a <see cref="Norm"/> (a model uses one kind for every norm).</summary>
public enum NormKind
{
    /// <summary>LayerNorm: centering and scaling; optional bias.</summary>
    LayerNorm,
    /// <summary>RMSNorm: scaling only, no centering (Zhang &amp; Sennrich 2019); no bias.</summary>
    RmsNorm,
}

/// <summary>
/// LayerNorm or RMSNorm over the last dimension, with a scale (<c>weight</c>) and an optional bias (LayerNorm only).
/// Keys <c>weight</c>, <c>bias</c> as timm's <c>LayerNorm</c>/<c>RmsNorm</c>. RMSNorm statistics are computed in
/// float32 for 16-bit inputs (LayerNorm accumulates in float32 inside libtorch).
/// </summary>
public sealed class Norm : nn.Module<Tensor, Tensor>
{
    private readonly Parameter weight;
    private readonly Parameter? bias;
    private readonly NormKind _kind;
    private readonly double _eps;
    private readonly long _dim;

    /// <summary>Creates a norm over <paramref name="dim"/> features: weight ones, bias zeros.</summary>
    public Norm(long dim, NormKind kind, bool bias, double eps, Device? device = null, ScalarType dtype = ScalarType.Float32)
        : base(kind == NormKind.LayerNorm ? "LayerNorm" : "RmsNorm")
    {
        if (kind == NormKind.RmsNorm && bias) throw new ArgumentException("RMSNorm has no bias.", nameof(bias));
        (_kind, _eps, _dim) = (kind, eps, dim);
        weight = Param.Of(torch.ones(dim, dtype: dtype, device: device));
        this.bias = bias ? Param.Of(torch.zeros(dim, dtype: dtype, device: device)) : null;
        RegisterComponents();
    }

    /// <summary>Normalizes <paramref name="x"/> [..., dim].</summary>
    public override Tensor forward(Tensor x)
    {
        if (x.shape[^1] != _dim)
            throw new ArgumentException($"{GetName()}: expected last dimension {_dim}, found shape [{string.Join(", ", x.shape)}].");
        if (_kind == NormKind.LayerNorm)
            return nn.functional.layer_norm(x, new[] { _dim }, weight, bias, _eps);
        using var scope = torch.NewDisposeScope();
        bool low = x.dtype is ScalarType.BFloat16 or ScalarType.Float16;
        var xf = low ? x.to(ScalarType.Float32) : x;
        var y = xf * torch.rsqrt(xf.Squared().mean(new long[] { -1 }, keepdim: true).Plus(_eps));
        return (low ? y.to(x.dtype) : y).mul(weight).MoveToOuterDisposeScope();
    }
}
