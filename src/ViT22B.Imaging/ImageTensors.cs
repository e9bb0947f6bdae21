using SkiaSharp;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Imaging;

/// <summary>
/// Decodes images (JPEG, PNG, WebP, BMP, GIF first frame) with SkiaSharp into tensors: EXIF orientation applied,
/// grayscale expanded and alpha composited on white to RGB, float32 [3, H, W] with values in [0, 1]. Resizing,
/// cropping and normalization are tensor transforms (<see cref="Transforms"/>); <see cref="Load(string, int, Preprocessing, long)"/> chains the
/// evaluation ones. Declared sizes are checked against a pixel limit before any pixel memory is allocated.
/// </summary>
public static class ImageTensors
{
    private static readonly string[] Extensions = { ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif" };

    /// <summary>Default limit on width × height (PIL's <c>MAX_IMAGE_PIXELS</c>, 89,478,485): larger declared sizes
    /// are refused before decoding, as a guard against decompression bombs.</summary>
    public const long DefaultMaxPixels = 89_478_485;

    // The most pixels a decode can take whatever maxPixels says: the RGBA bytes SkiaSharp copies out, and the float
    // array of three channels, are single .NET arrays indexed by int.
    private static readonly long MaxDecodablePixels = Array.MaxLength / 4;

    /// <summary>Whether the file name has an image extension this class decodes.</summary>
    public static bool IsImageFile(string path) => Extensions.Contains(Path.GetExtension(path).ToLowerInvariant());

    /// <summary>Image files of a folder (by extension, sorted by name for a stable order).</summary>
    public static IReadOnlyList<string> ListImages(string folder)
    {
        if (!Directory.Exists(folder)) throw new DirectoryNotFoundException($"Image folder '{folder}' does not exist.");
        return Directory.EnumerateFiles(folder).Where(IsImageFile).OrderBy(f => f, StringComparer.Ordinal).ToList();
    }

    /// <summary>The evaluation transform: resize the shorter side to <paramref name="size"/> (bicubic, antialiased),
    /// center crop <paramref name="size"/>², normalize.</summary>
    public static ImageTransform EvalTransform(int size, PixelNormalization normalization = PixelNormalization.MinusOneToOne) =>
        Preprocessing.FromNormalization(normalization).EvalTransform(size);

    /// <summary>The inception-crop training transform: random resized crop to <paramref name="size"/>², random
    /// horizontal flip, normalize (big_vision's <c>inception_crop|flip_lr|value_range(-1, 1)</c>).</summary>
    public static ImageTransform TrainTransform(int size, PixelNormalization normalization = PixelNormalization.MinusOneToOne) =>
        Transforms.Compose(Transforms.RandomResizedCrop(size), Transforms.HorizontalFlip(), Transforms.Normalize(normalization));

    /// <summary>Loads one image as a [3, size, size] float32 CPU tensor (<see cref="EvalTransform"/>).</summary>
    /// <exception cref="InvalidDataException">The file is not a decodable image (the message names it).</exception>
    public static Tensor Load(string path, int size, PixelNormalization normalization = PixelNormalization.MinusOneToOne, long maxPixels = DefaultMaxPixels) =>
        Load(path, size, Preprocessing.FromNormalization(normalization), maxPixels);

    /// <summary>Loads several images into one batch [N, 3, size, size].</summary>
    public static Tensor LoadBatch(IEnumerable<string> paths, int size, PixelNormalization normalization = PixelNormalization.MinusOneToOne) =>
        LoadBatch(paths, size, Preprocessing.FromNormalization(normalization));

    /// <summary>Loads one image as a [3, size, size] float32 CPU tensor the way a checkpoint expects
    /// (<see cref="Preprocessing.EvalTransform"/>: its resize mode, crop, filter, mean and std; e.g.
    /// <c>ViTConfig.TimmPreprocessing(name)</c> or the preprocessing stored in a checkpoint's metadata).</summary>
    /// <exception cref="InvalidDataException">The file is not a decodable image (the message names it).</exception>
    public static Tensor Load(string path, int size, Preprocessing preprocessing, long maxPixels = DefaultMaxPixels)
    {
        ArgumentNullException.ThrowIfNull(preprocessing);
        if (size <= 0) throw new ArgumentOutOfRangeException(nameof(size), $"size must be positive, found {size}.");
        using var scope = torch.NewDisposeScope();
        var x = Decode(path, maxPixels);
        return preprocessing.EvalTransform(size)(x, new Random(0)).MoveToOuterDisposeScope();
    }

    /// <summary>Loads several images into one batch [N, 3, size, size] with <paramref name="preprocessing"/>.</summary>
    public static Tensor LoadBatch(IEnumerable<string> paths, int size, Preprocessing preprocessing)
    {
        ArgumentNullException.ThrowIfNull(paths);
        using var scope = torch.NewDisposeScope();
        var items = paths.Select(p => Load(p, size, preprocessing)).ToArray();
        if (items.Length == 0) throw new ArgumentException("No images to load.", nameof(paths));
        return torch.stack(items).MoveToOuterDisposeScope();
    }

    /// <summary>Decodes a file to float32 RGB [3, H, W] in [0, 1], upright.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">Empty, truncated, undecodable, or declaring more than
    /// <paramref name="maxPixels"/> pixels (the message names the file).</exception>
    public static Tensor Decode(string path, long maxPixels = DefaultMaxPixels)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"Image '{path}' does not exist.", path);
        using var stream = File.OpenRead(path);
        return Decode(stream, path, maxPixels);
    }

    /// <summary>Decodes an image from a stream (read to its end); <paramref name="name"/> names it in errors.</summary>
    public static Tensor Decode(Stream stream, string name, long maxPixels = DefaultMaxPixels)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (maxPixels <= 0) throw new ArgumentOutOfRangeException(nameof(maxPixels), $"maxPixels must be positive, found {maxPixels}.");
        using var bitmap = DecodeOriented(stream, name, maxPixels);
        return ToTensor(bitmap);
    }

    /// <summary>Writes an image [C, H, W] (C = 1 or 3, values in [0, 1], clamped) as a PNG file, atomically.</summary>
    public static void SavePng(Tensor image, string path)
    {
        ArgumentNullException.ThrowIfNull(image);
        if (image.dim() != 3 || image.shape[0] is not (1 or 3))
            throw new ArgumentException($"Expected an image [1 or 3, H, W], found [{string.Join(", ", image.shape)}].", nameof(image));
        int h = (int)image.shape[1], w = (int)image.shape[2];
        byte[] bytes;
        using (var scope = torch.NewDisposeScope())
        {
            var rgb = image.shape[0] == 1 ? image.expand(3, h, w) : image;
            bytes = rgb.to(ScalarType.Float32).Clamped(0, 1).Times(255).round().to(ScalarType.Byte).permute(1, 2, 0).contiguous().cpu().data<byte>().ToArray();
        }
        using var bmp = new SKBitmap(new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        var rgba = new byte[4 * w * h];
        for (int i = 0; i < w * h; i++)
        {
            rgba[4 * i] = bytes[3 * i];
            rgba[4 * i + 1] = bytes[3 * i + 1];
            rgba[4 * i + 2] = bytes[3 * i + 2];
            rgba[4 * i + 3] = 255;
        }
        System.Runtime.InteropServices.Marshal.Copy(rgba, 0, bmp.GetPixels(), rgba.Length);
        using var data = bmp.Encode(SKEncodedImageFormat.Png, 100) ?? throw new InvalidOperationException($"PNG encoding of '{path}' failed.");
        ViT22B.Interop.AtomicFile.Write(path, s => data.SaveTo(s));
    }

    private static SKBitmap DecodeOriented(Stream stream, string name, long maxPixels)
    {
        using var data = SKData.Create(stream);
        if (data is null || data.Size == 0) throw new InvalidDataException($"'{name}' is empty (0 bytes); not an image.");
        using var codec = SKCodec.Create(data) ?? throw new InvalidDataException($"'{name}' is not a decodable image (JPEG, PNG, WebP, BMP or GIF); its format is unsupported or its header is corrupt.");
        long w = codec.Info.Width, h = codec.Info.Height;
        if (w <= 0 || h <= 0) throw new InvalidDataException($"'{name}' declares an empty size {w}×{h}.");
        if (w * h > maxPixels)
            throw new InvalidDataException($"'{name}' declares {w}×{h} = {w * h:N0} pixels, over the limit of {maxPixels:N0}; refused before decoding (raise maxPixels if the file is trusted).");
        if (w * h > MaxDecodablePixels)
            throw new InvalidDataException($"'{name}' declares {w}×{h} = {w * h:N0} pixels, more than this decoder can hold ({MaxDecodablePixels:N0}: its RGBA bytes must fit one .NET array); refused before decoding.");
        var info = new SKImageInfo((int)w, (int)h, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var bitmap = new SKBitmap(info);
        // Frame 0 only (GIF, animated WebP).
        var result = codec.GetPixels(info, bitmap.GetPixels(), new SKCodecOptions(0));
        if (result != SKCodecResult.Success)
        {
            bitmap.Dispose();
            throw new InvalidDataException(result == SKCodecResult.IncompleteInput
                ? $"'{name}' is truncated: the image data ends early."
                : $"'{name}' could not be decoded: {result}.");
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

    private static Tensor ToTensor(SKBitmap bmp)
    {
        int w = bmp.Width, h = bmp.Height, n = w * h;
        var rgba = bmp.Bytes;   // Rgba8888, unpremultiplied
        var data = new float[3 * n];
        for (int i = 0; i < n; i++)
        {
            float a = rgba[4 * i + 3] / 255f;
            // Alpha composited over white; grayscale images decode to equal R, G, B.
            for (int ch = 0; ch < 3; ch++)
                data[ch * n + i] = (rgba[4 * i + ch] * a + 255f * (1 - a)) / 255f;
        }
        return torch.tensor(data, new long[] { 3, h, w }, ScalarType.Float32);
    }
}
