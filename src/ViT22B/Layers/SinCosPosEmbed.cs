using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// big_vision <c>posemb_sincos_2d</c>: for a grid of h×w patches (row-major) and width D,
/// ω_i = 1 / 10000^(i/(D/4 − 1)), i = 0…D/4−1, and each patch at (y, x) gets [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)].
/// </summary>
public static class SinCosPosEmbed
{
    /// <summary>The table [1, h·w, D], computed in float64 and cast to <paramref name="dtype"/>.</summary>
    public static Tensor Table(long h, long w, long dim, ScalarType dtype, Device? device, double temperature = 10_000.0)
    {
        if (dim % 4 != 0) throw new ArgumentException($"sincos2d position embedding needs a width divisible by 4, found {dim}.", nameof(dim));
        using var scope = torch.NewDisposeScope();
        long quarter = dim / 4;
        var omega = ScalarMath.Arange(quarter, ScalarType.Float64, device).DividedBy(Math.Max(1, quarter - 1));
        omega = torch.exp(omega.Times(-Math.Log(temperature)));                                          // [D/4]
        var ys = ScalarMath.Arange(h, ScalarType.Float64, device).repeat_interleave(w);   // row index of each patch
        var xs = ScalarMath.Arange(w, ScalarType.Float64, device).repeat(h);              // column index
        var ox = xs.unsqueeze(1) * omega.unsqueeze(0);
        var oy = ys.unsqueeze(1) * omega.unsqueeze(0);
        var pe = torch.cat(new[] { ox.sin(), ox.cos(), oy.sin(), oy.cos() }, 1).unsqueeze(0);
        return pe.to(dtype).MoveToOuterDisposeScope();
    }
}
