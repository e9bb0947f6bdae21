using SkiaSharp;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Imaging;
using static TorchSharp.torch;

namespace ViT22B.Tests.Imaging;

public sealed class ImageTensorsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-img-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>Writes a w×h image whose pixel (x, y) is given by <paramref name="color"/>.</summary>
    private string Write(string name, int w, int h, Func<int, int, SKColor> color, SKEncodedImageFormat format, SKColorType type = SKColorType.Rgba8888)
    {
        using var bmp = new SKBitmap(new SKImageInfo(w, h, type, SKAlphaType.Unpremul));
        for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            bmp.SetPixel(x, y, color(x, y));
        using var data = bmp.Encode(format, 100);
        string path = Path.Combine(_dir, name);
        File.WriteAllBytes(path, data.ToArray());
        return path;
    }

    [Fact]
    public void A_checkpoints_preprocessing_decides_squash_or_crop_the_crop_share_and_the_statistics()
    {
        // 90×20 in three bands: black | white | black. Squashing keeps all three across the 12-pixel square (bands at
        // columns 4 and 8); the shorter-side resize (12 → 54×12) and a center crop keep columns 21..33 of 54, inside the
        // white band (18..36). With crop 0.5 the squash resizes to 24×24 (bands at 8 and 16) and keeps columns 6..18:
        // black, white, black again. Pixels are read away from the band edges, which the antialiased resize blends.
        string path = Write("bands.png", 90, 20, (x, _) => x is >= 30 and < 60 ? new SKColor(255, 255, 255) : new SKColor(0, 0, 0), SKEncodedImageFormat.Png);
        using var scope = torch.NewDisposeScope();
        var minusOne = Preprocessing.FromNormalization(PixelNormalization.MinusOneToOne);
        var squash = ImageTensors.Load(path, 12, minusOne with { Resize = ResizeMode.Squash, CropPct = 1.0, Interpolation = Resampling.Bilinear });
        var crop = ImageTensors.Load(path, 12, minusOne with { Resize = ResizeMode.CenterCrop, CropPct = 1.0, Interpolation = Resampling.Bilinear });
        var squashHalf = ImageTensors.Load(path, 12, minusOne with { Resize = ResizeMode.Squash, CropPct = 0.5, Interpolation = Resampling.Bilinear });
        foreach (var t in new[] { squash, crop, squashHalf }) Assert.Equal(new long[] { 3, 12, 12 }, t.shape);
        Assert.Equal(-1f, squash[0, 6, 1].item<float>(), 2);       // black band on the left …
        Assert.Equal(1f, squash[0, 6, 6].item<float>(), 2);        // … white in the middle …
        Assert.Equal(-1f, squash[0, 6, 10].item<float>(), 2);      // … black on the right
        Assert.Equal(1f, crop[0, 6, 0].item<float>(), 2);          // the crop sees only the white band
        Assert.Equal(1f, crop[0, 6, 11].item<float>(), 2);
        Assert.Equal(-1f, squashHalf[0, 6, 0].item<float>(), 2);
        Assert.Equal(1f, squashHalf[0, 6, 6].item<float>(), 2);
        Assert.Equal(-1f, squashHalf[0, 6, 11].item<float>(), 2);
        Assert.Equal(1f, squashHalf[0, 6, 8].item<float>(), 2);   // column 14 of 24: still white, where the uncropped
        Assert.True(squash[0, 6, 8].item<float>() < 0);            // squash is past the band (so the crop share is used)
        // The statistics: ImageNet's mean and std instead of [-1, 1] (white → (1 − mean) / std).
        var imagenet = Preprocessing.FromNormalization(PixelNormalization.ImageNet) with { Resize = ResizeMode.Squash, CropPct = 1.0 };
        var n = ImageTensors.Load(path, 12, imagenet);
        Assert.Equal((1 - imagenet.Mean.G) / imagenet.Std.G, n[1, 6, 6].item<float>(), 2);
        Assert.Equal((0 - imagenet.Mean.B) / imagenet.Std.B, n[2, 6, 0].item<float>(), 2);
    }

    [Fact]
    public void Png_is_resized_center_cropped_and_scaled_to_minus_one_one()
    {
        // 40×20: left half red, right half blue. Shorter side → 10 gives 20×10, the center crop keeps x ∈ [5, 15).
        string path = Write("halves.png", 40, 20, (x, _) => x < 20 ? new SKColor(255, 0, 0) : new SKColor(0, 0, 255), SKEncodedImageFormat.Png);
        using var scope = torch.NewDisposeScope();
        var t = ImageTensors.Load(path, 10);
        Assert.Equal(new long[] { 3, 10, 10 }, t.shape);
        Assert.Equal(ScalarType.Float32, t.dtype);
        Assert.Equal(1f, t[0, 5, 0].item<float>(), 2);     // red, left edge of the crop
        Assert.Equal(-1f, t[2, 5, 0].item<float>(), 2);
        Assert.Equal(1f, t[2, 5, 9].item<float>(), 2);     // blue, right edge
        Assert.Equal(-1f, t[0, 5, 9].item<float>(), 2);
    }

    [Fact]
    public void ImageNet_normalization_uses_mean_and_std()
    {
        string path = Write("gray.png", 8, 8, (_, _) => new SKColor(128, 128, 128), SKEncodedImageFormat.Png);
        using var scope = torch.NewDisposeScope();
        var t = ImageTensors.Load(path, 8, PixelNormalization.ImageNet);
        Assert.Equal((128 / 255f - 0.485f) / 0.229f, t[0, 3, 3].item<float>(), 4);
        Assert.Equal((128 / 255f - 0.406f) / 0.225f, t[2, 3, 3].item<float>(), 4);
    }

    [Fact]
    public void Transparent_pixels_are_composited_on_white()
    {
        string path = Write("alpha.png", 8, 8, (_, _) => new SKColor(0, 0, 0, 0), SKEncodedImageFormat.Png);
        using var scope = torch.NewDisposeScope();
        var t = ImageTensors.Load(path, 8);
        Assert.True(TensorAssert.AllEqual(t, 1f));
    }

    [Fact]
    public void Grayscale_jpeg_becomes_three_equal_channels()
    {
        string path = Write("gray.jpg", 16, 16, (x, y) => new SKColor((byte)(x * 16), (byte)(x * 16), (byte)(x * 16)), SKEncodedImageFormat.Jpeg, SKColorType.Gray8);
        using var scope = torch.NewDisposeScope();
        var t = ImageTensors.Load(path, 16);
        Assert.True((t[0] - t[1]).abs().max().item<float>() < 1e-6);
        Assert.True((t[0] - t[2]).abs().max().item<float>() < 1e-6);
        Assert.True(t[0, 8, 15].item<float>() > t[0, 8, 0].item<float>());
    }

    [Fact]
    public void Truncated_and_non_image_files_are_rejected_naming_the_file()
    {
        string full = Write("full.jpg", 64, 64, (x, y) => new SKColor((byte)(x * 4), (byte)(y * 4), 7), SKEncodedImageFormat.Jpeg);
        var bytes = File.ReadAllBytes(full);
        string truncated = Path.Combine(_dir, "truncated.jpg");
        File.WriteAllBytes(truncated, bytes[..(bytes.Length / 2)]);
        var e = Assert.Throws<InvalidDataException>(() => ImageTensors.Load(truncated, 32));
        Assert.Contains("truncated.jpg", e.Message);
        string text = Path.Combine(_dir, "notes.png");
        File.WriteAllText(text, "not an image");
        Assert.Contains("notes.png", Assert.Throws<InvalidDataException>(() => ImageTensors.Load(text, 32)).Message);
    }

    /// <summary>Inserts an EXIF APP1 segment with one Orientation tag right after the JPEG's SOI marker.</summary>
    private static byte[] WithExifOrientation(byte[] jpeg, byte orientation)
    {
        byte[] app1 =
        {
            0xFF, 0xE1, 0x00, 0x22, (byte)'E', (byte)'x', (byte)'i', (byte)'f', 0, 0,
            (byte)'I', (byte)'I', 0x2A, 0x00, 0x08, 0x00, 0x00, 0x00,                // TIFF header, IFD0 at offset 8
            0x01, 0x00,                                                            // one entry
            0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, orientation, 0x00, 0x00, 0x00, // 0x0112 SHORT ×1
            0x00, 0x00, 0x00, 0x00,                                                // no next IFD
        };
        return jpeg[..2].Concat(app1).Concat(jpeg[2..]).ToArray();
    }

    [Theory]
    [InlineData(6)]   // RightTop: displayed rotated 90° clockwise
    [InlineData(3)]   // BottomRight: displayed rotated 180°
    public void Exif_orientation_is_applied(byte orientation)
    {
        string plain = Write("plain.jpg", 40, 20, (x, _) => x < 20 ? new SKColor(255, 0, 0) : new SKColor(0, 0, 255), SKEncodedImageFormat.Jpeg);
        string rotated = Path.Combine(_dir, "rotated.jpg");
        File.WriteAllBytes(rotated, WithExifOrientation(File.ReadAllBytes(plain), orientation));
        using var scope = torch.NewDisposeScope();
        var t = ImageTensors.Load(rotated, 20);
        if (orientation == 6)
        {
            // Upright image is 20 wide × 40 tall with red on top; the center crop keeps rows 10..29.
            Assert.True(t[0, 2, 10].item<float>() > 0.8f && t[2, 2, 10].item<float>() < -0.8f, "top should be red");
            Assert.True(t[2, 17, 10].item<float>() > 0.8f && t[0, 17, 10].item<float>() < -0.8f, "bottom should be blue");
        }
        else
        {
            // Upright image is 40×20 with red on the right; the crop keeps columns 10..29.
            Assert.True(t[2, 10, 2].item<float>() > 0.8f, "left should be blue");
            Assert.True(t[0, 10, 17].item<float>() > 0.8f, "right should be red");
        }
    }

    [Theory]
    [InlineData(1)] [InlineData(2)] [InlineData(3)] [InlineData(4)]
    [InlineData(5)] [InlineData(6)] [InlineData(7)] [InlineData(8)]
    public void Every_exif_orientation_decodes_upright(byte orientation)
    {
        // Four flat quadrants (red, green / blue, white) survive JPEG; the upright image is the stored one transformed
        // as the EXIF specification says, written here with tensor flips and transposes of the plain decode.
        string plain = Write("quadrants.jpg", 48, 32, (x, y) => (x < 24, y < 16) switch
        {
            (true, true) => new SKColor(255, 0, 0), (false, true) => new SKColor(0, 255, 0),
            (true, false) => new SKColor(0, 0, 255), _ => new SKColor(255, 255, 255),
        }, SKEncodedImageFormat.Jpeg);
        string oriented = Path.Combine(_dir, $"oriented-{orientation}.jpg");
        File.WriteAllBytes(oriented, WithExifOrientation(File.ReadAllBytes(plain), orientation));
        using var scope = torch.NewDisposeScope();
        var stored = ImageTensors.Decode(plain);                       // [3, 32, 48], orientation 1
        var expected = orientation switch
        {
            1 => stored,
            2 => stored.flip(2),                                       // mirrored left-right
            3 => stored.flip(1, 2),                                    // rotated 180°
            4 => stored.flip(1),                                       // mirrored top-bottom
            5 => stored.transpose(1, 2),                               // transposed
            6 => stored.transpose(1, 2).flip(2),                       // rotate 90° clockwise to view
            7 => stored.transpose(1, 2).flip(1, 2),                    // transverse
            _ => stored.transpose(1, 2).flip(1),                       // rotate 90° counter-clockwise to view
        };
        var actual = ImageTensors.Decode(oriented);
        Assert.Equal(expected.shape, actual.shape);
        Assert.True((actual - expected).abs().max().item<float>() < 1e-5, $"orientation {orientation} is not upright");
    }

    [Fact]
    public void Folder_listing_is_sorted_and_filters_extensions()
    {
        Write("b.png", 4, 4, (_, _) => SKColors.Red, SKEncodedImageFormat.Png);
        Write("a.jpg", 4, 4, (_, _) => SKColors.Red, SKEncodedImageFormat.Jpeg);
        File.WriteAllText(Path.Combine(_dir, "readme.txt"), "x");
        Assert.Equal(new[] { "a.jpg", "b.png" }, ImageTensors.ListImages(_dir).Select(Path.GetFileName));
        using var scope = torch.NewDisposeScope();
        Assert.Equal(new long[] { 2, 3, 4, 4 }, ImageTensors.LoadBatch(ImageTensors.ListImages(_dir), 4).shape);
    }
}
