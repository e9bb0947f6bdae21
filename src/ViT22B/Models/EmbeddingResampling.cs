using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>
/// Resampling of learned embeddings to another geometry, as timm does it when a checkpoint meets a model of another
/// image or patch size: the absolute position embedding over a new patch grid (timm <c>resample_abs_pos_embed</c>:
/// bicubic with antialiasing unless another <see cref="ResampleFilter"/> is asked for, prefix slots kept as they are)
/// and the patch-embedding kernel to a new patch size (FlexiViT's pseudo-inverse resize, timm
/// <c>resample_patch_embed</c>, with the same filter). Both work in float32 as timm does, or in float64 for float64
/// tensors.
/// </summary>
internal static class EmbeddingResampling
{
    private static ScalarType WorkType(Tensor t) => t.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;

    /// <summary>The filter in words, for load reports.</summary>
    public static string Describe(ResampleFilter filter) => filter == ResampleFilter.Bilinear ? "bilinear" : "bicubic, antialiased";

    // torch.nn.functional.interpolate with the filter (align_corners=False, as timm).
    private static Tensor Resize(Tensor x, long h, long w, ResampleFilter filter) => filter == ResampleFilter.Bilinear
        ? nn.functional.interpolate(x, new[] { h, w }, mode: InterpolationMode.Bilinear, align_corners: false, antialias: false)
        : nn.functional.interpolate(x, new[] { h, w }, mode: InterpolationMode.Bicubic, align_corners: false, antialias: true);

    /// <summary>[1, prefix + oldH·oldW, D] → [1, prefix + newH·newW, D].</summary>
    public static Tensor PositionEmbedding(Tensor pos, int prefix, (long H, long W) oldGrid, (long H, long W) newGrid, ResampleFilter filter = ResampleFilter.BicubicAntialiased)
    {
        long d = pos.shape[2];
        if (pos.shape[1] != prefix + oldGrid.H * oldGrid.W)
            throw new ArgumentException($"Position embedding of {pos.shape[1]} slots is not {prefix} prefix slots plus a {oldGrid.H}×{oldGrid.W} grid.", nameof(pos));
        using var scope = torch.NewDisposeScope();
        var grid = pos.narrow(1, prefix, oldGrid.H * oldGrid.W).to(WorkType(pos))
            .reshape(1, oldGrid.H, oldGrid.W, d).permute(0, 3, 1, 2);
        var resized = Resize(grid, newGrid.H, newGrid.W, filter)
            .permute(0, 2, 3, 1).reshape(1, newGrid.H * newGrid.W, d).to(pos.dtype);
        var result = prefix > 0 ? torch.cat(new[] { pos.narrow(1, 0, prefix), resized }, 1) : resized;
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Patch-embedding kernel [O, C, ph, pw] → [O, C, newH, newW] such that a patch resized (with the filter) to
    /// the new size meets the new kernel as the original patch met the old one, in the least-squares sense: with R the
    /// [newH·newW, ph·pw] matrix that resizes a flattened patch, the new kernel is pinv(R)ᵀ applied to the old one.
    /// </summary>
    public static Tensor PatchEmbedding(Tensor kernel, long newH, long newW, ResampleFilter filter = ResampleFilter.BicubicAntialiased)
    {
        long o = kernel.shape[0], c = kernel.shape[1], ph = kernel.shape[2], pw = kernel.shape[3];
        using var scope = torch.NewDisposeScope();
        var work = WorkType(kernel);
        long oldTotal = ph * pw, newTotal = newH * newW;
        var basis = torch.eye(oldTotal, dtype: work, device: kernel.device).reshape(oldTotal, 1, ph, pw);
        var resize = Resize(basis, newH, newW, filter)
            .squeeze(1).permute(1, 2, 0).reshape(newTotal, oldTotal);                       // R: old patch → new patch
        var pinv = torch.linalg.pinv(resize);                                                 // [old, new]
        var result = kernel.to(work).reshape(o, c, oldTotal).matmul(pinv).reshape(o, c, newH, newW).to(kernel.dtype);
        return result.MoveToOuterDisposeScope();
    }
}
