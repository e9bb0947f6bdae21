using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Data;

/// <summary>An image transform: float image [C, H, W] → float image; <paramref name="rng"/> drives randomness.</summary>
public delegate Tensor ImageTransform(Tensor image, Random rng);

/// <summary>Resampling filter of the resizing transforms (both antialiased when shrinking, like PIL and
/// torchvision's <c>antialias=True</c>).</summary>
public enum Resampling
{
    /// <summary>Bilinear (triangle filter).</summary>
    Bilinear,
    /// <summary>Bicubic (Keys, a = −0.5, as PyTorch).</summary>
    Bicubic,
}

/// <summary>Pixel normalization applied to images with values in [0, 1].</summary>
public enum PixelNormalization
{
    /// <summary>big_vision's value range (−1, 1): <c>2·v − 1</c>.</summary>
    MinusOneToOne,
    /// <summary>ImageNet mean/std (timm's <c>IMAGENET_DEFAULT_MEAN/STD</c>), per channel; single-channel images use
    /// the mean of the three.</summary>
    ImageNet,
}

/// <summary>
/// Image transforms on tensors (torchvision's <c>transforms.v2</c> semantics), composable with
/// <see cref="Compose"/>. Inputs are float images [C, H, W] with values in [0, 1] until <see cref="Normalize(PixelNormalization)"/>.
/// <code>var train = Transforms.Compose(Transforms.RandomResizedCrop(224), Transforms.HorizontalFlip(),
///     Transforms.Normalize(PixelNormalization.MinusOneToOne));</code>
/// </summary>
public static class Transforms
{
    /// <summary>Applies the transforms in order.</summary>
    public static ImageTransform Compose(params ImageTransform[] transforms)
    {
        ArgumentNullException.ThrowIfNull(transforms);
        return (image, rng) =>
        {
            using var scope = NewDisposeScope();
            var x = image;
            foreach (var t in transforms) x = t(x, rng);
            return ReferenceEquals(x, image) ? x : x.MoveToOuterDisposeScope();
        };
    }

    /// <summary>Resizes so that the shorter side is <paramref name="size"/> (aspect ratio kept; torchvision
    /// <c>Resize(size)</c>: the longer side is truncated, not rounded).</summary>
    public static ImageTransform ResizeShorterSide(int size, Resampling resampling = Resampling.Bicubic)
    {
        CheckPositive(size, nameof(size));
        return (image, _) =>
        {
            var (h, w) = Hw(image);
            long nh = h <= w ? size : (long)(size * (double)h / w), nw = h <= w ? (long)(size * (double)w / h) : size;
            return Resize(image, nh, nw, resampling);
        };
    }

    /// <summary>Resizes to exactly <paramref name="height"/>×<paramref name="width"/>.</summary>
    public static ImageTransform Resize(int height, int width, Resampling resampling = Resampling.Bicubic)
    {
        CheckPositive(height, nameof(height));
        CheckPositive(width, nameof(width));
        return (image, _) => Resize(image, height, width, resampling);
    }

    /// <summary>Crops the central <paramref name="size"/>×<paramref name="size"/> square (torchvision rounding:
    /// top = round((H − size) / 2)). Images smaller than the crop are an error.</summary>
    public static ImageTransform CenterCrop(int size)
    {
        CheckPositive(size, nameof(size));
        return (image, _) =>
        {
            var (h, w) = Hw(image);
            if (h < size || w < size) throw new ArgumentException($"CenterCrop({size}): image is {h}×{w}, smaller than the crop.", nameof(image));
            long top = (long)Math.Round((h - size) / 2.0, MidpointRounding.ToEven), left = (long)Math.Round((w - size) / 2.0, MidpointRounding.ToEven);
            return image.narrow(1, top, size).narrow(2, left, size).contiguous();
        };
    }

    /// <summary>
    /// Inception-style crop (torchvision <c>RandomResizedCrop</c>): a crop covering a random fraction in
    /// [<paramref name="scaleMin"/>, <paramref name="scaleMax"/>] of the area with a log-uniform aspect ratio in
    /// [<paramref name="ratioMin"/>, <paramref name="ratioMax"/>] (10 attempts, then a center crop with the ratio
    /// clamped), resized to <paramref name="size"/>×<paramref name="size"/>.
    /// </summary>
    public static ImageTransform RandomResizedCrop(int size, double scaleMin = 0.08, double scaleMax = 1.0,
        double ratioMin = 3.0 / 4, double ratioMax = 4.0 / 3, Resampling resampling = Resampling.Bilinear)
    {
        CheckPositive(size, nameof(size));
        if (!(scaleMin > 0 && scaleMin <= scaleMax && scaleMax <= 1))
            throw new ArgumentException($"RandomResizedCrop: need 0 < scaleMin ≤ scaleMax ≤ 1, found [{scaleMin}, {scaleMax}].");
        if (!(ratioMin > 0 && ratioMin <= ratioMax))
            throw new ArgumentException($"RandomResizedCrop: need 0 < ratioMin ≤ ratioMax, found [{ratioMin}, {ratioMax}].");
        return (image, rng) =>
        {
            var (top, left, ch, cw) = SampleCrop(Hw(image), scaleMin, scaleMax, ratioMin, ratioMax, rng);
            using var scope = NewDisposeScope();
            var crop = image.narrow(1, top, ch).narrow(2, left, cw);
            return Resize(crop, size, size, resampling).MoveToOuterDisposeScope();
        };
    }

    /// <summary>The crop box (top, left, height, width) <see cref="RandomResizedCrop"/> takes from an image of size
    /// <paramref name="hw"/>.</summary>
    public static (long Top, long Left, long Height, long Width) SampleCrop((long H, long W) hw, double scaleMin, double scaleMax,
        double ratioMin, double ratioMax, Random rng)
    {
        ArgumentNullException.ThrowIfNull(rng);
        var (h, w) = hw;
        double area = h * w, logMin = Math.Log(ratioMin), logMax = Math.Log(ratioMax);
        for (int attempt = 0; attempt < 10; attempt++)
        {
            double target = area * (scaleMin + (scaleMax - scaleMin) * rng.NextDouble());
            double ratio = Math.Exp(logMin + (logMax - logMin) * rng.NextDouble());
            long cw = (long)Math.Round(Math.Sqrt(target * ratio)), ch = (long)Math.Round(Math.Sqrt(target / ratio));
            if (cw > 0 && cw <= w && ch > 0 && ch <= h)
                return (rng.NextInt64(h - ch + 1), rng.NextInt64(w - cw + 1), ch, cw);
        }
        double inRatio = (double)w / h;
        long fw, fh;
        if (inRatio < ratioMin) { fw = w; fh = (long)Math.Round(w / ratioMin); }
        else if (inRatio > ratioMax) { fh = h; fw = (long)Math.Round(h * ratioMax); }
        else { fw = w; fh = h; }
        return ((h - fh) / 2, (w - fw) / 2, fh, fw);
    }

    /// <summary>Pads by <paramref name="padding"/> pixels of zeros on each side, then crops a random
    /// <paramref name="size"/>×<paramref name="size"/> window (the CIFAR/MNIST augmentation).</summary>
    public static ImageTransform RandomCrop(int size, int padding = 0)
    {
        CheckPositive(size, nameof(size));
        if (padding < 0) throw new ArgumentOutOfRangeException(nameof(padding), $"padding must be ≥ 0, found {padding}.");
        return (image, rng) =>
        {
            using var scope = NewDisposeScope();
            var x = padding > 0 ? nn.functional.pad(image, new long[] { padding, padding, padding, padding }) : image;
            var (h, w) = Hw(x);
            if (h < size || w < size) throw new ArgumentException($"RandomCrop({size}): padded image is {h}×{w}, smaller than the crop.", nameof(image));
            long top = rng.NextInt64(h - size + 1), left = rng.NextInt64(w - size + 1);
            return x.narrow(1, top, size).narrow(2, left, size).contiguous().MoveToOuterDisposeScope();
        };
    }

    /// <summary>Mirrors the image left-right with probability <paramref name="p"/>.</summary>
    public static ImageTransform HorizontalFlip(double p = 0.5)
    {
        if (p is < 0 or > 1) throw new ArgumentOutOfRangeException(nameof(p), $"p must be in [0, 1], found {p}.");
        return (image, rng) => rng.NextDouble() < p ? image.flip(2) : image;
    }

    /// <summary>Maps [0, 1] pixel values with <paramref name="kind"/>.</summary>
    public static ImageTransform Normalize(PixelNormalization kind) => kind == PixelNormalization.MinusOneToOne
        ? (image, _) => image.Times(2.0).Minus(1.0)
        : Normalize(Preprocessing.ImageNetMean, Preprocessing.ImageNetStd);

    /// <summary>Maps [0, 1] pixel values to <c>(v − mean) / std</c> per RGB channel (torchvision <c>Normalize</c>);
    /// single-channel images use the means of the three.</summary>
    public static ImageTransform Normalize((double R, double G, double B) mean, (double R, double G, double B) std)
    {
        double[] m3 = { mean.R, mean.G, mean.B }, s3 = { std.R, std.G, std.B };
        if (s3.Any(v => !(v > 0) || !double.IsFinite(v)) || m3.Any(v => !double.IsFinite(v)))
            throw new ArgumentException($"Normalize: std must be positive and mean finite, found mean {mean}, std {std}.");
        return (image, _) =>
        {
            long c = image.shape[0];
            using var scope = NewDisposeScope();
            double[] mc = c == 3 ? m3 : Enumerable.Repeat(m3.Average(), (int)c).ToArray();
            double[] sc = c == 3 ? s3 : Enumerable.Repeat(s3.Average(), (int)c).ToArray();
            var mt = torch.tensor(mc, dtype: image.dtype, device: image.device).view(c, 1, 1);
            var st = torch.tensor(sc, dtype: image.dtype, device: image.device).view(c, 1, 1);
            return ((image - mt) / st).MoveToOuterDisposeScope();
        };
    }

    private static Tensor Resize(Tensor image, long h, long w, Resampling resampling)
    {
        using var scope = NewDisposeScope();
        var (ih, iw) = Hw(image);
        if (ih == h && iw == w) return image.clone().MoveToOuterDisposeScope();
        var mode = resampling == Resampling.Bilinear ? InterpolationMode.Bilinear : InterpolationMode.Bicubic;
        var y = nn.functional.interpolate(image.unsqueeze(0), new[] { h, w }, mode: mode, align_corners: false, antialias: true).squeeze(0);
        // Bicubic overshoots; keep pixel values in range as torchvision does for uint8 images.
        if (resampling == Resampling.Bicubic) y = y.Clamped(0.0, 1.0);
        return y.MoveToOuterDisposeScope();
    }

    private static (long H, long W) Hw(Tensor image)
    {
        if (image.dim() != 3) throw new ArgumentException($"Expected an image [C, H, W], found [{string.Join(", ", image.shape)}].", nameof(image));
        return (image.shape[1], image.shape[2]);
    }

    private static void CheckPositive(int value, string name)
    {
        if (value <= 0) throw new ArgumentOutOfRangeException(name, $"{name} must be positive, found {value}.");
    }
}
