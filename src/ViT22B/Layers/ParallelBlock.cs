using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Torch;
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
/// Keys: <c>in_norm</c>, <c>in_proj</c>, <c>mlp_bias</c>, <c>q_norm</c>, <c>k_norm</c>, and either <c>out_proj</c>
/// (fused) or timm's unfused <c>attn_out_proj</c> + <c>mlp_out_proj</c>, and <c>ls.gamma</c> when a
/// <see cref="LayerScale"/> scales the summed branches (<see cref="BlockOptions.InitValues"/>; timm has the same single
/// <c>ls</c>); which rows and columns hold what and which biases exist is <see cref="FusedLayout"/>'s.
/// <see cref="FuseOutProjection"/> converts unfused weights to the fused layout (the two biases add).
/// </summary>
public sealed class ParallelBlock : nn.Module<Tensor, Tensor>
{
    private readonly Norm in_norm;
    private readonly Linear in_proj;
    private readonly Parameter? mlp_bias;
    private readonly Norm? q_norm, k_norm;
    private readonly Linear? out_proj, attn_out_proj, mlp_out_proj;
    private readonly LayerScale? ls;
    private readonly int _heads;
    private readonly FusedLayout _layout;
    private readonly Activation _act;

    /// <summary>Creates the block with options <paramref name="options"/>.</summary>
    public ParallelBlock(BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(ParallelBlock))
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Check();
        if (!options.Layout.ParallelBiasesAgree) throw new ArgumentException($"Block options: {FusedLayout.ParallelBiasRule}", nameof(options));
        (_heads, _layout, _act) = (options.NumHeads, options.Layout, options.Act);
        var l = _layout;
        in_norm = options.NewNorm(options.Dim, device, dtype);
        in_proj = nn.Linear(options.Dim, l.InFeatures, hasBias: l.InProjBias, device: device, dtype: dtype);
        if (l.SeparateMlpBias) mlp_bias = Param.Of(torch.zeros(options.MlpDim, dtype: dtype, device: device));
        if (options.QkNorm)
        {
            q_norm = options.NewNorm(options.HeadDim, device, dtype);
            k_norm = options.NewNorm(options.HeadDim, device, dtype);
        }
        if (l.FuseOutProj)
        {
            out_proj = nn.Linear(l.OutFeatures, options.Dim, hasBias: l.OutProjBias, device: device, dtype: dtype);
        }
        else
        {
            attn_out_proj = nn.Linear(options.Dim, options.Dim, hasBias: l.AttnOutProjBias, device: device, dtype: dtype);
            mlp_out_proj = nn.Linear(options.MlpDim, options.Dim, hasBias: l.MlpOutProjBias, device: device, dtype: dtype);
        }
        ls = options.NewLayerScale(device, dtype);
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, N, D].</summary>
    /// <remarks>Without autograd the same arithmetic runs as <see cref="ParallelBlockInference"/>'s narrower GEMMs
    /// (faster on small CPUs); with autograd, as written below.</remarks>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var y = in_norm.call(x);                                                               // y = Norm(x)
        bool recording = torch.is_grad_enabled() && (y.requires_grad || parameters().Any(q => q.requires_grad));
        if (!recording)
            return ParallelBlockInference.Forward(x, y, in_proj, mlp_bias, out_proj, attn_out_proj, mlp_out_proj, ls,
                _layout, _heads, q_norm, k_norm, _act).MoveToOuterDisposeScope();
        var p = in_proj.forward(y).split(_layout.InSplit, -1);                                 // [U|Q|K|V] = y·W_inᵀ
        var u = mlp_bias is null ? p[0] : p[0].Plus(mlp_bias);
        var z = AttentionOps.Attend(p[1], p[2], p[3], _heads, q_norm, k_norm);                 // Z = Attn(Norm_q Q, Norm_k K, V)
        var g = Act.Apply(u, _act);                                                            // GELU(U)
        var outp = out_proj is not null
            ? out_proj.forward(torch.cat(new[] { z, g }, -1))                                  // [Z | GELU(U)]·W_outᵀ + b_out
            : attn_out_proj!.forward(z).Plus(mlp_out_proj!.forward(g));
        if (ls is not null) outp = ls.call(outp);                                              // LayerScale (optional)
        return x.Plus(outp).MoveToOuterDisposeScope();                                           // x' = x + …
    }

    /// <summary>
    /// Rewrites a state dict of unfused parallel blocks (timm's default <c>attn_out_proj</c> + <c>mlp_out_proj</c>)
    /// into the fused layout: <c>out_proj.weight = [W_attn_out | W_mlp_out]</c> (attention columns first) and
    /// <c>out_proj.bias = b_attn_out + b_mlp_out</c>. Keys of other modules pass through. The result
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
                using (torch.no_grad()) result[prefix + "out_proj.weight"] = FusedLayout.FuseOutWeight(value, mlpW);
                continue;
            }
            if (key.EndsWith("attn_out_proj.bias", StringComparison.Ordinal))
            {
                string prefix = key[..^"attn_out_proj.bias".Length];
                using (torch.no_grad())
                    result[prefix + "out_proj.bias"] = stateDict.TryGetValue(prefix + "mlp_out_proj.bias", out var mb) ? FusedLayout.FuseOutBias(value, mb)! : value.clone();
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
