using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Layers;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>Holds one linear layer's parameters (keys <c>weight</c>, <c>bias</c>) without computing anything.</summary>
internal sealed class LinearShard : nn.Module
{
    private readonly Parameter weight;
    private readonly Parameter? bias;

    public LinearShard(ShardContext s, string prefix, long outFeatures, long inFeatures, bool hasBias, ScalarType dtype, Device device)
        : base(nameof(LinearShard))
    {
        (Prefix, FullWeight, FullBias) = (prefix, new[] { outFeatures, inFeatures }, new[] { outFeatures });
        weight = s.NewParameter(prefix + "weight", FullWeight, dtype, device);
        if (hasBias) bias = s.NewParameter(prefix + "bias", FullBias, dtype, device);
        RegisterComponents();
    }

    public string Prefix { get; }
    public long[] FullWeight { get; }
    public long[] FullBias { get; }
    public Tensor Weight(ShardContext s) => s.Use(Prefix + "weight", weight, FullWeight);
    public Tensor? Bias => bias;
}

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
        if (in_proj.Bias is not null) p = p + in_proj.Bias;
        var parts = p.split(_layout.InSplitOf(plan.ModelSize), -1);
        var gate = mlp_bias is null ? parts[0] : parts[0] + mlp_bias;
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
        if (bias is not null) y = y + bias;
        if (ls is not null) y = ls.call(y);
        return (x + y).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// One model-axis rank's shard of the classic block (<see cref="SequentialBlock"/>): two all-gather/reduce-scatter
/// pairs, attention over the rank's heads and MLP over its slice, token-major [T_r, B, D] in and out; the second input
/// is the token partition.
/// </summary>
internal sealed class ShardedSequentialBlock : nn.Module<Tensor, long[], Tensor>
{
    private readonly Norm norm1, norm2;
    private readonly AttnShard attn;
    private readonly MlpShard mlp;
    private readonly LayerScale? ls1, ls2;
    private readonly ShardContext _s;
    private readonly Activation _act;
    private readonly FusedLayout _layout;

    internal sealed class AttnShard : nn.Module
    {
        public readonly LinearShard qkv, proj;
        public readonly Norm? q_norm, k_norm;

        public AttnShard(BlockOptions o, ShardContext s, string prefix, Device device, ScalarType dtype) : base(nameof(AttnShard))
        {
            long d = o.Dim;
            qkv = new LinearShard(s, prefix + "qkv.", o.Layout.QkvFeatures, d, o.QkvBias, dtype, device);
            if (o.QkNorm)
            {
                q_norm = o.NewNorm(o.HeadDim, device, dtype);
                k_norm = o.NewNorm(o.HeadDim, device, dtype);
            }
            proj = new LinearShard(s, prefix + "proj.", d, d, o.ProjBias, dtype, device);
            RegisterComponents();
        }
    }

    internal sealed class MlpShard : nn.Module
    {
        public readonly LinearShard fc1, fc2;

        public MlpShard(BlockOptions o, ShardContext s, string prefix, Device device, ScalarType dtype) : base(nameof(MlpShard))
        {
            fc1 = new LinearShard(s, prefix + "fc1.", o.MlpDim, o.Dim, o.MlpBias, dtype, device);
            fc2 = new LinearShard(s, prefix + "fc2.", o.Dim, o.MlpDim, o.MlpBias, dtype, device);
            RegisterComponents();
        }
    }

    /// <summary>Creates block <paramref name="index"/>'s shard (parameters uninitialized).</summary>
    public ShardedSequentialBlock(BlockOptions o, int index, ShardContext s, Device device, ScalarType dtype) : base(nameof(ShardedSequentialBlock))
    {
        (_s, _act, _layout) = (s, o.Act, o.Layout);
        string prefix = $"blocks.{index}.";
        norm1 = o.NewNorm(o.Dim, device, dtype);
        attn = new AttnShard(o, s, prefix + "attn.", device, dtype);
        norm2 = o.NewNorm(o.Dim, device, dtype);
        mlp = new MlpShard(o, s, prefix + "mlp.", device, dtype);
        ls1 = o.NewLayerScale(device, dtype);
        ls2 = o.NewLayerScale(device, dtype);
        RegisterComponents();
    }

    /// <summary>[T_r, B, D] → [T_r, B, D] for the token partition <paramref name="counts"/>.</summary>
    public override Tensor forward(Tensor x, long[] counts)
    {
        _s.CheckChunk(x, counts);
        using var scope = torch.NewDisposeScope();
        var comm = _s.Rank.Model;
        var qkv = Regions.AllGatherMatmul(norm1.call(x), attn.qkv.Weight(_s), comm, counts, _s.Mode);    // [T, B, 3A]
        if (attn.qkv.Bias is not null) qkv = qkv + attn.qkv.Bias;
        var parts = qkv.split(_layout.QkvSplitOf(_s.Plan.ModelSize), -1);
        var z = AttentionOps.Attend(parts[0].transpose(0, 1), parts[1].transpose(0, 1), parts[2].transpose(0, 1),
            _s.Plan.HeadsPerRank, attn.q_norm, attn.k_norm).transpose(0, 1);
        var y = Regions.MatmulReduceScatter(z, attn.proj.Weight(_s), comm, counts, _s.Mode);
        if (attn.proj.Bias is not null) y = y + attn.proj.Bias;
        if (ls1 is not null) y = ls1.call(y);
        var x1 = x + y;
        var hdn = Regions.AllGatherMatmul(norm2.call(x1), mlp.fc1.Weight(_s), comm, counts, _s.Mode);
        if (mlp.fc1.Bias is not null) hdn = hdn + mlp.fc1.Bias;
        var m = Regions.MatmulReduceScatter(Act.Apply(hdn, _act), mlp.fc2.Weight(_s), comm, counts, _s.Mode);
        if (mlp.fc2.Bias is not null) m = m + mlp.fc2.Bias;
        if (ls2 is not null) m = ls2.call(m);
        return (x1 + m).MoveToOuterDisposeScope();
    }
}
