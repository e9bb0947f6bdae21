using SkiaSharp;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Imaging;
using static TorchSharp.torch;

namespace ViT22B.Tests.Imaging;

public sealed class DecodeTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-decode-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    // A 4×2 test card: top row red, green, blue, white; bottom row black, gray(128), yellow, cyan.
    private static readonly (byte R, byte G, byte B)[] Card =
    {
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255),
        (0, 0, 0), (128, 128, 128), (255, 255, 0), (0, 255, 255),
    };

    private string Save(string name, byte[] bytes)
    {
        string path = Path.Combine(_dir, name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    private static SKBitmap CardBitmap()
    {
        var bmp = new SKBitmap(new SKImageInfo(4, 2, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        for (int i = 0; i < 8; i++) bmp.SetPixel(i % 4, i / 4, new SKColor(Card[i].R, Card[i].G, Card[i].B));
        return bmp;
    }

    // 24-bit bottom-up BMP, rows padded to 4 bytes.
    private static byte[] Bmp(int w, int h, Func<int, int, (byte R, byte G, byte B)> px, bool headerOnly = false)
    {
        int stride = (3 * w + 3) / 4 * 4, size = headerOnly ? 0 : stride * h;
        var b = new List<byte>();
        void U32(long v) => b.AddRange(BitConverter.GetBytes((uint)v));
        void U16(int v) => b.AddRange(BitConverter.GetBytes((ushort)v));
        b.AddRange("BM"u8.ToArray()); U32(54 + size); U32(0); U32(54);
        U32(40); U32(w); U32(h); U16(1); U16(24); U32(0); U32(size); U32(2835); U32(2835); U32(0); U32(0);
        if (!headerOnly)
            for (int y = h - 1; y >= 0; y--)
            {
                for (int x = 0; x < w; x++) { var (r, g, bl) = px(x, y); b.AddRange(new[] { bl, g, r }); }
                for (int p = 3 * w; p < stride; p++) b.Add(0);
            }
        return b.ToArray();
    }

    // GIF89a with a 4-colour global palette and one frame per index array; LZW codes are kept at 3 bits by
    // emitting a clear code before every pair of pixels (a valid, uncompressed-style stream).
    private static byte[] Gif(int w, int h, (byte, byte, byte)[] palette, params byte[][] frames)
    {
        var b = new List<byte>();
        void U16(int v) => b.AddRange(BitConverter.GetBytes((ushort)v));
        b.AddRange("GIF89a"u8.ToArray()); U16(w); U16(h); b.Add(0xF1); b.Add(0); b.Add(0);
        foreach (var (r, g, bl) in palette) b.AddRange(new[] { r, g, bl });
        foreach (var frame in frames)
        {
            b.Add(0x2C); U16(0); U16(0); U16(w); U16(h); b.Add(0);
            b.Add(2);   // LZW minimum code size
            var codes = new List<int>();
            for (int i = 0; i < frame.Length; i++)
            {
                if (i % 2 == 0) codes.Add(4);   // clear
                codes.Add(frame[i]);
            }
            codes.Add(5);   // end of information
            var bytes = new List<byte>();
            int acc = 0, bits = 0;
            foreach (int c in codes)
            {
                acc |= c << bits;
                bits += 3;
                while (bits >= 8) { bytes.Add((byte)(acc & 0xFF)); acc >>= 8; bits -= 8; }
            }
            if (bits > 0) bytes.Add((byte)acc);
            b.Add((byte)bytes.Count); b.AddRange(bytes); b.Add(0);
        }
        b.Add(0x3B);
        return b.ToArray();
    }

    private static void AssertCard(Tensor t, double tolerance)
    {
        using var scope = torch.NewDisposeScope();
        Assert.Equal(new long[] { 3, 2, 4 }, t.shape);
        for (int i = 0; i < 8; i++)
        {
            var (r, g, b) = Card[i];
            Assert.Equal(r / 255.0, t[0, i / 4, i % 4].item<float>(), tolerance);
            Assert.Equal(g / 255.0, t[1, i / 4, i % 4].item<float>(), tolerance);
            Assert.Equal(b / 255.0, t[2, i / 4, i % 4].item<float>(), tolerance);
        }
    }

    [Fact]
    public void Png_webp_and_bmp_decode_to_known_pixels()
    {
        using var card = CardBitmap();
        using var png = card.Encode(SKEncodedImageFormat.Png, 100);
        using var pixmap = card.PeekPixels();
        using var webp = pixmap.Encode(new SKWebpEncoderOptions(SKWebpEncoderCompression.Lossless, 100));
        foreach (var path in new[]
        {
            Save("card.png", png.ToArray()), Save("card.webp", webp!.ToArray()),
            Save("card.bmp", Bmp(4, 2, (x, y) => Card[y * 4 + x])),
        })
        {
            using var t = ImageTensors.Decode(path);
            AssertCard(t, 1e-6);
        }
    }

    [Fact]
    public void Jpeg_decodes_close_to_its_source()
    {
        // JPEG is lossy and subsamples chroma: flat 8×8 blocks of one colour survive within a few levels.
        using var bmp = new SKBitmap(new SKImageInfo(16, 8, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        for (int y = 0; y < 8; y++) for (int x = 0; x < 16; x++) bmp.SetPixel(x, y, x < 8 ? new SKColor(200, 40, 40) : new SKColor(30, 60, 220));
        using var jpg = bmp.Encode(SKEncodedImageFormat.Jpeg, 100);
        using var t = ImageTensors.Decode(Save("blocks.jpg", jpg.ToArray()));
        using var scope = torch.NewDisposeScope();
        Assert.Equal(200 / 255.0, t[0, 4, 2].item<float>(), 0.03);
        Assert.Equal(40 / 255.0, t[1, 4, 2].item<float>(), 0.03);
        Assert.Equal(220 / 255.0, t[2, 4, 13].item<float>(), 0.03);
    }

    [Fact]
    public void Gif_decodes_its_first_frame()
    {
        var palette = new (byte, byte, byte)[] { (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255) };
        string path = Save("two-frames.gif", Gif(4, 2, palette, new byte[] { 0, 1, 2, 3, 3, 2, 1, 0 }, new byte[] { 3, 3, 3, 3, 3, 3, 3, 3 }));
        using var t = ImageTensors.Decode(path);
        Assert.Equal(new long[] { 3, 2, 4 }, t.shape);
        using var scope = torch.NewDisposeScope();
        byte[] first = { 0, 1, 2, 3, 3, 2, 1, 0 };
        for (int i = 0; i < 8; i++)
        {
            var (r, g, b) = palette[first[i]];
            Assert.Equal(new[] { r / 255f, g / 255f, b / 255f }, new[] { t[0, i / 4, i % 4].item<float>(), t[1, i / 4, i % 4].item<float>(), t[2, i / 4, i % 4].item<float>() });
        }
    }

    [Fact]
    public void Streams_decode_like_files()
    {
        using var card = CardBitmap();
        using var png = card.Encode(SKEncodedImageFormat.Png, 100);
        using var ms = new MemoryStream(png.ToArray());
        using var t = ImageTensors.Decode(ms, "memory.png");
        AssertCard(t, 1e-6);
    }

    [Fact]
    public void Bad_files_are_refused_naming_the_file()
    {
        string empty = Save("empty.png", Array.Empty<byte>());
        var e = Assert.Throws<InvalidDataException>(() => ImageTensors.Decode(empty));
        Assert.Contains(empty, e.Message);
        Assert.Contains("empty (0 bytes)", e.Message);

        string tiff = Save("scan.tif", "II*\0\u0008\0\0\0"u8.ToArray());
        Assert.Contains("unsupported", Assert.Throws<InvalidDataException>(() => ImageTensors.Decode(tiff)).Message);

        string bomb = Save("bomb.bmp", Bmp(30_000, 30_000, (_, _) => (0, 0, 0), headerOnly: true));
        e = Assert.Throws<InvalidDataException>(() => ImageTensors.Decode(bomb));
        Assert.Contains("bomb.bmp", e.Message);
        Assert.Contains("30000×30000 = 900,000,000 pixels", e.Message);
        Assert.Contains("over the limit of 89,478,485", e.Message);
        // With the limit lifted, a size beyond what one .NET array holds is still refused before anything is allocated.
        e = Assert.Throws<InvalidDataException>(() => ImageTensors.Decode(bomb, maxPixels: long.MaxValue));
        Assert.Contains("bomb.bmp", e.Message);
        Assert.Contains("more than this decoder can hold", e.Message);
        string small = Save("small.bmp", Bmp(20, 10, (_, _) => (1, 2, 3)));
        Assert.Contains("over the limit of 100", Assert.Throws<InvalidDataException>(() => ImageTensors.Decode(small, maxPixels: 100)).Message);
        using var ok = ImageTensors.Decode(small, maxPixels: 200);

        Assert.Throws<FileNotFoundException>(() => ImageTensors.Decode(Path.Combine(_dir, "missing.png")));
    }

    private void WriteCard(string relative)
    {
        string path = Path.Combine(_dir, relative);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllBytes(path, Bmp(4, 2, (x, y) => Card[y * 4 + x]));
    }

    [Fact]
    public void Image_folder_lists_classes_and_examples()
    {
        WriteCard("data/cat/1.bmp");
        WriteCard("data/cat/2.bmp");
        WriteCard("data/dog/a.bmp");
        File.WriteAllText(Path.Combine(_dir, "data/dog/notes.txt"), "not an image");
        var ds = new ImageFolderDataset(Path.Combine(_dir, "data"), Transforms.Compose(Transforms.Resize(4, 4), Transforms.Normalize(PixelNormalization.MinusOneToOne)));
        Assert.Equal(new[] { "cat", "dog" }, ds.Classes);
        Assert.Equal(3, ds.Count);
        Assert.EndsWith("dog/a.bmp", ds.Describe(2));
        var ex = ds.Get(2, new Random(0));
        using (ex.Image)
        {
            Assert.Equal(1, ex.Label);
            Assert.Equal(new long[] { 3, 4, 4 }, ex.Image.shape);
        }
    }

    [Fact]
    public void Image_folder_walks_each_class_folder_recursively_in_torchvision_s_order()
    {
        // torchvision's make_dataset: sorted(os.walk(class folder, followlinks=True)), files sorted in each folder. A
        // class whose images all sit in subfolders is a class; a link back up the tree is walked once.
        WriteCard("tree/cat/2.bmp");
        WriteCard("tree/cat/a/1.bmp");
        WriteCard("tree/cat/a b/3.bmp");
        WriteCard("tree/cat/a/x/0.bmp");
        WriteCard("tree/dog/deep/er/5.bmp");
        // A link back up the tree (absolute); a link out of the tree whose target holds a relative link back to itself
        // ('..' from inside it); a link to a sibling folder, which os.walk walks twice.
        Directory.CreateSymbolicLink(Path.Combine(_dir, "tree/cat/a/x/loop"), Path.Combine(_dir, "tree/cat"));
        WriteCard("outside/y/7.bmp");
        Directory.CreateSymbolicLink(Path.Combine(_dir, "tree/cat/a2"), Path.Combine(_dir, "outside"));
        Directory.CreateSymbolicLink(Path.Combine(_dir, "outside/y/up"), "..");
        Directory.CreateSymbolicLink(Path.Combine(_dir, "tree/dog/link"), "deep");
        var ds = new ImageFolderDataset(Path.Combine(_dir, "tree"), Transforms.Normalize(PixelNormalization.MinusOneToOne));
        Assert.Equal(new[] { "cat", "dog" }, ds.Classes);
        // By folder path in ordinal order ("cat/a" < "cat/a b" < "cat/a/x" < "cat/a2", as Python sorts), then by file name.
        var expected = new[] { "cat/2.bmp", "cat/a/1.bmp", "cat/a b/3.bmp", "cat/a/x/0.bmp", "cat/a2/y/7.bmp", "dog/deep/er/5.bmp", "dog/link/er/5.bmp" };
        Assert.Equal(expected, Enumerable.Range(0, ds.Count).Select(i => Path.GetRelativePath(Path.Combine(_dir, "tree"), ds.Describe(i)).Replace('\\', '/')));
    }

    [Fact]
    public void Image_folder_without_classes_or_with_an_empty_class_is_an_error()
    {
        Directory.CreateDirectory(Path.Combine(_dir, "flat"));
        WriteCard("flat-images/x.bmp");
        var e = Assert.Throws<InvalidDataException>(() => new ImageFolderDataset(Path.Combine(_dir, "flat-images"), Transforms.Normalize(PixelNormalization.ImageNet)));
        Assert.Contains("no class sub-folders", e.Message);
        WriteCard("partial/cat/1.bmp");
        Directory.CreateDirectory(Path.Combine(_dir, "partial/dog"));
        e = Assert.Throws<InvalidDataException>(() => new ImageFolderDataset(Path.Combine(_dir, "partial"), Transforms.Normalize(PixelNormalization.ImageNet)));
        Assert.Contains(Path.Combine(_dir, "partial", "dog"), e.Message);
        Assert.Throws<DirectoryNotFoundException>(() => new ImageFolderDataset(Path.Combine(_dir, "nowhere"), Transforms.Normalize(PixelNormalization.ImageNet)));
    }

    [Fact]
    public void Loader_fails_on_a_truncated_image_by_default_and_skips_it_on_request()
    {
        WriteCard("set/a/1.bmp");
        WriteCard("set/a/2.bmp");
        WriteCard("set/b/1.bmp");
        var full = File.ReadAllBytes(Path.Combine(_dir, "set/b/1.bmp"));
        File.WriteAllBytes(Path.Combine(_dir, "set/b/2.bmp"), full[..40]);   // cut inside the header
        var ds = new ImageFolderDataset(Path.Combine(_dir, "set"), Transforms.Normalize(PixelNormalization.MinusOneToOne));
        var strict = new DataLoader(ds, new DataLoaderOptions { BatchSize = 4, Shuffle = false });
        var e = Assert.Throws<InvalidDataException>(() => { foreach (var b in strict.Epoch(0)) b.Dispose(); });
        Assert.Contains("2.bmp", e.Message);
        var lenient = new DataLoader(ds, new DataLoaderOptions { BatchSize = 4, Shuffle = false, SkipBadExamples = true });
        using var batch = lenient.Epoch(0).Single();
        Assert.Equal(3, batch.Count);
        Assert.EndsWith(Path.Combine("b", "2.bmp"), Assert.Single(batch.Skipped).Source);
    }
}
