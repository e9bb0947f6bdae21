using System.Buffers.Binary;
using System.Text;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Interop;

public sealed class SafetensorsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-st-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => System.IO.Path.Combine(_dir, name);

    /// <summary>Writes a file from a raw header string and data bytes (for malformed inputs).</summary>
    private string Raw(string name, string header, byte[] data, ulong? headerLength = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + h.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, headerLength ?? (ulong)h.Length);
        h.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + h.Length);
        File.WriteAllBytes(PathOf(name), bytes);
        return PathOf(name);
    }

    public static TheoryData<ScalarType, int, string> Slices() => new()
    {
        { ScalarType.Float32, 0, "1:2" }, { ScalarType.Float32, 0, "0:1,2:2,1:1" }, { ScalarType.BFloat16, 1, "2:3" },
        { ScalarType.Float64, 1, "4:1,0:2" }, { ScalarType.Float32, 2, "0:7" }, { ScalarType.Int64, 2, "6:1,1:3" },
    };

    /// <summary>A memory-mapped slice equals the same ranges cut from the tensor read whole, for every dimension.</summary>
    [Theory]
    [MemberData(nameof(Slices))]
    public void ReadSlice_copies_exactly_the_ranges(ScalarType dtype, int dim, string ranges)
    {
        var segments = ranges.Split(',').Select(r => r.Split(':')).Select(p => (long.Parse(p[0], System.Globalization.CultureInfo.InvariantCulture), long.Parse(p[1], System.Globalization.CultureInfo.InvariantCulture))).ToList();
        using var scope = torch.NewDisposeScope();
        using var t = torch.randn(4, 5, 7, dtype: ScalarType.Float64, generator: new torch.Generator(3)).Times(100).to(dtype);
        using var other = torch.ones(3);
        string path = PathOf("slices.safetensors");
        Safetensors.Save(new Dictionary<string, Tensor> { ["first"] = other, ["t"] = t }, path);
        using var reader = SafetensorsReader.Open(path);
        using var slice = reader.ReadSlice("t", dim, segments);
        using var expected = torch.cat(segments.Select(g => t.narrow(dim, g.Item1, g.Item2)).ToArray(), dim);
        Assert.True(TensorAssert.Same(expected, slice));
        using var viaDefault = ((ITensorSource)new Whole(reader)).ReadSlice("t", dim, segments);   // the interface's default
        Assert.True(TensorAssert.Same(expected, viaDefault));
    }

    /// <summary>A source that only implements Read, so that the interface's default ReadSlice runs.</summary>
    private sealed class Whole(SafetensorsReader inner) : ITensorSource
    {
        public string Path => inner.Path;
        public IReadOnlyList<string> Names => inner.Names;
        public IReadOnlyDictionary<string, string> Metadata => inner.Metadata;
        public bool Contains(string name) => inner.Contains(name);
        public long[] ShapeOf(string name) => inner.ShapeOf(name);
        public Tensor Read(string name) => inner.Read(name);
        public void Dispose() { }
    }

    [Theory]
    [InlineData(3, 0, 1, "no dimension 3")]
    [InlineData(1, 4, 2, "range [4, 6) is empty or lies outside dimension 1 (size 5)")]
    [InlineData(0, -1, 2, "range [-1, 1) is empty or lies outside dimension 0 (size 4)")]
    [InlineData(0, 1, 0, "range [1, 1) is empty or lies outside dimension 0 (size 4)")]
    public void ReadSlice_names_a_bad_range_and_the_file(int dim, long start, long length, string message)
    {
        using var t = torch.zeros(4, 5, 7);
        string path = PathOf("bad-slice.safetensors");
        Safetensors.Save(new Dictionary<string, Tensor> { ["t"] = t }, path);
        using var reader = SafetensorsReader.Open(path);
        var e = Assert.Throws<ArgumentException>(() => reader.ReadSlice("t", dim, new[] { (start, length) }));
        Assert.Contains(message, e.Message);
        Assert.Contains("bad-slice.safetensors", e.Message);
        Assert.Contains("'t'", e.Message);
        Assert.Throws<KeyNotFoundException>(() => reader.ReadSlice("u", 0, new[] { (0L, 1L) }));
        reader.Dispose();
        Assert.Throws<ObjectDisposedException>(() => reader.ReadSlice("t", 0, new[] { (0L, 1L) }));
    }

    [Theory]
    [InlineData(ScalarType.Float32, "F32")]
    [InlineData(ScalarType.Float16, "F16")]
    [InlineData(ScalarType.BFloat16, "BF16")]
    [InlineData(ScalarType.Float64, "F64")]
    [InlineData(ScalarType.Int64, "I64")]
    [InlineData(ScalarType.Int32, "I32")]
    [InlineData(ScalarType.Byte, "U8")]
    [InlineData(ScalarType.Bool, "BOOL")]
    public void Round_trip_preserves_values_shape_and_dtype(ScalarType dtype, string code)
    {
        using var scope = torch.NewDisposeScope();
        var g = new torch.Generator(1);
        var a = torch.randn(new long[] { 3, 5, 2 }, generator: g).Times(100).to(dtype);
        var b = torch.randn(new long[] { 7 }, generator: g).Times(100).to(dtype);
        var empty = torch.zeros(new long[] { 0, 4 }, dtype: dtype);
        string path = PathOf("rt.safetensors");
        Safetensors.Save(new Dictionary<string, Tensor> { ["a.weight"] = a, ["b"] = b, ["empty"] = empty }, path,
            new Dictionary<string, string> { ["format"] = "pt" });

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal("pt", reader.Metadata["format"]);
        Assert.Equal(code, reader["a.weight"].DType);
        var ra = reader.Read("a.weight");
        Assert.Equal(dtype, ra.dtype);
        Assert.Equal(a.shape, ra.shape);
        Assert.True(ra.eq(a).all().item<bool>());
        Assert.True(reader.Read("b").eq(b).all().item<bool>());
        Assert.Equal(new long[] { 0, 4 }, reader.Read("empty").shape);
        // Header length is padded to a multiple of 8, as the reference writer does.
        var bytes = File.ReadAllBytes(path);
        Assert.Equal(0UL, BinaryPrimitives.ReadUInt64LittleEndian(bytes) % 8);
    }

    [Fact]
    public void Reader_reads_a_file_written_by_the_reference_layout()
    {
        // Hand-made file: two F32 tensors [2] and [1, 2], little-endian, offsets relative to the data buffer.
        var data = new byte[16];
        float[] values = { 1.5f, -2f, 3.25f, 4f };
        for (int i = 0; i < 4; i++) BinaryPrimitives.WriteSingleLittleEndian(data.AsSpan(4 * i), values[i]);
        string path = Raw("ref.safetensors",
            "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"y\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[8,16]}}", data);
        var all = Safetensors.Load(path);
        Assert.Equal(new[] { 1.5f, -2f }, all["x"].data<float>().ToArray());
        Assert.Equal(new[] { 3.25f, 4f }, all["y"].data<float>().ToArray());
        Assert.Equal(new long[] { 1, 2 }, all["y"].shape);
    }

    [Fact]
    public void Truncated_file_is_rejected_naming_the_tensor()
    {
        string path = Raw("trunc.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", new byte[10]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("'w'", e.Message);
        Assert.Contains("truncated", e.Message);
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void File_shorter_than_the_length_prefix_is_rejected()
    {
        File.WriteAllBytes(PathOf("tiny.safetensors"), new byte[] { 1, 2, 3 });
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(PathOf("tiny.safetensors")));
        Assert.Contains("8-byte header length", e.Message);
    }

    [Fact]
    public void Header_length_larger_than_the_file_is_rejected()
    {
        string path = Raw("hdr.safetensors", "{}", Array.Empty<byte>(), headerLength: 1_000_000);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("header length 1000000 is larger than the file", e.Message);
    }

    [Fact]
    public void Overlapping_offsets_are_rejected()
    {
        string path = Raw("overlap.safetensors",
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", new byte[12]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("overlapping", e.Message);
        Assert.Contains("'a'", e.Message);
        Assert.Contains("'b'", e.Message);
    }

    [Fact]
    public void Out_of_range_offsets_are_rejected()
    {
        string path = Raw("range.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", new byte[8]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("'a'", e.Message);
        Assert.Contains("past the end", e.Message);
    }

    [Fact]
    public void Offsets_inconsistent_with_shape_are_rejected()
    {
        string path = Raw("size.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", new byte[8]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("needs 12", e.Message);
    }

    [Fact]
    public void A_shape_whose_byte_count_overflows_is_rejected()
    {
        // 2^62 float32 elements are 2^64 bytes, which wraps to 0 in 64 bits: the empty offsets must not pass as its size.
        string path = Raw("wrap.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", Array.Empty<byte>());
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("'a'", e.Message, StringComparison.Ordinal);
        Assert.Contains("too large", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_tensor_named_twice_is_rejected()
    {
        string path = Raw("twice.safetensors",
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", new byte[8]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("'a'", e.Message, StringComparison.Ordinal);
        Assert.Contains("twice", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("[\"0\",\"4\"]")]
    [InlineData("[null,4]")]
    [InlineData("[0,4.5]")]
    public void Offsets_that_are_not_integers_are_rejected(string offsets)
    {
        string path = Raw("offsets.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":" + offsets + "}}", new byte[4]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("'a'", e.Message, StringComparison.Ordinal);
        Assert.Contains("data_offsets", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_file_truncated_while_open_is_named_by_ReadSlice_not_read_past(bool mappedFirst)
    {
        // Before the memory mapping exists, and after (a slice read first): the copy must not run past the file's end.
        string path = PathOf("shrinks.safetensors");
        using (var scope = torch.NewDisposeScope())
            Safetensors.Save(new Dictionary<string, Tensor> { ["head"] = torch.ones(4), ["tail"] = torch.ones(1 << 20) }, path);
        using var reader = SafetensorsReader.Open(path);
        if (mappedFirst) reader.ReadSlice("head", 0, new[] { (0L, 2L) }).Dispose();
        using (var shrink = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite)) shrink.SetLength(200);
        var e = Assert.Throws<SafetensorsFormatException>(() => reader.ReadSlice("tail", 0, new[] { ((1L << 20) - 8, 8L) }));
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
        Assert.Contains("'tail'", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Unknown_dtype_is_rejected()
    {
        string path = Raw("dtype.safetensors", "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", new byte[2]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("unknown dtype 'F8_E4M3'", e.Message);
        Assert.Contains("'a'", e.Message);
    }

    [Fact]
    public void Invalid_json_header_is_rejected()
    {
        string path = Raw("json.safetensors", "{\"a\": [1, 2", Array.Empty<byte>());
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("not valid JSON", e.Message);
    }

    [Fact]
    public void Holes_in_the_buffer_are_rejected()
    {
        string path = Raw("hole.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", new byte[8]);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Open(path));
        Assert.Contains("belong to no tensor", e.Message);
    }

    [Fact]
    public void Missing_file_names_the_path()
    {
        var e = Assert.Throws<FileNotFoundException>(() => SafetensorsReader.Open(PathOf("nope.safetensors")));
        Assert.Contains("nope.safetensors", e.Message);
    }

    [Fact]
    public void Model_checkpoint_round_trip_reproduces_outputs_across_dtypes()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var source = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(source, seed: 3);
        string path = PathOf("model.safetensors");
        SafetensorsCheckpoint.Save(source, path);
        using var target = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        var report = SafetensorsCheckpoint.Load(target, path);
        Assert.True(report.IsExact);
        Assert.Equal(source.state_dict().Count, report.Loaded.Count);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var x = TestUtil.RandomImages(c, 2, seed: 4, ScalarType.Float32);
        Assert.True(source.call(x).eq(target.call(x)).all().item<bool>());
        // Loading float32 weights into a float64 model converts them.
        using var wide = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        SafetensorsCheckpoint.Load(wide, path);
        Assert.True(TestUtil.RelErr(wide.call(x.to(ScalarType.Float64)), source.call(x)) < 1e-5);
    }

    [Fact]
    public void Shape_mismatch_against_the_model_is_reported_and_nothing_is_loaded()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var small = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        string path = PathOf("small.safetensors");
        SafetensorsCheckpoint.Save(small, path);
        using var wide = new VisionTransformer(c with { MlpDim = 32 }, torch.CPU, ScalarType.Float32);
        var before = wide.state_dict()["blocks.0.in_norm.weight"].clone();
        TestUtil.Randomize(wide, 5);
        before = wide.state_dict()["blocks.0.in_norm.weight"].clone();
        var e = Assert.Throws<CheckpointMismatchException>(() => SafetensorsCheckpoint.Load(wide, path, strict: false));
        Assert.Contains(e.Report.Mismatched, m => m.Key == "blocks.0.in_proj.weight" && m.Expected[0] == 32 + 48 && m.Found[0] == 24 + 48);
        Assert.Contains("blocks.0.in_proj.weight: model [80, 16], checkpoint [72, 16]", e.Message);
        using var scope = torch.NewDisposeScope();
        Assert.True(wide.state_dict()["blocks.0.in_norm.weight"].eq(before).all().item<bool>());
    }

    [Fact]
    public void Missing_and_unexpected_keys_fail_in_strict_mode_and_are_reported_otherwise()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var withHead = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        string path = PathOf("head.safetensors");
        SafetensorsCheckpoint.Save(withHead, path);
        using var noHead = new VisionTransformer(c with { NumClasses = 0, ClassToken = true, NoEmbedClass = true }, torch.CPU, ScalarType.Float32);
        var e = Assert.Throws<CheckpointMismatchException>(() => SafetensorsCheckpoint.Load(noHead, path));
        Assert.Contains("head.weight", e.Report.Unexpected);
        Assert.Contains("cls_token", e.Report.Missing);
        var report = SafetensorsCheckpoint.Load(noHead, path, strict: false);
        Assert.False(report.IsExact);
        Assert.Equal(new[] { "head.bias", "head.weight" }, report.Unexpected.OrderBy(k => k));
    }

    [Fact]
    public void Failed_save_leaves_the_previous_file_intact()
    {
        string path = PathOf("keep.safetensors");
        using var scope = torch.NewDisposeScope();
        Safetensors.Save(new Dictionary<string, Tensor> { ["a"] = torch.ones(3) }, path);
        var before = File.ReadAllBytes(path);
        var bad = new Dictionary<string, Tensor> { ["a"] = torch.ones(3), ["c"] = torch.ones(2, dtype: ScalarType.ComplexFloat32) };
        Assert.Throws<ArgumentException>(() => Safetensors.Save(bad, path));
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(_dir));
    }

    [Fact]
    public void Tensors_over_2_GiB_round_trip()
    {
        // 2^31 + 24 bytes: past int.MaxValue, so any int-sized buffer or span would fail.
        long n = (1L << 31) + 24;
        string path = PathOf("big.safetensors");
        using (var scope = torch.NewDisposeScope())
        {
            var big = torch.zeros(n, dtype: ScalarType.Byte);
            big[0] = 7;
            big[n - 1] = 9;
            big[1L << 31] = 5;
            Safetensors.Save(new Dictionary<string, Tensor> { ["small"] = ScalarMath.Arange(3, ScalarType.Float32, torch.CPU), ["big"] = big }, path);
        }
        using var reader = SafetensorsReader.Open(path);
        using var read = reader.Read("big");
        Assert.Equal(n, read.shape[0]);
        using var readScope = torch.NewDisposeScope();
        Assert.Equal(7, read[0].item<byte>());
        Assert.Equal(5, read[1L << 31].item<byte>());
        Assert.Equal(9, read[n - 1].item<byte>());
        Assert.Equal(3f * 2 / 2 + 0, reader.Read("small").sum().item<float>());
        File.Delete(path);
    }
}
