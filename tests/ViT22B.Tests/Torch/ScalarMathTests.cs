using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Torch;

/// <summary>Each <see cref="ScalarMath"/> helper gives the values of the TorchSharp form it replaces, element by element
/// equal in three dtypes. (The implicit forms leave their Scalar unreferenced during the call, which a garbage
/// collection on another thread could free; a rare failure here would be that race, not a mismatch.)</summary>
#pragma warning disable RS0030 // the implicit forms are the reference each helper is compared with
public class ScalarMathTests
{
    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float64)]
    public void Helpers_match_the_implicit_forms(ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        var gen = new torch.Generator(7);
        var a = torch.randn(new long[] { 5, 7 }, generator: gen).to(dtype);
        var b = torch.randn(new long[] { 5, 7 }, generator: gen).to(dtype);
        var positive = torch.rand(new long[] { 5, 7 }, generator: gen).to(dtype) + 0.5;
        var cases = new (string Name, Tensor Expected, Tensor Actual)[]
        {
            ("a + b", a + b, a.Plus(b)),
            ("a + 0.3", a + 0.3, a.Plus(0.3)),
            ("a - 0.3", a - 0.3, a.Minus(0.3)),
            ("a * 1.702", a * 1.702, a.Times(1.702)),
            ("a / 127.0", a / 127.0, a.DividedBy(127.0)),
            ("a / 3 (long)", a / 3L, a.DividedBy(3)),
            ("a.square()", a.square(), a.Squared()),
            ("a.clamp_min(0.1)", a.clamp_min(0.1), a.AtLeast(0.1)),
            ("a.clamp(-0.5, 0.5)", a.clamp(-0.5, 0.5), a.Clamped(-0.5, 0.5)),
            ("a.clone().clamp_(-0.5, 0.5)", a.clone().clamp_(-0.5, 0.5), a.clone().ClampInPlace(-0.5, 0.5)),
            ("a.clone().add_(b)", a.clone().add_(b), a.clone().PlusInPlace(b)),
            ("a.clone().add_(b, alpha: -0.01)", a.clone().add_(b, alpha: -0.01), a.clone().PlusInPlace(b, -0.01)),
            ("a.clone().add_(1e-8)", a.clone().add_(1e-8), a.clone().PlusInPlace(1e-8)),
            ("a.clone().mul_(0.9)", a.clone().mul_(0.9), a.clone().TimesInPlace(0.9)),
            ("a.clone().div_(2)", a.clone().div_(2), a.clone().DivideInPlace(2)),
            ("a.clone().addcmul_(b, b, 0.001)", a.clone().addcmul_(b, b, 0.001), a.clone().AddProductInPlace(b, b, 0.001)),
            ("a.clone().addcdiv_(b, positive, -0.1)", a.clone().addcdiv_(b, positive, -0.1), a.clone().AddQuotientInPlace(b, positive, -0.1)),
            ("a.clone().fill_(0.25)", a.clone().fill_(0.25), a.clone().FillInPlace(0.25)),
            ("full([5, 7], 0.1)", torch.full(new long[] { 5, 7 }, 0.1, dtype: dtype), ScalarMath.Full(new long[] { 5, 7 }, 0.1, dtype, torch.CPU)),
            ("full_like(a, NaN).isnan()", torch.full_like(a, double.NaN).isnan(), ScalarMath.FullLike(a, double.NaN).isnan()),
            ("arange(9)", torch.arange(9, dtype: dtype), ScalarMath.Arange(9, dtype, torch.CPU)),
        };
        var differ = cases.Where(c => !TensorAssert.Same(c.Expected, c.Actual)).Select(c => c.Name).ToList();
        Assert.True(differ.Count == 0, $"{dtype}: {string.Join(", ", differ)}");
    }
}
