using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Training;

/// <summary>
/// Adafactor as the big_vision / ViT-22B family uses it (big_vision <c>scale_by_adafactor</c> = optax
/// <c>scale_by_factored_rms</c> + optional block-RMS clipping + momentum; Shazeer &amp; Stern 2018):
/// <list type="bullet">
/// <item>decay β̂ₜ = min(β₂cap, 1 − t^(−0.8)) with t the parameter's update count, 1 at its first (so the first update uses g² alone);</item>
/// <item>a parameter with at least two dimensions whose second-largest dimension is ≥ <c>minDimSizeToFactor</c> keeps
/// factored second moments: with d₀ its largest and d₁ its second-largest dimension,
/// R ← β̂R + (1−β̂)·mean_{d₀}(g² + ε), C ← β̂C + (1−β̂)·mean_{d₁}(g² + ε), and
/// u = g · (R / mean_{d₁}R)^(−½) · C^(−½) (broadcast back over d₀ and d₁);</item>
/// <item>other parameters keep a full V ← β̂V + (1−β̂)(g² + ε), u = g·V^(−½);</item>
/// <item>optionally u ← u / max(1, RMS(u)/clip) (<c>clipping_threshold</c>);</item>
/// <item>momentum (optax <c>ema</c> without debiasing) μ ← βμ + (1−β)u, then p ← p·(1 − lr·λ) − lr·μ.</item>
/// </list>
/// State slots <c>v_row</c>, <c>v_col</c> (factored) or <c>v</c>, and <c>momentum</c>; all float32 (float64 for
/// float64 parameters). Memory: O(rows + columns) per matrix for the second moment, plus one momentum buffer.
/// </summary>
public sealed class Adafactor : Optimizer
{
    private readonly Tensor?[] _row, _col, _full, _mom;
    private readonly (int D0, int D1)?[] _factored;

    /// <summary>Creates the optimizer with big_vision's defaults.</summary>
    /// <param name="parameters">What to optimize.</param>
    /// <param name="minDimSizeToFactor">Factor a matrix only when its second-largest dimension is at least this.</param>
    /// <param name="beta2Cap">Upper bound of the second-moment decay.</param>
    /// <param name="decayExponent">Exponent of the decay schedule 1 − t^(−exponent).</param>
    /// <param name="momentum">Momentum β (0 = none).</param>
    /// <param name="clippingThreshold">Block-RMS clipping of the scaled update (null = none).</param>
    /// <param name="eps">Added to g² (optax: 1e-30).</param>
    public Adafactor(IEnumerable<OptimizedParameter> parameters, int minDimSizeToFactor = 32, double beta2Cap = 0.999,
        double decayExponent = 0.8, double momentum = 0.9, double? clippingThreshold = null, double eps = 1e-30)
        : base(parameters)
    {
        if (minDimSizeToFactor < 1) throw new ArgumentOutOfRangeException(nameof(minDimSizeToFactor), $"must be ≥ 1, found {minDimSizeToFactor}.");
        if (beta2Cap is <= 0 or > 1) throw new ArgumentOutOfRangeException(nameof(beta2Cap), $"must be in (0, 1], found {beta2Cap}.");
        if (momentum is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(momentum), $"must be in [0, 1), found {momentum}.");
        if (clippingThreshold is { } c && !(c > 0)) throw new ArgumentOutOfRangeException(nameof(clippingThreshold), $"must be positive, found {c}.");
        (MinDimSizeToFactor, Beta2Cap, DecayExponent, Momentum, ClippingThreshold, Eps) = (minDimSizeToFactor, beta2Cap, decayExponent, momentum, clippingThreshold, eps);
        int n = Parameters.Count;
        (_row, _col, _full, _mom, _factored) = (new Tensor?[n], new Tensor?[n], new Tensor?[n], new Tensor?[n], new (int, int)?[n]);
        for (int i = 0; i < n; i++)
        {
            var (name, p) = (Parameters[i].Name, Parameters[i].Value);
            var dt = p.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
            _factored[i] = FactoredDims(p.shape, minDimSizeToFactor);
            if (_factored[i] is var (d0, d1))
            {
                _row[i] = AddState(name, "v_row", zeros(Without(p.shape, d0), dtype: dt, device: p.device));
                _col[i] = AddState(name, "v_col", zeros(Without(p.shape, d1), dtype: dt, device: p.device));
            }
            else
            {
                _full[i] = AddState(name, "v", zeros(p.shape, dtype: dt, device: p.device));
            }
            if (momentum > 0) _mom[i] = AddState(name, "momentum", zeros(p.shape, dtype: dt, device: p.device));
        }
    }

    /// <summary>Factoring threshold.</summary>
    public int MinDimSizeToFactor { get; }
    /// <summary>Upper bound of the second-moment decay.</summary>
    public double Beta2Cap { get; }
    /// <summary>Decay exponent.</summary>
    public double DecayExponent { get; }
    /// <summary>Momentum β (0 = none).</summary>
    public double Momentum { get; }
    /// <summary>Block-RMS clipping threshold, or null.</summary>
    public double? ClippingThreshold { get; }
    /// <summary>ε added to g².</summary>
    public double Eps { get; }

    /// <inheritdoc />
    public override string Describe() =>
        $"adafactor(min_dim_size_to_factor={MinDimSizeToFactor}, beta2_cap={F(Beta2Cap)}, decay_exponent={F(DecayExponent)}, momentum={F(Momentum)}, clipping_threshold={(ClippingThreshold is { } c ? F(c) : "none")}, eps={F(Eps)})";

    /// <summary>The (largest, second-largest) dimensions a parameter of this shape is factored over, or null
    /// (optax <c>_factored_dims</c>: a stable sort by size, so ties go to the later dimension as d₀).</summary>
    public static (int D0, int D1)? FactoredDims(long[] shape, int minDimSizeToFactor)
    {
        if (shape.Length < 2) return null;
        var sorted = Enumerable.Range(0, shape.Length).OrderBy(d => shape[d]).ToArray();   // stable
        int d0 = sorted[^1], d1 = sorted[^2];
        return shape[d1] < minDimSizeToFactor ? null : (d0, d1);
    }

    /// <inheritdoc />
    protected override void Update(int index, OptimizedParameter parameter, Tensor weight, Tensor grad, double lr, long step)
    {
        double t = step;
        double decay = Math.Min(Beta2Cap, 1 - Math.Pow(t, -DecayExponent));
        var g2 = grad.Squared().PlusInPlace(Eps);
        Tensor u;
        if (_factored[index] is var (d0, d1))
        {
            var r = _row[index]!;
            var c = _col[index]!;
            r.TimesInPlace(decay).PlusInPlace(g2.mean(new long[] { d0 }), 1 - decay);
            c.TimesInPlace(decay).PlusInPlace(g2.mean(new long[] { d1 }), 1 - decay);
            int reducedD1 = d1 > d0 ? d1 - 1 : d1;
            var rowFactor = (r / r.mean(new long[] { reducedD1 }, keepdim: true)).rsqrt();
            var colFactor = c.rsqrt();
            u = grad * rowFactor.unsqueeze(d0) * colFactor.unsqueeze(d1);
        }
        else
        {
            var v = _full[index]!;
            v.TimesInPlace(decay).PlusInPlace(g2, 1 - decay);
            u = grad * v.rsqrt();
        }
        if (ClippingThreshold is { } clip)
        {
            var rms = u.Squared().mean().sqrt();
            u = u / rms.DividedBy(clip).AtLeast(1.0);
        }
        if (_mom[index] is { } mom)
        {
            mom.TimesInPlace(Momentum).PlusInPlace(u, 1 - Momentum);
            u = mom;
        }
        weight.PlusInPlace(u, -lr);
    }

    private static long[] Without(long[] shape, int dim) => shape.Where((_, i) => i != dim).ToArray();
}
