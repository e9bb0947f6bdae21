using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Torch;

/// <summary>
/// Tensor arithmetic with numbers that keeps each TorchSharp <see cref="Scalar"/> alive until the native call has
/// returned. In TorchSharp 0.107 a <see cref="Scalar"/> is a raw native pointer that only a finalizer frees, and the
/// tensor methods that take one read the pointer and call libtorch without keeping the managed object reachable; so
/// a Scalar made by an implicit conversion (<c>x * 0.5</c>, <c>x.clamp_min(1e-12)</c>, and the hidden
/// <c>alpha = 1</c> of <c>x + y</c>, <c>add</c>, <c>add_</c>; <c>square()</c> is <c>pow(2)</c>) can be finalized by
/// a garbage collection on another thread while libtorch still reads it: the call fails with "Unknown scalar type"
/// or reads freed memory. Here each Scalar is created explicitly and disposed after the call (which keeps it alive
/// through it), or is a constant held for the life of the process. The library's projects ban the unsafe members at
/// build time (src/BannedSymbols.txt), <c>ToScalar</c> among them: this class is the one place that makes a Scalar.
/// docs/torchsharp-notes.md has the measurement. The number helpers take a <c>double</c>: meant for floating-point
/// tensors (on an integer tensor a double operand promotes the result to floating point, as in libtorch).
/// </summary>
#pragma warning disable RS0030 // the one place allowed to create Scalars, each disposed after its call or held forever
internal static class ScalarMath
{
    // Constants referenced by a static field are never finalized.
    private static readonly Scalar One = 1.ToScalar();

    /// <summary><paramref name="a"/> + <paramref name="b"/> (tensors; broadcasting).</summary>
    public static Tensor Plus(this Tensor a, Tensor b) => a.add(b, One);

    /// <summary>In place: <paramref name="a"/> += <paramref name="b"/>.</summary>
    public static Tensor PlusInPlace(this Tensor a, Tensor b) => a.add_(b, One);

    /// <summary>In place: <paramref name="a"/> += <paramref name="alpha"/> · <paramref name="b"/>.</summary>
    public static Tensor PlusInPlace(this Tensor a, Tensor b, double alpha)
    {
        using var s = alpha.ToScalar();
        return a.add_(b, s);
    }

    /// <summary><paramref name="a"/> + <paramref name="value"/>.</summary>
    public static Tensor Plus(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.add(s, One);
    }

    /// <summary>In place: <paramref name="a"/> += <paramref name="value"/>.</summary>
    public static Tensor PlusInPlace(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.add_(s, One);
    }

    /// <summary><paramref name="a"/> − <paramref name="value"/>.</summary>
    public static Tensor Minus(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.sub(s);
    }

    /// <summary><paramref name="a"/> · <paramref name="value"/>.</summary>
    public static Tensor Times(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.mul(s);
    }

    /// <summary>In place: <paramref name="a"/> ·= <paramref name="value"/>.</summary>
    public static Tensor TimesInPlace(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.mul_(s);
    }

    /// <summary><paramref name="a"/> / <paramref name="value"/>.</summary>
    public static Tensor DividedBy(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.div(s);
    }

    /// <summary>In place: <paramref name="a"/> /= <paramref name="value"/>.</summary>
    public static Tensor DivideInPlace(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.div_(s);
    }

    /// <summary><paramref name="a"/>², as <c>a · a</c> (libtorch computes <c>pow(a, 2)</c> the same way).</summary>
    public static Tensor Squared(this Tensor a) => a.mul(a);

    /// <summary><c>max(a, min)</c>.</summary>
    public static Tensor AtLeast(this Tensor a, double min)
    {
        using var s = min.ToScalar();
        return a.clamp_min(s);
    }

    /// <summary><paramref name="a"/> clamped to [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public static Tensor Clamped(this Tensor a, double min, double max)
    {
        using var lo = min.ToScalar();
        using var hi = max.ToScalar();
        return a.clamp(lo, hi);
    }

    /// <summary>In place: <paramref name="a"/> clamped to [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public static Tensor ClampInPlace(this Tensor a, double min, double max)
    {
        using var lo = min.ToScalar();
        using var hi = max.ToScalar();
        return a.clamp_(lo, hi);
    }

    /// <summary>In place: <paramref name="a"/> += <paramref name="value"/> · <paramref name="t1"/> · <paramref name="t2"/>.</summary>
    public static Tensor AddProductInPlace(this Tensor a, Tensor t1, Tensor t2, double value)
    {
        using var s = value.ToScalar();
        return a.addcmul_(t1, t2, s);
    }

    /// <summary>In place: <paramref name="a"/> += <paramref name="value"/> · <paramref name="t1"/> / <paramref name="t2"/>.</summary>
    public static Tensor AddQuotientInPlace(this Tensor a, Tensor t1, Tensor t2, double value)
    {
        using var s = value.ToScalar();
        return a.addcdiv_(t1, t2, s);
    }

    /// <summary>In place: every element set to <paramref name="value"/>.</summary>
    public static Tensor FillInPlace(this Tensor a, double value)
    {
        using var s = value.ToScalar();
        return a.fill_(s);
    }

    /// <summary>A tensor of <paramref name="shape"/> filled with <paramref name="value"/>.</summary>
    public static Tensor Full(long[] shape, double value, ScalarType dtype, Device? device)
    {
        using var s = value.ToScalar();
        return torch.full(shape, s, dtype: dtype, device: device);
    }

    /// <summary>A tensor like <paramref name="a"/> filled with <paramref name="value"/>.</summary>
    public static Tensor FullLike(Tensor a, double value)
    {
        using var s = value.ToScalar();
        return torch.full_like(a, s);
    }

    /// <summary>0, 1, …, <paramref name="end"/> − 1.</summary>
    public static Tensor Arange(long end, ScalarType dtype, Device? device)
    {
        using var start = 0.ToScalar();
        using var stop = end.ToScalar();
        using var step = 1.ToScalar();
        return torch.arange(start, stop, step, dtype: dtype, device: device);
    }
}
