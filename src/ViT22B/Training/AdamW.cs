using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Training;

/// <summary>
/// AdamW (Loshchilov &amp; Hutter 2019) with PyTorch's semantics: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
/// p ← p·(1 − lr·λ) − lr·m̂ / (√v̂ + ε) with bias-corrected m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), t the parameter's own
/// update count. State slots
/// <c>exp_avg</c>, <c>exp_avg_sq</c> (float32, or float64 for float64 parameters).
/// </summary>
public sealed class AdamW : Optimizer
{
    private readonly Tensor[] _m, _v;

    /// <summary>Creates the optimizer; state is allocated here, zero-filled.</summary>
    public AdamW(IEnumerable<OptimizedParameter> parameters, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
        : base(parameters)
    {
        if (beta1 is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(beta1), $"beta1 must be in [0, 1), found {beta1}.");
        if (beta2 is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(beta2), $"beta2 must be in [0, 1), found {beta2}.");
        if (!(eps > 0)) throw new ArgumentOutOfRangeException(nameof(eps), $"eps must be positive, found {eps}.");
        (Beta1, Beta2, Eps) = (beta1, beta2, eps);
        _m = new Tensor[Parameters.Count];
        _v = new Tensor[Parameters.Count];
        for (int i = 0; i < Parameters.Count; i++)
        {
            var p = Parameters[i].Value;
            var dt = p.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            _m[i] = AddState(Parameters[i].Name, "exp_avg", zeros(p.shape, dtype: dt, device: p.device));
            _v[i] = AddState(Parameters[i].Name, "exp_avg_sq", zeros(p.shape, dtype: dt, device: p.device));
        }
    }

    /// <summary>β₁.</summary>
    public double Beta1 { get; }
    /// <summary>β₂.</summary>
    public double Beta2 { get; }
    /// <summary>ε (added to √v̂).</summary>
    public double Eps { get; }

    /// <inheritdoc />
    public override string Describe() => $"adamw(beta1={F(Beta1)}, beta2={F(Beta2)}, eps={F(Eps)})";

    /// <inheritdoc />
    protected override void Update(int index, OptimizedParameter parameter, Tensor weight, Tensor grad, double lr, long step)
    {
        long t = step;
        var m = _m[index];
        var v = _v[index];
        m.TimesInPlace(Beta1).PlusInPlace(grad, 1 - Beta1);
        v.TimesInPlace(Beta2).AddProductInPlace(grad, grad, 1 - Beta2);
        double bc1 = 1 - Math.Pow(Beta1, t), bc2 = 1 - Math.Pow(Beta2, t);
        var denom = v.DividedBy(bc2).sqrt_().PlusInPlace(Eps);
        weight.AddQuotientInPlace(m, denom, -lr / bc1);
    }
}
