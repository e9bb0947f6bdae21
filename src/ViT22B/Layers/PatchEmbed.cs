using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Patch embedding: a P×P convolution with stride P, [B, C, H, W] → [B, (H/P)·(W/P), D], patches in row-major
/// order (timm <c>PatchEmbed</c>; key <c>proj.weight</c> [D, C, P, P], <c>proj.bias</c>).
/// </summary>
public sealed class PatchEmbed : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d proj;

    /// <summary>Creates the embedding for <paramref name="inChans"/> channels.</summary>
    public PatchEmbed(long inChans, long dim, long patch, bool bias, Device? device = null, ScalarType dtype = ScalarType.Float32)
        : base(nameof(PatchEmbed))
    {
        proj = nn.Conv2d(inChans, dim, kernel_size: (patch, patch), stride: (patch, patch), bias: bias, device: device, dtype: dtype);
        RegisterComponents();
    }

    /// <summary>[B, C, H, W] → [B, N, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        return proj.forward(x).flatten(2).transpose(1, 2).MoveToOuterDisposeScope();
    }
}
