using System.IO.Compression;
using ViT22B.Data;
using static TorchSharp.torch;

namespace ViT22B.Tests.Data;

public sealed class IdxFileTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-idx-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    // IDX by hand: big-endian magic 0x000008NN, dims as u32 big-endian, raw bytes.
    private static byte[] Idx(int[] dims, byte[] data, byte type = 0x08)
    {
        var bytes = new List<byte> { 0, 0, type, (byte)dims.Length };
        foreach (int d in dims) bytes.AddRange(new[] { (byte)(d >> 24), (byte)(d >> 16), (byte)(d >> 8), (byte)d });
        bytes.AddRange(data);
        return bytes.ToArray();
    }

    private string Write(string name, byte[] bytes, bool gzip = false)
    {
        string path = Path.Combine(_dir, name);
        if (!gzip) { File.WriteAllBytes(path, bytes); return path; }
        using var fs = File.Create(path);
        using var gz = new GZipStream(fs, CompressionLevel.Fastest);
        gz.Write(bytes);
        return path;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Reads_images_and_labels_gzipped_or_not(bool gzip)
    {
        var pixels = Enumerable.Range(0, 2 * 3 * 4).Select(i => (byte)(i * 7)).ToArray();
        string images = Write("img" + (gzip ? ".gz" : ""), Idx(new[] { 2, 3, 4 }, pixels), gzip);
        string labels = Write("lbl" + (gzip ? ".gz" : ""), Idx(new[] { 2 }, new byte[] { 1, 0 }), gzip);

        using var t = IdxFile.Read(images);
        Assert.Equal(new long[] { 2, 3, 4 }, t.shape);
        Assert.Equal(ScalarType.Byte, t.dtype);
        Assert.Equal(pixels, t.data<byte>().ToArray());
        Assert.Equal(pixels[1 * 12 + 2 * 4 + 3], t[1, 2, 3].item<byte>());   // row-major: image 1, row 2, column 3

        using var ds = IdxFile.LoadDataset(images, labels, new[] { "a", "b" });
        Assert.Equal(2, ds.Count);
        var ex = ds.Get(0, new Random(0));
        using (ex.Image)
        {
            Assert.Equal(1, ex.Label);
            Assert.Equal(new long[] { 1, 3, 4 }, ex.Image.shape);
            Assert.Equal(pixels[5] / 255.0, ex.Image[0, 1, 1].item<float>(), 6);   // uint8 scaled to [0, 1]
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_header_declaring_more_data_than_the_file_holds_is_refused_before_allocating_it(bool gzip)
    {
        // Almost 2 GiB declared, none present: a reader must not allocate that on the word of an 8-byte header.
        string path = Write("huge" + (gzip ? ".gz" : ""), Idx(new[] { 0x7FFFFF00 }, Array.Empty<byte>()), gzip);
        long before = GC.GetAllocatedBytesForCurrentThread();
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.Read(path));
        Assert.True(GC.GetAllocatedBytesForCurrentThread() - before < 8 << 20, "the reader allocated more than a few MB on the header's word");
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
        Assert.Contains($"needs {0x7FFFFF00:N0} data bytes, the file holds 0", e.Message, StringComparison.Ordinal);
        // 2^31 − 1: more than any .NET array holds.
        string larger = Write("larger" + (gzip ? ".gz" : ""), Idx(new[] { int.MaxValue }, Array.Empty<byte>()), gzip);
        e = Assert.Throws<InvalidDataException>(() => IdxFile.Read(larger));
        Assert.Contains("the most one array holds", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_dataset_without_examples_is_named()
    {
        string images = Write("img0", Idx(new[] { 0, 3, 4 }, Array.Empty<byte>()));
        string labels = Write("lbl0", Idx(new[] { 0 }, Array.Empty<byte>()));
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.LoadDataset(images, labels, new[] { "a" }));
        Assert.Contains("no examples", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Wrong_magic_number_is_named()
    {
        var bytes = Idx(new[] { 2 }, new byte[] { 1, 2 });
        bytes[0] = 0x1F; bytes[1] = 0x00;   // not two zero bytes (and not a gzip header either)
        string path = Write("bad-magic", bytes);
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.Read(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("magic number 0x1F000801", e.Message);
    }

    [Fact]
    public void Unsupported_data_type_is_named()
    {
        string path = Write("float", Idx(new[] { 1 }, new byte[] { 0, 0, 0, 0 }, type: 0x0D));
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.Read(path));
        Assert.Contains("data type 0x0D", e.Message);
        Assert.Contains(path, e.Message);
    }

    [Theory]
    [InlineData(-1, "needs 12 data bytes, the file holds 11")]
    [InlineData(+1, "data continues past the 12 bytes")]
    public void Length_that_disagrees_with_the_header_is_an_error(int delta, string expected)
    {
        string path = Write("short", Idx(new[] { 3, 4 }, new byte[12 + delta]), gzip: true);
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.Read(path));
        Assert.Contains(expected, e.Message);
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void Truncated_header_and_empty_file_are_errors()
    {
        string empty = Write("empty", Array.Empty<byte>());
        Assert.Contains("shorter than its 4-byte magic", Assert.Throws<InvalidDataException>(() => IdxFile.Read(empty)).Message);
        string header = Write("header", new byte[] { 0, 0, 8, 3, 0, 0 });
        Assert.Contains("ends inside its header", Assert.Throws<InvalidDataException>(() => IdxFile.Read(header)).Message);
    }

    [Fact]
    public void Corrupt_gzip_names_the_file()
    {
        string path = Write("corrupt.gz", new byte[] { 0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 1, 2, 3 });
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.Read(path));
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void Images_and_labels_must_agree()
    {
        string images = Write("img", Idx(new[] { 2, 2, 2 }, new byte[8]));
        string three = Write("lbl3", Idx(new[] { 3 }, new byte[] { 0, 1, 0 }));
        var e = Assert.Throws<InvalidDataException>(() => IdxFile.LoadDataset(images, three, new[] { "a", "b" }));
        Assert.Contains("holds 2 images", e.Message);
        Assert.Contains("holds 3 labels", e.Message);
        string big = Write("lblbig", Idx(new[] { 2 }, new byte[] { 0, 7 }));
        Assert.Contains("label 7", Assert.Throws<InvalidDataException>(() => IdxFile.LoadDataset(images, big, new[] { "a", "b" })).Message);
    }

    [Fact]
    public void Missing_fashion_mnist_files_say_how_to_install_them()
    {
        var e = Assert.Throws<FileNotFoundException>(() => IdxFile.LoadFashionMnist(_dir, train: true));
        Assert.Contains("train-images-idx3-ubyte", e.Message);
        Assert.Contains("apt-get install dataset-fashion-mnist", e.Message);
    }
}
