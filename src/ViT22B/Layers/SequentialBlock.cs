using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Classic pre-norm ViT block (ViT, SoViT; timm <c>Block</c>): <c>x = x + Attn(Norm1(x)); x = x + Mlp(Norm2(x))</c>.
/// Keys <c>norm1</c>, <c>attn.qkv</c>, <c>attn.q_norm</c>, <c>attn.k_norm</c>, <c>attn.proj</c>, <c>norm2</c>,
/// <c>mlp.fc1</c>, <c>mlp.fc2</c>.
/// </summary>
public sealed class SequentialBlock : nn.Module<Tensor, Tensor>
{
    private readonly Norm norm1, norm2;
    private readonly Attention attn;
    private readonly Mlp mlp;

    /// <summary>Creates the block with options <paramref name="options"/>.</summary>
    public SequentialBlock(BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(SequentialBlock))
    {
        ArgumentNullException.ThrowIfNull(options);
        norm1 = options.NewNorm(options.Dim, device, dtype);
        attn = new Attention(options, device, dtype);
        norm2 = options.NewNorm(options.Dim, device, dtype);
        mlp = new Mlp(options.Dim, options.MlpDim, options.MlpBias, options.Act, device, dtype);
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, N, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var x1 = x + attn.call(norm1.call(x));
        return (x1 + mlp.call(norm2.call(x1))).MoveToOuterDisposeScope();
    }
}
