using TorchSharp;
using ViT22B.Data;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Data;

public sealed class TransformsTests
{
    private static readonly Random Rng = new(0);

    private static Tensor Ramp(long c, long h, long w) =>
        ScalarMath.Arange(c * h * w, ScalarType.Float64, torch.CPU).reshape(c, h, w).DividedBy(c * h * w);

    [Fact]
    public void Center_crop_takes_the_middle_with_torchvision_rounding()
    {
        using var scope = torch.NewDisposeScope();
        using var x = Ramp(1, 5, 6);
        using var y = Transforms.CenterCrop(3)(x, Rng);
        // top = round((5 − 3) / 2) = 1, left = round((6 − 3) / 2) = round(1.5) = 2 (banker's rounding, as Python's round).
        var expected = new double[] { 1 * 6 + 2, 1 * 6 + 3, 1 * 6 + 4, 2 * 6 + 2, 2 * 6 + 3, 2 * 6 + 4, 3 * 6 + 2, 3 * 6 + 3, 3 * 6 + 4 }.Select(v => v / 30).ToArray();
        Assert.Equal(expected, y.data<double>().ToArray());
        Assert.Throws<ArgumentException>(() => Transforms.CenterCrop(7)(x, Rng));
    }

    [Fact]
    public void Antialiased_bilinear_downscale_matches_hand_computed_triangle_filter()
    {
        // Halving a row [0, 1, 2, 3]: output pixel 0 is centered at input 0.5; the triangle filter stretched by 2
        // weighs inputs 0, 1, 2 with 0.75, 0.75, 0.25 (input −1 is outside and the weights are renormalized).
        using var scope = torch.NewDisposeScope();
        using var x = torch.tensor(new double[] { 0, 1, 2, 3 }, dtype: ScalarType.Float64).reshape(1, 1, 4).expand(1, 4, 4).contiguous();
        using var y = Transforms.Resize(4, 2, Resampling.Bilinear)(x, Rng);
        Assert.Equal(new long[] { 1, 4, 2 }, y.shape);
        double left = (0 * 0.75 + 1 * 0.75 + 2 * 0.25) / 1.75, right = (1 * 0.25 + 2 * 0.75 + 3 * 0.75) / 1.75;
        Assert.Equal(left, y[0, 0, 0].item<double>(), 12);
        Assert.Equal(right, y[0, 3, 1].item<double>(), 12);
    }

    [Fact]
    public void Resize_shorter_side_keeps_aspect_ratio_and_constant_images()
    {
        using var scope = torch.NewDisposeScope();
        using var x = ScalarMath.Full(new long[] { 3, 30, 50 }, 0.25, ScalarType.Float32, torch.CPU);
        using var y = Transforms.ResizeShorterSide(12)(x, Rng);
        Assert.Equal(new long[] { 3, 12, 20 }, y.shape);
        Assert.True(y.Minus(0.25f).abs().max().item<float>() < 1e-6);
        using var tall = Transforms.ResizeShorterSide(10, Resampling.Bilinear)(torch.zeros(1, 33, 20), Rng);
        Assert.Equal(new long[] { 1, 16, 10 }, tall.shape);   // 10·33/20 = 16.5 truncated, as torchvision
    }

    [Fact]
    public void Flip_mirrors_columns()
    {
        using var scope = torch.NewDisposeScope();
        using var x = Ramp(2, 3, 4);
        using var flipped = Transforms.HorizontalFlip(p: 1)(x, Rng);
        using var kept = Transforms.HorizontalFlip(p: 0)(x, Rng);
        Assert.Equal(x[1, 2, 0].item<double>(), flipped[1, 2, 3].item<double>());
        Assert.Equal(x[0, 1, 3].item<double>(), flipped[0, 1, 0].item<double>());
        Assert.True(TensorAssert.Same(kept, x));
    }

    [Fact]
    public void Normalizations_match_their_formulas()
    {
        using var scope = torch.NewDisposeScope();
        using var x = torch.tensor(new double[] { 0, 0.5, 1, 0.25, 0.75, 0.1 }, dtype: ScalarType.Float64).reshape(3, 1, 2);
        using var m = Transforms.Normalize(PixelNormalization.MinusOneToOne)(x, Rng);
        Assert.Equal(new[] { -1, 0, 1, -0.5, 0.5, -0.8 }, m.data<double>().ToArray().Select(v => Math.Round(v, 12)));
        using var n = Transforms.Normalize(PixelNormalization.ImageNet)(x, Rng);
        Assert.Equal((0.5 - 0.485) / 0.229, n[0, 0, 1].item<double>(), 12);
        Assert.Equal((0.25 - 0.456) / 0.224, n[1, 0, 1].item<double>(), 12);
        Assert.Equal((0.1 - 0.406) / 0.225, n[2, 0, 1].item<double>(), 12);
    }

    [Fact]
    public void Random_crop_with_padding_is_a_window_of_the_zero_padded_image()
    {
        using var scope = torch.NewDisposeScope();
        using var x = Ramp(1, 4, 4).Plus(1);   // no zeros inside, so padding is recognizable
        var rng = new Random(3);
        for (int trial = 0; trial < 10; trial++)
        {
            using var y = Transforms.RandomCrop(4, padding: 2)(x, rng);
            using var padded = torch.zeros(1, 8, 8, dtype: ScalarType.Float64);
            padded.narrow(1, 2, 4).narrow(2, 2, 4).copy_(x);
            bool found = false;
            for (int top = 0; top <= 4 && !found; top++)
                for (int left = 0; left <= 4 && !found; left++)
                    found = TensorAssert.Same(padded.narrow(1, top, 4).narrow(2, left, 4), y);
            Assert.True(found, "the crop is not a 4×4 window of the padded image");
        }
    }

    [Fact]
    public void Random_resized_crop_boxes_respect_scale_and_ratio()
    {
        var rng = new Random(1);
        for (int i = 0; i < 200; i++)
        {
            var (top, left, h, w) = Transforms.SampleCrop((100, 150), 0.2, 0.9, 0.5, 2.0, rng);
            Assert.InRange(top, 0, 100 - h);
            Assert.InRange(left, 0, 150 - w);
            double area = (double)h * w / (100 * 150), ratio = (double)w / h;
            Assert.InRange(area, 0.2 * 0.9, 0.9 * 1.1);   // rounding of the sides
            Assert.InRange(ratio, 0.5 * 0.9, 2.0 * 1.1);
        }
        // Impossible request (full area at ratio 2 of a square image): center crop with the ratio clamped.
        Assert.Equal((25L, 0L, 50L, 100L), Transforms.SampleCrop((100, 100), 1, 1, 2, 2, rng));
        using var scope = torch.NewDisposeScope();
        using var img = Ramp(3, 40, 40);
        using var y = Transforms.RandomResizedCrop(16)(img, new Random(2));
        Assert.Equal(new long[] { 3, 16, 16 }, y.shape);
        // Whole-image crop (scale 1, ratio 1 on a square image) = plain resize.
        using var whole = Transforms.RandomResizedCrop(16, 1, 1, 1, 1)(img, new Random(2));
        using var resized = Transforms.Resize(16, 16, Resampling.Bilinear)(img, Rng);
        Assert.True(TensorAssert.Same(whole, resized));
    }

    [Fact]
    public void Compose_applies_in_order_and_bad_arguments_are_refused()
    {
        using var scope = torch.NewDisposeScope();
        using var x = Ramp(1, 6, 6);
        var t = Transforms.Compose(Transforms.CenterCrop(4), Transforms.HorizontalFlip(1), Transforms.Normalize(PixelNormalization.MinusOneToOne));
        using var y = t(x, Rng);
        using var expected = x.narrow(1, 1, 4).narrow(2, 1, 4).flip(2).Times(2).Minus(1);
        Assert.True(y.allclose(expected));
        Assert.Throws<ArgumentOutOfRangeException>(() => Transforms.CenterCrop(0));
        Assert.Throws<ArgumentException>(() => Transforms.RandomResizedCrop(8, scaleMin: 0.5, scaleMax: 0.1));
        Assert.Throws<ArgumentOutOfRangeException>(() => Transforms.HorizontalFlip(1.5));
        Assert.Throws<ArgumentException>(() => Transforms.CenterCrop(2)(torch.zeros(4, 4), Rng));
    }
}
