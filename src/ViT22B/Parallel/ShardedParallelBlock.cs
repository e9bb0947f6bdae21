using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Layers;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// One model-axis rank's shard of the ViT-22B parallel block (<see cref="ParallelBlock"/>), on token-major
/// activations: input and output are this rank's token chunk [T_r, B, D].
/// <code>
/// y       = Norm(x_r)                                        local tokens
/// [U|Q|K|V]_r = AllGatherMatmul(y, W_in,r)                   all tokens, own heads and MLP slice
/// Z_r     = Attn(Norm_q Q_r, Norm_k K_r, V_r); G_r = GELU(U_r + b_U,r)
/// x_r'    = x_r + MatmulReduceScatter([Z_r | G_r], W_out,r) + b_out
/// </code>
/// Keys and shapes follow <see cref="ShardingPlan"/>; the second input is the token partition (every rank's T_r).
/// </summary>
internal sealed class ShardedParallelBlock : nn.Module<Tensor, long[], Tensor>
{
    private readonly Norm in_norm;
    private readonly LinearShard in_proj;
    private readonly Parameter? mlp_bias;
    private readonly Norm? q_norm, k_norm;
    private readonly LinearShard? out_proj, attn_out_proj, mlp_out_proj;
    private readonly LayerScale? ls;
    private readonly ShardContext _s;
    private readonly FusedLayout _layout;
    private readonly Activation _act;

    /// <summary>Creates block <paramref name="index"/>'s shard (parameters uninitialized).</summary>
    public ShardedParallelBlock(BlockOptions o, int index, ShardContext s, Device device, ScalarType dtype) : base(nameof(ShardedParallelBlock))
    {
        (_s, _act, _layout) = (s, o.Act, o.Layout);
        var l = _layout;
        string prefix = $"blocks.{index}.";
        long d = o.Dim, f = o.MlpDim;
        in_norm = o.NewNorm(d, device, dtype);
        in_proj = new LinearShard(s, prefix + "in_proj.", l.InFeatures, d, l.InProjBias, dtype, device);
        if (l.SeparateMlpBias) mlp_bias = s.NewParameter(prefix + "mlp_bias", new[] { f }, dtype, device);
        if (o.QkNorm)
        {
            q_norm = o.NewNorm(o.HeadDim, device, dtype);
            k_norm = o.NewNorm(o.HeadDim, device, dtype);
        }
        if (l.FuseOutProj) out_proj = new LinearShard(s, prefix + "out_proj.", d, l.OutFeatures, l.OutProjBias, dtype, device);
        else
        {
            attn_out_proj = new LinearShard(s, prefix + "attn_out_proj.", d, d, l.AttnOutProjBias, dtype, device);
            mlp_out_proj = new LinearShard(s, prefix + "mlp_out_proj.", d, f, l.MlpOutProjBias, dtype, device);
        }
        ls = o.NewLayerScale(device, dtype);
        RegisterComponents();
    }

    /// <summary>[T_r, B, D] → [T_r, B, D] for the token partition <paramref name="counts"/>.</summary>
    public override Tensor forward(Tensor x, long[] counts)
    {
        _s.CheckChunk(x, counts);
        using var scope = torch.NewDisposeScope();
        var plan = _s.Plan;
        var comm = _s.Rank.Model;
        var p = Regions.AllGatherMatmul(in_norm.call(x), in_proj.Weight(_s), comm, counts, _s.Mode);   // [T, B, U+3A]
        if (in_proj.Bias is not null) p = p.Plus(in_proj.Bias);
        var parts = p.split(_layout.InSplitOf(plan.ModelSize), -1);
        var gate = mlp_bias is null ? parts[0] : parts[0].Plus(mlp_bias);
        var z = AttentionOps.Attend(parts[1].transpose(0, 1), parts[2].transpose(0, 1), parts[3].transpose(0, 1),
            plan.HeadsPerRank, q_norm, k_norm).transpose(0, 1);                                        // [T, B, A]
        var h = torch.cat(new[] { z, Act.Apply(gate, _act) }, -1);                                       // [T, B, A+U]
        Tensor w;
        Tensor? bias;
        if (out_proj is not null) (w, bias) = (out_proj.Weight(_s), out_proj.Bias);
        else
        {
            w = torch.cat(new[] { attn_out_proj!.Weight(_s), mlp_out_proj!.Weight(_s) }, 1);
            bias = FusedLayout.FuseOutBias(attn_out_proj.Bias, mlp_out_proj.Bias);
        }
        var y = Regions.MatmulReduceScatter(h, w, comm, counts, _s.Mode);                              // [T_r, B, D]
        if (bias is not null) y = y.Plus(bias);
        if (ls is not null) y = ls.call(y);
        return x.Plus(y).MoveToOuterDisposeScope();
    }
}
