using TorchSharp.Modules;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Per-channel scaling of a residual branch, <c>x · γ</c> with γ [D] initialized to a small constant (CaiT's
/// LayerScale, timm <c>LayerScale</c>; key <c>gamma</c>). DeiT-3 and DINOv2 use it on both branches of the classic
/// block; the parallel block has one on its summed output, as timm's <c>ParallelScalingBlock</c> does.
/// </summary>
public sealed class LayerScale : nn.Module<Tensor, Tensor>
{
    private readonly Parameter gamma;

    /// <summary>Creates the scale over <paramref name="dim"/> channels, every entry <paramref name="initValues"/>.</summary>
    public LayerScale(long dim, double initValues, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(LayerScale))
    {
        gamma = Param.Of(ScalarMath.Full(new[] { dim }, initValues, dtype, device));
        RegisterComponents();
    }

    /// <summary>[..., D] → [..., D].</summary>
    public override Tensor forward(Tensor x) => x * gamma;

    /// <summary>Scales <paramref name="x"/> in place (only where no gradient flows through it).</summary>
    internal Tensor ScaleInPlace(Tensor x) => x.mul_(gamma);
}
