using TorchSharp;
using ViT22B.Layers;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

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
        if (attn.qkv.Bias is not null) qkv = qkv.Plus(attn.qkv.Bias);
        var parts = qkv.split(_layout.QkvSplitOf(_s.Plan.ModelSize), -1);
        var z = AttentionOps.Attend(parts[0].transpose(0, 1), parts[1].transpose(0, 1), parts[2].transpose(0, 1),
            _s.Plan.HeadsPerRank, attn.q_norm, attn.k_norm).transpose(0, 1);
        var y = Regions.MatmulReduceScatter(z, attn.proj.Weight(_s), comm, counts, _s.Mode);
        if (attn.proj.Bias is not null) y = y.Plus(attn.proj.Bias);
        if (ls1 is not null) y = ls1.call(y);
        var x1 = x.Plus(y);
        var hdn = Regions.AllGatherMatmul(norm2.call(x1), mlp.fc1.Weight(_s), comm, counts, _s.Mode);
        if (mlp.fc1.Bias is not null) hdn = hdn.Plus(mlp.fc1.Bias);
        var m = Regions.MatmulReduceScatter(Act.Apply(hdn, _act), mlp.fc2.Weight(_s), comm, counts, _s.Mode);
        if (mlp.fc2.Bias is not null) m = m.Plus(mlp.fc2.Bias);
        if (ls2 is not null) m = ls2.call(m);
        return x1.Plus(m).MoveToOuterDisposeScope();
    }
}
