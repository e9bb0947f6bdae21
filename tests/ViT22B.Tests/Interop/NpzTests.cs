using System.IO.Compression;
using System.Text;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Tests.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Interop;

/// <summary>.npz reading against archives the tests write byte by byte (the .npy bytes by <see cref="HomeLayouts.Npy"/>;
/// the zip either by <see cref="ZipArchive"/> or, for the malformed ones, by <see cref="RawZip"/>).</summary>
public sealed class NpzTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-npz-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    private static Tensor Values(ScalarType dtype, params long[] shape) =>
        ScalarMath.Arange(shape.Aggregate(1L, (a, b) => a * b), ScalarType.Float64, torch.CPU).reshape(shape).Times(0.25).Minus(3).to(dtype);

    [Theory]
    [InlineData(ScalarType.Float32, false)]
    [InlineData(ScalarType.Float64, true)]
    [InlineData(ScalarType.Float16, true)]
    public void Arrays_round_trip_stored_and_deflated(ScalarType dtype, bool compress)
    {
        using var scope = torch.NewDisposeScope();
        var a = Values(dtype, 2, 3, 4);
        var b = Values(dtype, 5);
        var scalar = torch.tensor(1.5, dtype: dtype);
        string path = PathOf("a.npz");
        HomeLayouts.SaveNpz(path, new[]
        {
            new KeyValuePair<string, byte[]>("block/a", HomeLayouts.Npy(a)),
            new KeyValuePair<string, byte[]>("b", HomeLayouts.Npy(b)),
            new KeyValuePair<string, byte[]>("s", HomeLayouts.Npy(scalar, shapeText: "()")),
        }, compress);
        using var r = NpzReader.Open(path);
        Assert.Equal(new[] { "block/a", "b", "s" }, r.Names);
        Assert.Equal(new long[] { 2, 3, 4 }, r.ShapeOf("block/a"));
        using var ra = r.Read("block/a");
        using var rb = r.Read("b");
        using var rs = r.Read("s");
        Assert.True(TensorAssert.Same(a, ra));
        Assert.True(TensorAssert.Same(b, rb));
        Assert.True(TensorAssert.Same(scalar, rs));
    }

    [Fact]
    public void Fortran_ordered_arrays_are_read_in_their_logical_order()
    {
        using var scope = torch.NewDisposeScope();
        var a = Values(ScalarType.Float32, 3, 4);
        // Fortran order stores the transpose's C-order bytes.
        var bytes = HomeLayouts.Npy(a.t().contiguous(), shapeText: "(3, 4)", fortran: true);
        string path = PathOf("f.npz");
        HomeLayouts.SaveNpz(path, new[] { new KeyValuePair<string, byte[]>("a", bytes) }, compress: false);
        using var r = NpzReader.Open(path);
        using var read = r.Read("a");
        Assert.True(TensorAssert.Same(a, read));
    }

    [Theory]
    [InlineData("<i4", "not a float array")]
    [InlineData("|O", "object array")]
    [InlineData("<V2", "bfloat16")]
    [InlineData(">f4", "big-endian")]
    public void Non_float_object_and_big_endian_dtypes_are_refused(string descr, string expected)
    {
        using var scope = torch.NewDisposeScope();
        var bytes = HomeLayouts.Npy(Values(ScalarType.Float32, 4), descr: descr);
        string path = PathOf("d.npz");
        HomeLayouts.SaveNpz(path, new[] { new KeyValuePair<string, byte[]>("w", bytes) }, compress: false);
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains(expected, e.Message, StringComparison.Ordinal);
        Assert.Contains("'w.npy'", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_header_whose_shape_disagrees_with_the_member_size_is_refused_before_allocation()
    {
        // Claims 2^40 float32 values (4 TiB) in a 64-byte member.
        using var scope = torch.NewDisposeScope();
        var bytes = HomeLayouts.Npy(Values(ScalarType.Float32, 4), shapeText: "(1099511627776,)");
        string path = PathOf("big.npz");
        HomeLayouts.SaveNpz(path, new[] { new KeyValuePair<string, byte[]>("w", bytes) }, compress: false);
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("needs 4398046511104", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_truncated_archive_is_refused()
    {
        string path = PathOf("t.npz");
        using var scope = torch.NewDisposeScope();
        HomeLayouts.SaveNpz(path, new Dictionary<string, Tensor> { ["w"] = Values(ScalarType.Float32, 64) });
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length / 2)]);
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("not a readable zip", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_member_whose_data_ends_early_is_reported_as_truncated()
    {
        // The zip's sizes are consistent with the header, but the deflate stream holds only half the data.
        using var scope = torch.NewDisposeScope();
        var npy = HomeLayouts.Npy(Values(ScalarType.Float32, 256));
        var half = Deflate(npy[..(npy.Length / 2)]);
        string path = PathOf("short.npz");
        File.WriteAllBytes(path, RawZip.Build(new[] { new RawZip.Entry("w.npy", half, Method: 8, UncompressedSize: npy.Length, Crc: RawZip.Crc32(npy)) }));
        using var r = NpzReader.Open(path);
        var e = Assert.Throws<NpzFormatException>(() => r.Read("w"));
        Assert.Contains("truncated member", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(8)]
    public void A_member_whose_bytes_do_not_match_its_crc_is_refused(ushort method)
    {
        // One flipped bit in the last float: a stored member has no other check, so without the CRC it would load.
        using var scope = torch.NewDisposeScope();
        var npy = HomeLayouts.Npy(Values(ScalarType.Float32, 64));
        var flipped = (byte[])npy.Clone();
        flipped[^1] ^= 0x01;
        var data = method == 0 ? flipped : Deflate(flipped);
        string path = PathOf($"crc{method}.npz");
        File.WriteAllBytes(path, RawZip.Build(new[] { new RawZip.Entry("w.npy", data, method, flipped.Length, RawZip.Crc32(npy)) }));
        using var r = NpzReader.Open(path);
        var e = Assert.Throws<NpzFormatException>(() => r.Read("w"));
        Assert.Contains("'w.npy'", e.Message, StringComparison.Ordinal);
        Assert.Contains("CRC-32", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_central_directory_that_disagrees_with_its_end_record_is_named()
    {
        using var scope = torch.NewDisposeScope();
        var npy = HomeLayouts.Npy(Values(ScalarType.Float32, 8));
        var bytes = RawZip.Build(new[] { new RawZip.Entry("w.npy", npy, 0, npy.Length, RawZip.Crc32(npy)) });
        // The end record's two entry counts (bytes 8 and 10 of the 22-byte record) say 2; the directory holds 1.
        bytes[bytes.Length - 22 + 8] = 2;
        bytes[bytes.Length - 22 + 10] = 2;
        string path = PathOf("count.npz");
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_member_claiming_more_than_deflate_can_expand_is_a_zip_bomb()
    {
        var data = Deflate(new byte[1000]);
        string path = PathOf("bomb.npz");
        File.WriteAllBytes(path, RawZip.Build(new[] { new RawZip.Entry("w.npy", data, Method: 8, UncompressedSize: 1L << 31, Crc: 0) }));
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("zip bomb", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_stored_member_claiming_more_bytes_than_it_stores_is_refused_before_allocation()
    {
        // The header and the declared size claim 1000 floats; the stored data holds 250 (a review found this allocated).
        using var scope = torch.NewDisposeScope();
        var full = HomeLayouts.Npy(Values(ScalarType.Float32, 1000));
        var stored = full[..(full.Length - 3000)];
        string path = PathOf("stored-lie.npz");
        File.WriteAllBytes(path, RawZip.Build(new[] { new RawZip.Entry("w.npy", stored, Method: 0, UncompressedSize: full.Length, Crc: RawZip.Crc32(full)) }));
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("stored (uncompressed) member", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Members_sharing_data_are_a_zip_bomb()
    {
        // Three central-directory entries pointing at the same local file (the overlapping-entry zip bomb).
        using var scope = torch.NewDisposeScope();
        var npy = HomeLayouts.Npy(Values(ScalarType.Float32, 500));
        var entry = new RawZip.Entry("w.npy", npy, Method: 0, UncompressedSize: npy.Length, Crc: RawZip.Crc32(npy));
        string path = PathOf("overlap.npz");
        File.WriteAllBytes(path, RawZip.Build(new[] { entry }, centralCopies: 3));
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("share data", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_small_member_listed_twice_beside_a_large_one_is_refused_though_the_sizes_fit_the_file()
    {
        // The sum of compressed sizes (2 × small + large) stays under the file's length here, so only the overlap of the
        // two entries' ranges shows that they share data (a review found the size sum alone let this pass).
        using var scope = torch.NewDisposeScope();
        var small = HomeLayouts.Npy(Values(ScalarType.Float32, 4));
        var large = HomeLayouts.Npy(Values(ScalarType.Float32, 4000));
        var entries = new[]
        {
            new RawZip.Entry("a.npy", small, Method: 0, UncompressedSize: small.Length, Crc: RawZip.Crc32(small)),
            new RawZip.Entry("b.npy", large, Method: 0, UncompressedSize: large.Length, Crc: RawZip.Crc32(large)),
        };
        var bytes = RawZip.Build(entries, alsoPointAt: new[] { 0 });
        Assert.True(2L * small.Length + large.Length <= bytes.Length);
        string path = PathOf("overlap-small.npz");
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("'a.npy' and 'again_a.npy' overlap", e.Message, StringComparison.Ordinal);
        // The same with the offsets in the zip64 extra field (as zipfile writes offsets past 2 GiB): refused with the
        // duplicate listing, read without it (so the offsets are parsed, not just taken as unknown and refused).
        File.WriteAllBytes(path, RawZip.Build(entries, alsoPointAt: new[] { 0 }, zip64: true));
        e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("'a.npy' and 'again_a.npy' overlap", e.Message, StringComparison.Ordinal);
        File.WriteAllBytes(path, RawZip.Build(entries, zip64: true));
        using (var zip64Reader = NpzReader.Open(path))
            Assert.True(TestUtil.MaxAbs(zip64Reader.Read("b").to(ScalarType.Float64), Values(ScalarType.Float32, 4000).to(ScalarType.Float64)) == 0);
        // The same archive without the second listing opens.
        File.WriteAllBytes(path, RawZip.Build(entries));
        using var reader = NpzReader.Open(path);
        Assert.Equal(new[] { "a", "b" }, reader.Names);
    }

    [Fact]
    public void A_member_that_is_not_npy_is_named()
    {
        string path = PathOf("x.npz");
        HomeLayouts.SaveNpz(path, new[] { new KeyValuePair<string, byte[]>("w", Encoding.ASCII.GetBytes("hello, not numpy")) }, compress: false);
        var e = Assert.Throws<NpzFormatException>(() => NpzReader.Open(path));
        Assert.Contains("'w.npy'", e.Message, StringComparison.Ordinal);
        Assert.Contains("magic", e.Message, StringComparison.Ordinal);
    }

    private static byte[] Deflate(byte[] data)
    {
        using var ms = new MemoryStream();
        using (var d = new DeflateStream(ms, CompressionLevel.Optimal, leaveOpen: true)) d.Write(data);
        return ms.ToArray();
    }
}

/// <summary>A minimal zip writer (local headers, central directory, end record; PKWARE APPNOTE 4.3) for archives
/// ZipArchive would not write: sizes that lie and entries that share data.</summary>
internal static class RawZip
{
    public sealed record Entry(string Name, byte[] Data, ushort Method, long UncompressedSize, uint Crc);

    public static uint Crc32(byte[] data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320 : crc >> 1;
        }
        return ~crc;
    }

    /// <param name="alsoPointAt">Entries to list once more in the central directory, under another name, pointing at
    /// the same local header (the overlapping-entry zip bomb with a few entries only).</param>
    /// <param name="zip64">Write every central-directory entry in the zip64 form: local-header offset 0xFFFFFFFF, the
    /// real one in the zip64 extra field (as Python's zipfile does for offsets past 2 GiB).</param>
    public static byte[] Build(IReadOnlyList<Entry> entries, int centralCopies = 1, IReadOnlyList<int>? alsoPointAt = null, bool zip64 = false)
    {
        using var ms = new MemoryStream();
        var w = new BinaryWriter(ms);
        var offsets = new List<long>();
        foreach (var e in entries)
        {
            offsets.Add(ms.Position);
            var name = Encoding.ASCII.GetBytes(e.Name);
            w.Write(0x04034b50u); w.Write((ushort)20); w.Write((ushort)0); w.Write(e.Method); w.Write((ushort)0); w.Write((ushort)0x21);
            w.Write(e.Crc); w.Write((uint)e.Data.Length); w.Write((uint)e.UncompressedSize); w.Write((ushort)name.Length); w.Write((ushort)0);
            w.Write(name); w.Write(e.Data);
        }
        long cdStart = ms.Position;
        int count = 0;
        void Central(Entry e, string entryName, long offset)
        {
            var name = Encoding.ASCII.GetBytes(entryName);
            w.Write(0x02014b50u); w.Write((ushort)45); w.Write((ushort)45); w.Write((ushort)0); w.Write(e.Method); w.Write((ushort)0); w.Write((ushort)0x21);
            w.Write(e.Crc); w.Write((uint)e.Data.Length); w.Write((uint)e.UncompressedSize); w.Write((ushort)name.Length); w.Write((ushort)(zip64 ? 12 : 0));
            w.Write((ushort)0); w.Write((ushort)0); w.Write((ushort)0); w.Write(0u); w.Write(zip64 ? 0xFFFFFFFFu : (uint)offset);
            w.Write(name);
            if (zip64)
            {
                w.Write((ushort)1); w.Write((ushort)8); w.Write((ulong)offset);
            }
            count++;
        }
        for (int copy = 0; copy < centralCopies; copy++)
            for (int i = 0; i < entries.Count; i++)
                Central(entries[i], copy == 0 ? entries[i].Name : $"c{copy}_{entries[i].Name}", offsets[i]);
        foreach (int i in alsoPointAt ?? Array.Empty<int>())
            Central(entries[i], $"again_{entries[i].Name}", offsets[i]);
        long cdSize = ms.Position - cdStart;
        w.Write(0x06054b50u); w.Write((ushort)0); w.Write((ushort)0); w.Write((ushort)count); w.Write((ushort)count);
        w.Write((uint)cdSize); w.Write((uint)cdStart); w.Write((ushort)0);
        w.Flush();
        return ms.ToArray();
    }
}

/// <summary>Hugging Face sharded checkpoints and the source opener.</summary>
public sealed class TensorSourcesTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-src-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    private static Dictionary<string, Tensor> Tensors() => Enumerable.Range(0, 5).ToDictionary(i => $"t{i}", i => ScalarMath.Full(new long[] { i + 1 }, i, ScalarType.Float32, torch.CPU));

    [Fact]
    public void A_sharded_checkpoint_reads_as_one_source()
    {
        string index = HomeLayouts.SaveSharded(Tensors(), PathOf("m"), shards: 2);
        using var s = TensorSources.Open(PathOf("m"));
        Assert.IsType<SafetensorsIndex>(s);
        Assert.Equal(5, s.Names.Count);
        foreach (var (k, v) in Tensors())
        {
            using var read = s.Read(k);
            Assert.True(TensorAssert.Same(v, read));
        }
        Assert.Equal(2, ((SafetensorsIndex)s).ShardPaths.Count);
        Assert.Equal(index, s.Path);
    }

    [Fact]
    public void An_index_naming_a_missing_shard_or_a_path_outside_its_folder_is_refused()
    {
        string index = HomeLayouts.SaveSharded(Tensors(), PathOf("m"), shards: 2);
        File.Delete(Path.Combine(PathOf("m"), "model-00002-of-00002.safetensors"));
        var missing = Assert.Throws<FileNotFoundException>(() => SafetensorsIndex.Open(index));
        Assert.Contains("model-00002-of-00002.safetensors", missing.Message, StringComparison.Ordinal);

        File.WriteAllText(index, "{\"weight_map\": {\"t0\": \"../elsewhere.safetensors\"}}");
        var outside = Assert.Throws<SafetensorsFormatException>(() => SafetensorsIndex.Open(index));
        Assert.Contains("not a plain file name", outside.Message, StringComparison.Ordinal);

        File.WriteAllText(index, "{\"weight_map\": {\"t0\": \"model-00001-of-00002.safetensors\", \"t1\": \"model-00001-of-00002.safetensors\"}}");
        var wrong = Assert.Throws<SafetensorsFormatException>(() => SafetensorsIndex.Open(index));
        Assert.Contains("'t1'", wrong.Message, StringComparison.Ordinal);   // t1 lives in shard 2

        File.WriteAllText(index, "{ not json");
        Assert.Throws<SafetensorsFormatException>(() => SafetensorsIndex.Open(index));
    }

    [Fact]
    public void Unknown_kinds_and_empty_folders_are_named()
    {
        File.WriteAllText(PathOf("w.bin"), "x");
        var e = Assert.Throws<ArgumentException>(() => TensorSources.Open(PathOf("w.bin")));
        Assert.Contains(".npz", e.Message, StringComparison.Ordinal);
        Directory.CreateDirectory(PathOf("empty"));
        Assert.Throws<FileNotFoundException>(() => TensorSources.Open(PathOf("empty")));
        Assert.Throws<FileNotFoundException>(() => TensorSources.Open(PathOf("nothing.safetensors")));
    }
}
