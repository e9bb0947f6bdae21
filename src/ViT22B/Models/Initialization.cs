using TorchSharp;
using ViT22B.Layers;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>
/// big_vision's initialization (docs/model.md#initialization; timm <c>init_weights_vit_jax</c>), applied by key:
/// dense kernels xavier-uniform, with each sub-matrix of a fused projection (q, k, v, MLP-in; attention-out,
/// MLP-out; MAP k, v) using its own fan-in/fan-out as if unfused; MLP biases normal(1e-6), other biases zero;
/// patch embedding lecun-normal (truncated); learned position embedding normal(1/√D); class token zero; MAP probe
/// truncated normal(D^-1/2); classifier zero; norms scale one, bias zero. Uses TorchSharp's default generator.
/// <para>A sharded model (<c>ViT22B.Parallel</c>) runs the same rules on its shards through
/// <see cref="Initialize"/>, filling each sub-block of a fused weight with the full parameter's bounds, so it is
/// initialized from the same distributions as the full model.</para>
/// </summary>
public static class Initialization
{
    /// <summary>Ranges <c>[Start, End)</c> along one axis of a full 2-D weight, each xavier-uniform with its bound,
    /// drawn from <c>generator</c> (null: TorchSharp's default generator).</summary>
    internal delegate void XavierFill(string key, Tensor weight, int axis, IReadOnlyList<(long Start, long End, double Bound)> ranges, Generator? generator);

    /// <summary>Re-initializes every parameter of <paramref name="model"/>.</summary>
    public static void BigVision(VisionTransformer model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var shapes = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.shape);
        Initialize(model, key => shapes[key], FillWhole);
    }

    /// <summary>
    /// Runs the rules over <paramref name="model"/>'s parameters in state-dict order. Elementwise rules (normal,
    /// truncated normal, zeros) act on the tensor as it is; the xavier-uniform rule of a 2-D weight is handed to
    /// <paramref name="xavier"/> with its sub-blocks' ranges in the coordinates of the full weight, whose shape
    /// <paramref name="fullShapeOf"/> gives.
    /// </summary>
    internal static void Initialize(VisionTransformer model, Func<string, long[]> fullShapeOf, XavierFill xavier)
    {
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in model.named_parameters()) Apply(model.Config, key, p, fullShapeOf(key), xavier, generator: null);
    }

    /// <summary>
    /// The rule of parameter <paramref name="key"/> applied to <paramref name="p"/> (the full parameter of shape
    /// <paramref name="full"/>, or a shard of it whose sub-blocks <paramref name="xavier"/> places), drawing from
    /// <paramref name="generator"/> (null: the default generator). Norm scales and LayerScale factors have no rule:
    /// they keep the values their modules are created with (one, <c>init_values</c>).
    /// </summary>
    internal static void Apply(ViTConfig c, string key, Tensor p, long[] full, XavierFill xavier, Generator? generator)
    {
        long d = c.EmbedDim;
        var layout = c.BlockOptions.Layout;
        string leaf = key[(key.LastIndexOf('.') + 1)..];
        if (key == "patch_embed.proj.weight")
        {
            double fanIn = c.InChans * (double)c.PatchSize * c.PatchSize;
            double std = Math.Sqrt(1.0 / fanIn) / .87962566103423978;   // Flax lecun_normal: truncated at ±2σ
            TruncatedNormal(p, std, -2 * std, 2 * std, generator);
        }
        else if (key == "pos_embed") p.normal_(0, 1.0 / Math.Sqrt(d), generator);
        else if (key == "cls_token") Param.Zero(p);
        else if (key == "reg_token") p.normal_(0, 1e-6, generator);                 // timm's init for register tokens
        else if (key == "attn_pool.latent") TruncatedNormal(p, 1.0 / Math.Sqrt(d), -2 / Math.Sqrt(d), 2 / Math.Sqrt(d), generator);   // timm trunc_normal_tf_: ±2σ
        else if (key.StartsWith("head.", StringComparison.Ordinal)) Param.Zero(p);
        else if (leaf == "weight" && p.dim() == 2)
        {
            // Sub-blocks (out, in) along an axis of the FULL weight, each xavier-uniform with its own fans.
            var (axis, blocks) =
                key.EndsWith("in_proj.weight", StringComparison.Ordinal) ? (0, layout.InBlocks)
                : key.EndsWith("out_proj.weight", StringComparison.Ordinal) && full[1] == layout.OutFeatures ? (1, layout.OutBlocks)
                : key.EndsWith("qkv.weight", StringComparison.Ordinal) ? (0, layout.QkvBlocks)
                : key.EndsWith("kv.weight", StringComparison.Ordinal) ? (0, new[] { (d, d), (d, d) })      // MAP head: k | v
                : (0, new[] { (full[0], full[1]) });
            var ranges = new List<(long Start, long End, double Bound)>();
            long start = 0;
            foreach (var (o, i) in blocks)
            {
                long len = axis == 0 ? o : i;
                ranges.Add((start, start + len, Math.Sqrt(6.0 / (o + i))));
                start += len;
            }
            xavier(key, p, axis, ranges, generator);
        }
        else if (leaf == "bias" || leaf == "mlp_bias")
        {
            bool isMlp = key.Contains("mlp", StringComparison.Ordinal) && !key.Contains("norm", StringComparison.Ordinal);
            if (isMlp) p.normal_(0, 1e-6, generator);
            else Param.Zero(p);
        }
        // 1-D "weight" parameters are norm scales: created as ones.
    }

    /// <summary>Normal(0, <paramref name="std"/>²) truncated to [<paramref name="a"/>, <paramref name="b"/>]: TorchSharp's
    /// <c>trunc_normal_</c> for the default generator; with a generator, by inverting the CDF of uniform draws as
    /// PyTorch's <c>trunc_normal_</c> does (TorchSharp's version ignores its generator argument).</summary>
    private static void TruncatedNormal(Tensor p, double std, double a, double b, Generator? generator)
    {
        if (generator is null)
        {
            // The default generator keeps TorchSharp's own draw, so a model seeded with torch.manual_seed gets the
            // weights it got before seeded sources existed.
            nn.init.trunc_normal_(p, 0, std, a, b);
            return;
        }
        static double Cdf(double x) => 0.5 * (1 + Erf(x / Math.Sqrt(2)));
        double lo = Cdf(a / std), hi = Cdf(b / std);
        p.uniform_(2 * lo - 1, 2 * hi - 1, generator);
        p.erfinv_().TimesInPlace(std * Math.Sqrt(2)).ClampInPlace(a, b);
    }

    // .NET has no erf: the Chebyshev fit of the complementary error function from Numerical Recipes (relative error
    // below 1.2e-7), ample for the probabilities of the cut-offs.
    private static double Erf(double x)
    {
        double z = Math.Abs(x), t = 1 / (1 + 0.5 * z);
        double erfc = t * Math.Exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 +
            t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
        return x >= 0 ? 1 - erfc : erfc - 1;
    }

    /// <summary>Fills <paramref name="ranges"/> of <paramref name="w"/> along <paramref name="axis"/> as they lie in the full
    /// weight (the whole weight, or a shard cut along another axis).</summary>
    internal static void FillWhole(string key, Tensor w, int axis, IReadOnlyList<(long Start, long End, double Bound)> ranges, Generator? generator)
    {
        if (ranges[^1].End != w.shape[axis])
            throw new InvalidOperationException($"Weight '{key}' of shape [{string.Join(", ", w.shape)}] does not have the {ranges[^1].End} rows/columns its sub-blocks need along axis {axis}.");
        foreach (var (a, b, bound) in ranges)
        {
            // A local the later Dispose uses: a temporary referenced only by the native call could be finalized during it.
            using var block = w.narrow(axis, a, b - a);
            block.uniform_(-bound, bound, generator);
        }
    }
}
