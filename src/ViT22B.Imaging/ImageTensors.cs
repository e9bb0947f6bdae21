using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Imaging;

/// <summary>Pixel normalization applied after scaling pixel values to [0, 1].</summary>
public enum PixelNormalization
{
    /// <summary>big_vision's value range (−1, 1): <c>2·v − 1</c>.</summary>
    MinusOneToOne,
    /// <summary>ImageNet mean/std (timm's <c>IMAGENET_DEFAULT_MEAN/STD</c>).</summary>
    ImageNet,
}

/// <summary>
/// Decodes images (JPEG, PNG, WebP, BMP, GIF first frame) with SkiaSharp and turns them into model inputs:
/// EXIF orientation applied, grayscale expanded and alpha composited on white to RGB, shorter side resized with
/// a bicubic (Mitchell) filter, center crop, [C, H, W] float32 with the chosen normalization.
/// </summary>
public static class ImageTensors
{
    private static readonly string[] Extensions = { ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif" };
    private static readonly float[] ImageNetMean = { 0.485f, 0.456f, 0.406f };
    private static readonly float[] ImageNetStd = { 0.229f, 0.224f, 0.225f };

    /// <summary>Image files of a folder (by extension, sorted by name for a stable order).</summary>
    public static IReadOnlyList<string> ListImages(string folder)
    {
        if (!Directory.Exists(folder)) throw new DirectoryNotFoundException($"Image folder '{folder}' does not exist.");
        return Directory.EnumerateFiles(folder)
            .Where(f => Extensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
            .OrderBy(f => f, StringComparer.Ordinal).ToList();
    }

    /// <summary>Loads one image as a [3, size, size] float32 CPU tensor (resize shorter side to
    /// <paramref name="size"/>, center crop).</summary>
    /// <exception cref="InvalidDataException">The file is not a decodable image (the message names it).</exception>
    public static Tensor Load(string path, int size, PixelNormalization normalization = PixelNormalization.MinusOneToOne)
    {
        if (size <= 0) throw new ArgumentOutOfRangeException(nameof(size), $"size must be positive, found {size}.");
        if (!File.Exists(path)) throw new FileNotFoundException($"Image '{path}' does not exist.", path);
        using var oriented = DecodeOriented(path);
        using var square = ResizeAndCrop(oriented, size);
        return ToTensor(square, normalization);
    }

    /// <summary>Loads several images into one batch [N, 3, size, size].</summary>
    public static Tensor LoadBatch(IEnumerable<string> paths, int size, PixelNormalization normalization = PixelNormalization.MinusOneToOne)
    {
        using var scope = torch.NewDisposeScope();
        var items = paths.Select(p => Load(p, size, normalization)).ToArray();
        if (items.Length == 0) throw new ArgumentException("No images to load.", nameof(paths));
        return torch.stack(items).MoveToOuterDisposeScope();
    }

    private static SKBitmap DecodeOriented(string path)
    {
        using var codec = SKCodec.Create(path) ?? throw new InvalidDataException($"'{path}' is not a decodable image (JPEG, PNG, WebP, BMP or GIF).");
        var info = new SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var bitmap = new SKBitmap(info);
        var result = codec.GetPixels(info, bitmap.GetPixels());
        if (result != SKCodecResult.Success)
        {
            bitmap.Dispose();
            throw new InvalidDataException(result == SKCodecResult.IncompleteInput
                ? $"'{path}' is truncated: the image data ends early."
                : $"'{path}' could not be decoded: {result}.");
        }
        return Orient(bitmap, codec.EncodedOrigin);
    }

    // Applies the EXIF orientation so that the bitmap is upright.
    private static SKBitmap Orient(SKBitmap src, SKEncodedOrigin origin)
    {
        if (origin is SKEncodedOrigin.TopLeft or SKEncodedOrigin.Default) return src;
        bool swap = origin is SKEncodedOrigin.LeftTop or SKEncodedOrigin.RightTop or SKEncodedOrigin.RightBottom or SKEncodedOrigin.LeftBottom;
        int w = swap ? src.Height : src.Width, h = swap ? src.Width : src.Height;
        var dst = new SKBitmap(new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        using (var canvas = new SKCanvas(dst))
        {
            canvas.SetMatrix(OriginMatrix(origin, src.Width, src.Height));
            canvas.DrawBitmap(src, 0, 0);
        }
        src.Dispose();
        return dst;
    }

    private static SKMatrix OriginMatrix(SKEncodedOrigin origin, int w, int h) => origin switch
    {
        SKEncodedOrigin.TopRight => new SKMatrix(-1, 0, w, 0, 1, 0, 0, 0, 1),
        SKEncodedOrigin.BottomRight => new SKMatrix(-1, 0, w, 0, -1, h, 0, 0, 1),
        SKEncodedOrigin.BottomLeft => new SKMatrix(1, 0, 0, 0, -1, h, 0, 0, 1),
        SKEncodedOrigin.LeftTop => new SKMatrix(0, 1, 0, 1, 0, 0, 0, 0, 1),
        SKEncodedOrigin.RightTop => new SKMatrix(0, -1, h, 1, 0, 0, 0, 0, 1),
        SKEncodedOrigin.RightBottom => new SKMatrix(0, -1, h, -1, 0, w, 0, 0, 1),
        SKEncodedOrigin.LeftBottom => new SKMatrix(0, 1, 0, -1, 0, w, 0, 0, 1),
        _ => SKMatrix.Identity,
    };

    private static SKBitmap ResizeAndCrop(SKBitmap src, int size)
    {
        double scale = (double)size / Math.Min(src.Width, src.Height);
        int w = Math.Max(size, (int)Math.Round(src.Width * scale)), h = Math.Max(size, (int)Math.Round(src.Height * scale));
        using var resized = src.Resize(new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul), new SKSamplingOptions(SKCubicResampler.Mitchell))
            ?? throw new InvalidOperationException("Image resize failed.");
        var crop = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        resized.ExtractSubset(crop, SKRectI.Create((w - size) / 2, (h - size) / 2, size, size));
        var copy = crop.Copy();
        crop.Dispose();
        return copy;
    }

    private static Tensor ToTensor(SKBitmap bmp, PixelNormalization normalization)
    {
        int w = bmp.Width, h = bmp.Height;
        var data = new float[3 * h * w];
        var pixels = bmp.Pixels;   // SKColor (unpremultiplied)
        for (int i = 0; i < pixels.Length; i++)
        {
            var px = pixels[i];
            float a = px.Alpha / 255f;
            // Alpha composited over white; grayscale images decode to equal R, G, B.
            float r = (px.Red * a + 255f * (1 - a)) / 255f, g = (px.Green * a + 255f * (1 - a)) / 255f, b = (px.Blue * a + 255f * (1 - a)) / 255f;
            float[] rgb = { r, g, b };
            for (int ch = 0; ch < 3; ch++)
            {
                float v = normalization == PixelNormalization.ImageNet ? (rgb[ch] - ImageNetMean[ch]) / ImageNetStd[ch] : 2 * rgb[ch] - 1;
                data[ch * h * w + i] = v;
            }
        }
        return torch.tensor(data, new long[] { 3, h, w }, ScalarType.Float32);
    }
}
