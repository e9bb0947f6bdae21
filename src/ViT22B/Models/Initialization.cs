using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>
/// big_vision's initialization (SPEC.md §6; timm <c>init_weights_vit_jax</c>), applied by key:
/// dense kernels xavier-uniform, with each sub-matrix of a fused projection (q, k, v, MLP-in; attention-out,
/// MLP-out; MAP k, v) using its own fan-in/fan-out as if unfused; MLP biases normal(1e-6), other biases zero;
/// patch embedding lecun-normal (truncated); learned position embedding normal(1/√D); class token zero; MAP probe
/// truncated normal(D^-1/2); classifier zero; norms scale one, bias zero. Uses TorchSharp's default generator.
/// <para>Sharded modules pass a <c>layout</c> that says which part of each full parameter they hold; the bounds are
/// then those of the full parameter, so a sharded model is initialized from the same distribution as the full one.</para>
/// </summary>
public static class Initialization
{
    /// <summary>Re-initializes every parameter of <paramref name="model"/>.</summary>
    /// <param name="model">The model (or a rank's shard of it).</param>
    /// <param name="layout">For sharded parameters, the part of the full parameter each one holds (null = whole).</param>
    public static void BigVision(VisionTransformer model, Func<string, ShardSpec?>? layout = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        var c = model.Config;
        long d = c.EmbedDim, f = c.MlpDim;
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in model.named_parameters())
        {
            var spec = layout?.Invoke(key) ?? ShardSpec.Whole(p.shape);
            if (!spec.LocalShape.SequenceEqual(p.shape))
                throw new InvalidOperationException($"Parameter '{key}' has shape [{string.Join(", ", p.shape)}] but its layout describes [{string.Join(", ", spec.LocalShape)}].");
            var full = spec.FullShape;
            string leaf = key[(key.LastIndexOf('.') + 1)..];
            if (key == "patch_embed.proj.weight")
            {
                double fanIn = c.InChans * (double)c.PatchSize * c.PatchSize;
                double std = Math.Sqrt(1.0 / fanIn) / .87962566103423978;   // Flax lecun_normal: truncated at ±2σ
                nn.init.trunc_normal_(p, 0, std, -2 * std, 2 * std);
            }
            else if (key == "pos_embed") p.normal_(0, 1.0 / Math.Sqrt(d));
            else if (key == "cls_token") p.zero_();
            else if (key == "attn_pool.latent") nn.init.trunc_normal_(p, 0, 1.0 / Math.Sqrt(d), -2, 2);
            else if (key.StartsWith("head.", StringComparison.Ordinal)) p.zero_();
            else if (leaf == "weight" && p.dim() == 2)
            {
                // Sub-blocks (out, in) along an axis of the FULL weight, each xavier-uniform with its own fans.
                var (axis, blocks) =
                    key.EndsWith("in_proj.weight", StringComparison.Ordinal) ? (0, new[] { (f, d), (d, d), (d, d), (d, d) })
                    : key.EndsWith("out_proj.weight", StringComparison.Ordinal) && full[1] == d + f ? (1, new[] { (d, d), (d, f) })
                    : key.EndsWith("qkv.weight", StringComparison.Ordinal) ? (0, new[] { (d, d), (d, d), (d, d) })
                    : key.EndsWith("kv.weight", StringComparison.Ordinal) ? (0, new[] { (d, d), (d, d) })
                    : (0, new[] { (full[0], full[1]) });
                Xavier(p, spec, axis, blocks);
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

    // Xavier-uniform on consecutive sub-blocks (out, in) of a full 2-D weight along `axis`. When the shard is cut
    // along the same axis, each local range is mapped back to its full index to find its sub-block.
    private static void Xavier(Tensor w, ShardSpec spec, int axis, (long Out, long In)[] blocks)
    {
        var ranges = new List<(long Start, long End, double Bound)>();
        long start = 0;
        foreach (var (o, i) in blocks)
        {
            long len = axis == 0 ? o : i;
            ranges.Add((start, start + len, Math.Sqrt(6.0 / (o + i))));
            start += len;
        }
        if (spec.Dim != axis || spec.IsWhole)
        {
            if (spec.Dim == axis && start != w.shape[axis])
                throw new InvalidOperationException($"Weight of shape [{string.Join(", ", w.shape)}] does not have the {start} rows/columns its sub-blocks need along axis {axis}.");
            foreach (var (a, b, bound) in ranges) w.narrow(axis, a, b - a).uniform_(-bound, bound);
            return;
        }
        long local = 0;
        foreach (var (segStart, segLen) in spec.Segments)
        {
            foreach (var (a, b, bound) in ranges)
            {
                long lo = Math.Max(a, segStart), hi = Math.Min(b, segStart + segLen);
                if (hi > lo) w.narrow(axis, local + lo - segStart, hi - lo).uniform_(-bound, bound);
            }
            local += segLen;
        }
    }
}
