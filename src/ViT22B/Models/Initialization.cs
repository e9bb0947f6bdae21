using TorchSharp;
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
    /// <summary>Ranges <c>[Start, End)</c> along one axis of a full 2-D weight, each xavier-uniform with its bound.</summary>
    internal delegate void XavierFill(string key, Tensor weight, int axis, IReadOnlyList<(long Start, long End, double Bound)> ranges);

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
        var c = model.Config;
        long d = c.EmbedDim;
        var layout = c.BlockOptions.Layout;
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in model.named_parameters())
        {
            string leaf = key[(key.LastIndexOf('.') + 1)..];
            if (key == "patch_embed.proj.weight")
            {
                double fanIn = c.InChans * (double)c.PatchSize * c.PatchSize;
                double std = Math.Sqrt(1.0 / fanIn) / .87962566103423978;   // Flax lecun_normal: truncated at ±2σ
                nn.init.trunc_normal_(p, 0, std, -2 * std, 2 * std);
            }
            else if (key == "pos_embed") p.normal_(0, 1.0 / Math.Sqrt(d));
            else if (key == "cls_token") p.zero_();
            else if (key == "reg_token") p.normal_(0, 1e-6);                 // timm's init for register tokens
            else if (key == "attn_pool.latent") nn.init.trunc_normal_(p, 0, 1.0 / Math.Sqrt(d), -2, 2);
            else if (key.StartsWith("head.", StringComparison.Ordinal)) p.zero_();
            else if (leaf == "weight" && p.dim() == 2)
            {
                // Sub-blocks (out, in) along an axis of the FULL weight, each xavier-uniform with its own fans.
                var full = fullShapeOf(key);
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
                xavier(key, p, axis, ranges);
            }
            else if (leaf == "bias" || leaf == "mlp_bias")
            {
                bool isMlp = key.Contains("mlp", StringComparison.Ordinal) && !key.Contains("norm", StringComparison.Ordinal);
                if (isMlp) p.normal_(0, 1e-6);
                else p.zero_();
            }
            // 1-D "weight" parameters are norm scales: created as ones.
        }
    }

    /// <summary>Fills <paramref name="ranges"/> of <paramref name="w"/> along <paramref name="axis"/> as they lie in the full
    /// weight (the whole weight, or a shard cut along another axis).</summary>
    internal static void FillWhole(string key, Tensor w, int axis, IReadOnlyList<(long Start, long End, double Bound)> ranges)
    {
        if (ranges[^1].End != w.shape[axis])
            throw new InvalidOperationException($"Weight '{key}' of shape [{string.Join(", ", w.shape)}] does not have the {ranges[^1].End} rows/columns its sub-blocks need along axis {axis}.");
        foreach (var (a, b, bound) in ranges)
        {
            // A local the later Dispose uses: a temporary referenced only by the native call could be finalized during it.
            using var block = w.narrow(axis, a, b - a);
            block.uniform_(-bound, bound);
        }
    }
}
