using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// ViT-22B parallel block (arXiv:2302.05442 §2; timm <c>ParallelScalingBlock</c>):
/// <code>
/// y         = Norm(x)                               one shared pre-norm
/// [U|Q|K|V] = y·W_inᵀ (+ b_U on the U slice)         fused in-projection W_in [F+3D, D], rows mlp | q | k | v
/// Z         = Attn(Norm_q(Q), Norm_k(K), V)          per-head QK-norm over d
/// x'        = x + [Z | GELU(U)]·W_outᵀ + b_out       fused out-projection W_out [D, D+F], columns attn | mlp
/// </code>
/// Keys: <c>in_norm</c>, <c>in_proj.weight</c> (+ <c>in_proj.bias</c> over all rows when <c>qkv_bias</c>, else
/// <c>mlp_bias</c> [F] when <c>mlp_bias</c>), <c>q_norm</c>, <c>k_norm</c>, and either <c>out_proj</c> (fused; one
/// bias, present when <c>proj_bias</c> or <c>mlp_bias</c>) or timm's unfused <c>attn_out_proj</c> (bias iff
/// <c>proj_bias</c>) + <c>mlp_out_proj</c> (bias iff <c>mlp_bias</c>). <see cref="FuseOutProjection"/> converts
/// unfused weights to the fused layout (the two biases add).
/// </summary>
public sealed class ParallelBlock : nn.Module<Tensor, Tensor>
{
    private readonly Norm in_norm;
    private readonly Linear in_proj;
    private readonly Parameter? mlp_bias;
    private readonly Norm? q_norm, k_norm;
    private readonly Linear? out_proj, attn_out_proj, mlp_out_proj;
    private readonly int _heads;
    private readonly long _dim, _mlpDim;
    private readonly Activation _act;

    /// <summary>Creates the block for <paramref name="c"/>.</summary>
    public ParallelBlock(ViTConfig c, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(ParallelBlock))
    {
        (_heads, _dim, _mlpDim, _act) = (c.NumHeads, c.EmbedDim, c.MlpDim, c.Act);
        in_norm = new Norm(c.EmbedDim, c.Norm, c.NormBias, c.NormEps, device, dtype);
        in_proj = nn.Linear(_dim, _mlpDim + 3 * _dim, hasBias: c.QkvBias, device: device, dtype: dtype);
        if (!c.QkvBias && c.MlpBias)
            mlp_bias = Param.Of(torch.zeros(_mlpDim, dtype: dtype, device: device));
        if (c.QkNorm)
        {
            q_norm = new Norm(c.HeadDim, c.Norm, c.NormBias, c.NormEps, device, dtype);
            k_norm = new Norm(c.HeadDim, c.Norm, c.NormBias, c.NormEps, device, dtype);
        }
        if (c.FuseOutProj)
        {
            out_proj = nn.Linear(_dim + _mlpDim, _dim, hasBias: c.ProjBias || c.MlpBias, device: device, dtype: dtype);
        }
        else
        {
            attn_out_proj = nn.Linear(_dim, _dim, hasBias: c.ProjBias, device: device, dtype: dtype);
            mlp_out_proj = nn.Linear(_mlpDim, _dim, hasBias: c.MlpBias, device: device, dtype: dtype);
        }
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, N, D].</summary>
    /// <remarks>When no gradient is recorded the fused weights are applied as two GEMMs over views (rows [mlp] and
    /// [q|k|v] of W_in; columns [attn] and [mlp] of W_out, accumulated in place): on a 2-core CPU one [F+3D]-wide GEMM
    /// ran about 20% slower than the two narrower ones. With autograd the single fused GEMMs are used, since the
    /// backward of a view-sliced weight materializes full-size zero gradients (docs/performance.md, attempts 1 and 6).
    /// </remarks>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var y = in_norm.call(x);
        bool recording = torch.is_grad_enabled() && (y.requires_grad || parameters().Any(q => q.requires_grad));
        var result = recording ? ForwardFused(x, y) : ForwardSplit(x, y);
        return result.MoveToOuterDisposeScope();
    }

    // Training: one GEMM per projection, as the block is written.
    private Tensor ForwardFused(Tensor x, Tensor y)
    {
        var p = in_proj.forward(y).split(new[] { _mlpDim, _dim, _dim, _dim }, -1);
        var u = mlp_bias is null ? p[0] : p[0] + mlp_bias;
        var z = AttentionOps.Attend(p[1], p[2], p[3], _heads, q_norm, k_norm);        // [B, N, D]
        var g = Act.Apply(u, _act);                                                   // [B, N, F]
        var outp = out_proj is not null
            ? out_proj.forward(torch.cat(new[] { z, g }, -1))
            : attn_out_proj!.forward(z) + mlp_out_proj!.forward(g);
        return x + outp;
    }

    // Inference: two GEMMs over views of each fused weight, GELU and the out-projection accumulation in place.
    private Tensor ForwardSplit(Tensor x, Tensor y)
    {
        var w = in_proj.weight!;
        var b = in_proj.bias;
        var u = nn.functional.linear(y, w.narrow(0, 0, _mlpDim), b?.narrow(0, 0, _mlpDim) ?? mlp_bias);      // [B, N, F]
        var qkv = nn.functional.linear(y, w.narrow(0, _mlpDim, 3 * _dim), b?.narrow(0, _mlpDim, 3 * _dim));  // [B, N, 3D]
        var p = qkv.chunk(3, -1);
        var z = AttentionOps.Attend(p[0], p[1], p[2], _heads, q_norm, k_norm);                               // [B, N, D]
        var g = Act.Apply(u, _act, inPlace: true);                                                           // [B, N, F]
        Tensor outp;
        if (out_proj is not null)
        {
            var wo = out_proj.weight!;
            outp = nn.functional.linear(z, wo.narrow(1, 0, _dim), out_proj.bias);
            AddLinear(outp, g, wo.narrow(1, _dim, _mlpDim));
        }
        else
        {
            outp = attn_out_proj!.forward(z);
            AddLinear(outp, g, mlp_out_proj!.weight!);
            if (mlp_out_proj.bias is not null) outp.add_(mlp_out_proj.bias);
        }
        return x + outp;
    }

    // acc += x·Wᵀ in place (no gradient is recorded on this path).
    private static void AddLinear(Tensor acc, Tensor x, Tensor w) =>
        acc.view(-1, acc.shape[^1]).addmm_(x.reshape(-1, x.shape[^1]), w.t());

    /// <summary>
    /// Rewrites a state dict of unfused parallel blocks (timm's default <c>attn_out_proj</c> + <c>mlp_out_proj</c>)
    /// into the fused layout: <c>out_proj.weight = [W_attn_out | W_mlp_out]</c> (attention columns first) and
    /// <c>out_proj.bias = b_attn_out + b_mlp_out</c> (SPEC.md §2.3). Keys of other modules pass through. The result
    /// holds new tensors for the fused keys and the caller's tensors otherwise.
    /// </summary>
    public static Dictionary<string, Tensor> FuseOutProjection(IReadOnlyDictionary<string, Tensor> stateDict)
    {
        ArgumentNullException.ThrowIfNull(stateDict);
        var result = new Dictionary<string, Tensor>();
        foreach (var (key, value) in stateDict)
        {
            if (key.EndsWith("mlp_out_proj.weight", StringComparison.Ordinal) || key.EndsWith("mlp_out_proj.bias", StringComparison.Ordinal))
                continue;
            if (key.EndsWith("attn_out_proj.weight", StringComparison.Ordinal))
            {
                string prefix = key[..^"attn_out_proj.weight".Length];
                if (!stateDict.TryGetValue(prefix + "mlp_out_proj.weight", out var mlpW))
                    throw new KeyNotFoundException($"'{key}' has no matching '{prefix}mlp_out_proj.weight'.");
                using (torch.no_grad()) result[prefix + "out_proj.weight"] = torch.cat(new[] { value, mlpW }, 1);
                continue;
            }
            if (key.EndsWith("attn_out_proj.bias", StringComparison.Ordinal))
            {
                string prefix = key[..^"attn_out_proj.bias".Length];
                using (torch.no_grad())
                    result[prefix + "out_proj.bias"] = stateDict.TryGetValue(prefix + "mlp_out_proj.bias", out var mb) ? value + mb : value.clone();
                continue;
            }
            result[key] = value;
        }
        // A lone mlp_out_proj.bias (no attention-out bias) becomes the fused bias.
        foreach (var (key, value) in stateDict)
        {
            if (!key.EndsWith("mlp_out_proj.bias", StringComparison.Ordinal)) continue;
            string prefix = key[..^"mlp_out_proj.bias".Length];
            if (!stateDict.ContainsKey(prefix + "attn_out_proj.bias"))
                using (torch.no_grad()) result[prefix + "out_proj.bias"] = value.clone();
        }
        return result;
    }
}
