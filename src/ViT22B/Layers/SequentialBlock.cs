using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Classic pre-norm ViT block (ViT, SoViT; timm <c>Block</c>): <c>x = x + Attn(Norm1(x)); x = x + Mlp(Norm2(x))</c>,
/// each branch scaled by a <see cref="LayerScale"/> when <see cref="BlockOptions.InitValues"/> is set (DeiT-3, DINOv2).
/// Keys <c>norm1</c>, <c>attn.qkv</c>, <c>attn.q_norm</c>, <c>attn.k_norm</c>, <c>attn.proj</c>, <c>ls1.gamma</c>,
/// <c>norm2</c>, <c>mlp.fc1</c>, <c>mlp.fc2</c>, <c>ls2.gamma</c>.
/// </summary>
public sealed class SequentialBlock : nn.Module<Tensor, Tensor>
{
    private readonly Norm norm1, norm2;
    private readonly Attention attn;
    private readonly Mlp mlp;
    private readonly LayerScale? ls1, ls2;

    /// <summary>Creates the block with options <paramref name="options"/>.</summary>
    public SequentialBlock(BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(SequentialBlock))
    {
        ArgumentNullException.ThrowIfNull(options);
        norm1 = options.NewNorm(options.Dim, device, dtype);
        attn = new Attention(options, device, dtype);
        norm2 = options.NewNorm(options.Dim, device, dtype);
        mlp = new Mlp(options.Dim, options.MlpDim, options.MlpBias, options.Act, device, dtype);
        ls1 = options.NewLayerScale(device, dtype);
        ls2 = options.NewLayerScale(device, dtype);
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, N, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var a = attn.call(norm1.call(x));
        var x1 = x.Plus(ls1 is null ? a : ls1.call(a));
        var m = mlp.call(norm2.call(x1));
        return x1.Plus(ls2 is null ? m : ls2.call(m)).MoveToOuterDisposeScope();
    }
}
