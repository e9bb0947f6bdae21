using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>
/// big_vision's initialization (SPEC.md §6; timm <c>init_weights_vit_jax</c>), applied by key:
/// dense kernels xavier-uniform, with each sub-matrix of a fused projection (q, k, v, MLP-in; attention-out,
/// MLP-out; MAP k, v) using its own fan-in/fan-out as if unfused; MLP biases normal(1e-6), other biases zero;
/// patch embedding lecun-normal (truncated); learned position embedding normal(1/√D); class token zero; MAP probe
/// truncated normal(D^-1/2); classifier zero; norms scale one, bias zero. Uses TorchSharp's default generator.
/// </summary>
public static class Initialization
{
    /// <summary>Re-initializes every parameter of <paramref name="model"/>.</summary>
    public static void BigVision(VisionTransformer model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var c = model.Config;
        long d = c.EmbedDim, f = c.MlpDim;
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
            else if (key == "attn_pool.latent") nn.init.trunc_normal_(p, 0, 1.0 / Math.Sqrt(d), -2, 2);
            else if (key.StartsWith("head.", StringComparison.Ordinal)) p.zero_();
            else if (leaf == "weight" && p.dim() == 2)
            {
                if (key.EndsWith("in_proj.weight", StringComparison.Ordinal)) Xavier(p, 0, (f, d), (d, d), (d, d), (d, d));
                else if (key.EndsWith("out_proj.weight", StringComparison.Ordinal) && p.shape[1] == d + f) Xavier(p, 1, (d, d), (d, f));
                else if (key.EndsWith("qkv.weight", StringComparison.Ordinal)) Xavier(p, 0, (d, d), (d, d), (d, d));
                else if (key.EndsWith("kv.weight", StringComparison.Ordinal)) Xavier(p, 0, (d, d), (d, d));
                else Xavier(p, 0, (p.shape[0], p.shape[1]));
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

    // Xavier-uniform on consecutive blocks of a 2-D weight along `axis`; each block is (out, in).
    private static void Xavier(Tensor w, int axis, params (long Out, long In)[] blocks)
    {
        long start = 0;
        foreach (var (o, i) in blocks)
        {
            long len = axis == 0 ? o : i;
            double bound = Math.Sqrt(6.0 / (o + i));
            w.narrow(axis, start, len).uniform_(-bound, bound);
            start += len;
        }
    }
}
