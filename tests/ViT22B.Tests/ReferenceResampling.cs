using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Tests;

/// <summary>
/// PyTorch's antialiased bicubic resize (<c>interpolate(mode='bicubic', antialias=True, align_corners=False)</c>)
/// written out in float64 from its definition in ATen's <c>UpSampleKernel.cpp</c>
/// (<c>_compute_indices_min_size_weights_aa</c> with the Keys cubic filter, a = −0.5): for output index i, with
/// scale = in / out, center = scale·(i + ½), support = 2·max(scale, 1), the input indices
/// [max(⌊center − support + ½⌋, 0), min(⌊center + support + ½⌋, in)) are weighted by
/// filter((j − center + ½) / max(scale, 1)), normalised to sum 1. Separable: rows, then columns. Also PyTorch's
/// bilinear resize without antialiasing (<c>mode='bilinear', align_corners=False</c>, ATen's <c>UpSample.h</c>: source
/// position scale·(i + ½) − ½, clamped at 0, between its floor and the next index, the last index repeated at the edge).
/// </summary>
internal static class ReferenceResampling
{
    private static double Cubic(double x)
    {
        const double a = -0.5;
        x = Math.Abs(x);
        if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
        if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
        return 0;
    }

    /// <summary>The [out, in] matrix that resizes a vector of length <paramref name="input"/> to <paramref name="output"/>.</summary>
    public static double[,] Weights(long input, long output)
    {
        var w = new double[output, input];
        double scale = (double)input / output;
        double support = 2.0 * Math.Max(scale, 1.0), invScale = scale >= 1 ? 1.0 / scale : 1.0;
        for (long i = 0; i < output; i++)
        {
            double center = scale * (i + 0.5);
            long lo = Math.Max((long)(center - support + 0.5), 0), hi = Math.Min((long)(center + support + 0.5), input);
            double total = 0;
            for (long j = lo; j < hi; j++) total += w[i, j] = Cubic((j - center + 0.5) * invScale);
            for (long j = lo; j < hi; j++) w[i, j] /= total;
        }
        return w;
    }

    /// <summary>The [out, in] matrix of the bilinear resize without antialiasing.</summary>
    public static double[,] BilinearWeights(long input, long output)
    {
        var w = new double[output, input];
        double scale = (double)input / output;
        for (long i = 0; i < output; i++)
        {
            double source = Math.Max(scale * (i + 0.5) - 0.5, 0);
            long lo = Math.Min((long)Math.Floor(source), input - 1), hi = lo < input - 1 ? lo + 1 : lo;
            double lambda = Math.Clamp(source - lo, 0, 1);
            w[i, lo] += 1 - lambda;
            w[i, hi] += lambda;
        }
        return w;
    }

    /// <summary>Resizes [..., H, W] to [..., outH, outW] in float64 (bicubic antialiased, or bilinear).</summary>
    public static Tensor Resize(Tensor x, long outH, long outW, bool bilinear = false)
    {
        using var scope = torch.NewDisposeScope();   // keeps the temporaries reachable through each native call (docs/torchsharp-notes.md)
        long h = x.shape[^2], w = x.shape[^1];
        var wh = torch.tensor(bilinear ? BilinearWeights(h, outH) : Weights(h, outH), dtype: ScalarType.Float64);
        var ww = torch.tensor(bilinear ? BilinearWeights(w, outW) : Weights(w, outW), dtype: ScalarType.Float64);
        return wh.matmul(x.to(ScalarType.Float64)).matmul(ww.t()).MoveToOuterDisposeScope();
    }

    /// <summary>A position embedding [1, prefix + g0·g0, D] on a new g × g grid, prefix slots kept (timm
    /// <c>resample_abs_pos_embed</c>).</summary>
    public static Tensor PositionEmbedding(Tensor pos, int prefix, long oldGrid, long newGrid) => PositionEmbedding(pos, prefix, oldGrid, newGrid, newGrid);

    /// <summary>As above, onto a gh × gw grid.</summary>
    public static Tensor PositionEmbedding(Tensor pos, int prefix, long oldGrid, long gh, long gw, bool bilinear = false)
    {
        using var scope = torch.NewDisposeScope();
        long d = pos.shape[2];
        var p = pos.to(ScalarType.Float64);
        var grid = p.narrow(1, prefix, oldGrid * oldGrid).reshape(oldGrid, oldGrid, d).permute(2, 0, 1);   // [D, g0, g0]
        var resized = Resize(grid, gh, gw, bilinear).permute(1, 2, 0).reshape(1, gh * gw, d);
        return (prefix > 0 ? torch.cat(new[] { p.narrow(1, 0, prefix), resized }, 1) : resized).MoveToOuterDisposeScope();
    }
}
