using TorchSharp;
using ViT22B.Data;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Onnx;
using ViT22B.Onnx.Proto;
using ViT22B.OnnxRuntime;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Onnx;

/// <summary>
/// Exported models run by ONNX Runtime compute what the library computes. Every config of the numerics tests'
/// matrix (both block kinds; MAP, GAP and class-token heads; learned and sin-cos positions; LayerNorm and RMSNorm;
/// with and without biases, QK-norm, LayerScale, registers, pre-norm, fused or unfused out-projections; three
/// activations) is exported once and run at batch 1 and 3.
/// </summary>
public sealed class OnnxExportTests : IDisposable
{
    // Bounds chosen before running, as max |onnx − library| / max |library| over each output:
    private const double Float32Bound = 1e-5;     // the same float32 arithmetic in another order
    private const double LowPrecisionBound = 5e-2; // 16-bit weights against the library computing in that dtype
    private const double Int8Bound = 0.1;          // int8 linear layers against float32 (plus cosine ≥ 0.99 per image)

    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-onnx-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    public static TheoryData<string> Variants() => new(TestUtil.Variants().Select(v => v.Name));

    private static VisionTransformer Model(ViTConfig c, long seed = 1, ScalarType dtype = ScalarType.Float32)
    {
        var model = new VisionTransformer(c, torch.CPU, dtype);
        TestUtil.Randomize(model, seed);
        model.eval();
        return model;
    }

    private string Export(VisionTransformer model, OnnxExportOptions? options = null, string name = "model.onnx")
    {
        string path = Path.Combine(_dir, name);
        OnnxExport.Save(model, path, options);
        return path;
    }

    private static (float[] Data, long[] Shape) Pixels(Tensor images)
    {
        using var scope = torch.NewDisposeScope();
        using var f = images.to(ScalarType.Float32).contiguous();
        return (f.data<float>().ToArray(), f.shape);
    }

    private static Tensor AsTensor(OnnxArray a) => torch.tensor(a.Data, dtype: ScalarType.Float32).reshape(a.Shape);

    private static void AssertClose(ViTOutput expected, OnnxViTOutput actual, double bound, string what)
    {
        using var scope = torch.NewDisposeScope();
        double pooled = TestUtil.RelErr(AsTensor(actual.Pooled), expected.Pooled);
        double tokens = TestUtil.RelErr(AsTensor(actual.PatchTokens), expected.PatchTokens);
        Assert.True(pooled <= bound, $"{what}: features differ by {pooled:E2} (bound {bound:E0})");
        Assert.True(tokens <= bound, $"{what}: tokens differ by {tokens:E2} (bound {bound:E0})");
        Assert.Equal(expected.Logits is null, actual.Logits is null);
        if (expected.Logits is null) return;
        double logits = TestUtil.RelErr(AsTensor(actual.Logits!), expected.Logits);
        Assert.True(logits <= bound, $"{what}: logits differ by {logits:E2} (bound {bound:E0})");
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public void An_export_computes_what_the_library_computes_at_two_batch_sizes(string variant)
    {
        var c = TestUtil.Variants().Single(v => v.Name == variant).Config;
        using var model = Model(c);
        using var vit = OnnxVisionTransformer.Load(Export(model), new OnnxRunnerOptions { Threads = 1 });
        foreach (long batch in new[] { 1L, 3L })
        {
            using var images = TestUtil.RandomImages(c, batch, seed: 7, ScalarType.Float32);
            using var inference = torch.inference_mode();
            using var expected = model.Encode(images);
            var (data, shape) = Pixels(images);
            AssertClose(expected, vit.Encode(data, shape), Float32Bound, $"{variant}, batch {batch}");
        }
    }

    [Theory]
    [InlineData(BlockKind.Parallel, PosEmbedKind.Learn, false, false, GlobalPool.Map, 0)]
    [InlineData(BlockKind.Parallel, PosEmbedKind.Learn, true, false, GlobalPool.Token, 0)]
    [InlineData(BlockKind.Parallel, PosEmbedKind.Learn, true, true, GlobalPool.Token, 0)]
    [InlineData(BlockKind.Parallel, PosEmbedKind.SinCos2d, true, false, GlobalPool.Token, 0)]
    [InlineData(BlockKind.Sequential, PosEmbedKind.Learn, true, false, GlobalPool.Token, 0)]
    [InlineData(BlockKind.Sequential, PosEmbedKind.Learn, true, true, GlobalPool.Gap, 2)]
    [InlineData(BlockKind.Sequential, PosEmbedKind.SinCos2d, false, false, GlobalPool.Gap, 0)]
    public void A_dynamic_size_export_takes_other_image_sizes(BlockKind block, PosEmbedKind pos, bool classToken, bool noEmbedClass, GlobalPool pool, int registers)
    {
        var c = TestUtil.Tiny(block) with
        {
            DynamicImgSize = true, PosEmbed = pos, ClassToken = classToken, NoEmbedClass = noEmbedClass, GlobalPool = pool, RegTokens = registers,
        };
        using var model = Model(c);
        string path = Export(model);
        var input = ModelProto.Parser.ParseFrom(File.ReadAllBytes(path)).Graph.Input.Single();
        Assert.Equal(new[] { "batch", "", "height", "width" }, input.Type.TensorType.Shape.Dim.Select(d => d.DimParam));
        using var vit = OnnxVisionTransformer.Load(path, new OnnxRunnerOptions { Threads = 1 });
        Assert.Null(vit.ImageSize);
        // The trained grid (4 × 4), a larger one, a smaller one, a non-square one, and grids one patch high or wide
        // (ONNX's pytorch_half_pixel puts a length-1 output at input 0, torch at the middle: half_pixel is torch's).
        foreach (var (h, w) in new[] { (16L, 16L), (28L, 24L), (8L, 8L), (12L, 20L), (4L, 16L), (16L, 4L) })
        {
            using var images = TestUtil.RandomImages(c, 2, seed: 3, ScalarType.Float32, h, w);
            using var inference = torch.inference_mode();
            using var expected = model.Encode(images);
            var (data, shape) = Pixels(images);
            AssertClose(expected, vit.Encode(data, shape), Float32Bound, $"{block} {pos} {pool} at {h}×{w}");
        }
        // Sizes the library refuses (not a multiple of the patch, smaller than one) are refused here too, by name.
        foreach (var (h, w) in new[] { (18L, 16L), (2L, 16L) })
        {
            var e = Assert.Throws<ArgumentException>(() => vit.Encode(new float[2 * 3 * h * w], new[] { 2L, 3, h, w }));
            Assert.Contains("multiple of the patch size 4", e.Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public void A_disposed_runner_refuses_to_run()
    {
        using var model = Model(TestUtil.Tiny(BlockKind.Parallel));
        var vit = OnnxVisionTransformer.Load(Export(model), new OnnxRunnerOptions { Threads = 1 });
        using var images = TestUtil.RandomImages(model.Config, 1, seed: 5, ScalarType.Float32);
        var (data, shape) = Pixels(images);
        vit.Dispose();
        Assert.Throws<ObjectDisposedException>(() => vit.Encode(data, shape));
        vit.Dispose();      // twice is harmless
    }

    [Fact]
    public void Disposing_while_another_thread_encodes_waits_for_it()
    {
        // A thread encodes again and again; the runner is disposed under it. Every call either completes with the full
        // result or throws ObjectDisposedException; none may see a released session (a native use-after-free).
        using var model = Model(TestUtil.Tiny(BlockKind.Parallel));
        var vit = OnnxVisionTransformer.Load(Export(model), new OnnxRunnerOptions { Threads = 1 });
        using var images = TestUtil.RandomImages(model.Config, 8, seed: 6, ScalarType.Float32);
        var (data, shape) = Pixels(images);
        var expected = vit.Encode(data, shape).Pooled.Data;
        int completed = 0;
        using var first = new ManualResetEventSlim();
        Exception? failure = null;
        var worker = new Thread(() =>
        {
            try
            {
                while (true)
                {
                    var r = vit.Encode(data, shape);
                    Assert.Equal(expected, r.Pooled.Data);
                    Interlocked.Increment(ref completed);
                    first.Set();
                }
            }
            catch (ObjectDisposedException)
            {
            }
            catch (Exception e)
            {
                failure = e;
            }
            finally
            {
                first.Set();
            }
        });
        worker.Start();
        first.Wait();
        vit.Dispose();
        Assert.True(worker.Join(TimeSpan.FromSeconds(60)), "the encoding thread did not stop");
        Assert.Null(failure);
        Assert.True(completed >= 1);
    }

    [Theory]
    [InlineData(BlockKind.Parallel)]
    [InlineData(BlockKind.Sequential)]
    public void Non_square_images_with_a_remainder_export(BlockKind block)
    {
        // 18 × 26 pixels of 4 × 4 patches: a 4 × 6 grid, the last 2 rows and columns dropped by the convolution.
        var c = TestUtil.Tiny(block) with { ImgSize = 18, ImgWidth = 26, ClassToken = true, RegTokens = 1, GlobalPool = GlobalPool.Token };
        using var model = Model(c);
        using var vit = OnnxVisionTransformer.Load(Export(model), new OnnxRunnerOptions { Threads = 1 });
        Assert.Equal((18, 26), vit.ImageSize);
        using var images = TestUtil.RandomImages(c, 2, seed: 4, ScalarType.Float32);
        using var inference = torch.inference_mode();
        using var expected = model.Encode(images);
        Assert.Equal(24, expected.PatchTokens.shape[1]);
        var (data, shape) = Pixels(images);
        AssertClose(expected, vit.Encode(data, shape), Float32Bound, $"{block} 18×26");
    }

    [Theory]
    [InlineData(OnnxWeights.F16, ScalarType.Float16, "Parallel-vit22b")]
    [InlineData(OnnxWeights.BF16, ScalarType.BFloat16, "Parallel-vit22b")]
    [InlineData(OnnxWeights.F16, ScalarType.Float16, "Sequential-classic")]
    [InlineData(OnnxWeights.BF16, ScalarType.BFloat16, "Sequential-layerscale-quickgelu-registers")]
    public void Sixteen_bit_weights_are_the_rounded_weights_run_in_float32(OnnxWeights weights, ScalarType dtype, string variant)
    {
        var c = TestUtil.Variants().Single(v => v.Name == variant).Config with { EmbedDim = 64, NumHeads = 4, MlpDim = 128 };
        using var model = Model(c);
        string path = Export(model, new OnnxExportOptions { Weights = weights });
        Assert.True(new FileInfo(path).Length < new FileInfo(Export(model, name: "f32.onnx")).Length * 0.6, "16-bit weights should halve the file");
        // The library's model with the same rounded weights, in float32: the same numbers.
        using var rounded = Model(c);
        using (torch.no_grad())
        using (torch.NewDisposeScope())
            foreach (var (name, p) in rounded.named_parameters()) p.copy_(p.to(dtype).to(ScalarType.Float32));
        // The library computing in the 16-bit dtype itself: close, within the low-precision bound.
        using var low = Model(c, dtype: dtype);
        using var vit = OnnxVisionTransformer.Load(path, new OnnxRunnerOptions { Threads = 1 });
        using var images = TestUtil.RandomImages(c, 3, seed: 5, ScalarType.Float32);
        var (data, shape) = Pixels(images);
        var actual = vit.Encode(data, shape);
        using var inference = torch.inference_mode();
        using (var expected = rounded.Encode(images)) AssertClose(expected, actual, Float32Bound, $"{weights} vs rounded float32");
        using (var lowOut = low.Encode(images.to(dtype))) AssertClose(lowOut, actual, LowPrecisionBound, $"{weights} vs the library in {dtype}");
    }

    [Theory]
    [InlineData(BlockKind.Parallel)]
    [InlineData(BlockKind.Sequential)]
    public void Int8_linear_layers_stay_close_to_float32(BlockKind block)
    {
        var c = TestUtil.Tiny(block) with { EmbedDim = 64, NumHeads = 4, MlpDim = 128 };
        using var model = Model(c);
        TestUtil.Randomize(model, 1, scale: 0.1);
        string path = Export(model, new OnnxExportOptions { Weights = OnnxWeights.DynamicInt8 });
        var graph = ModelProto.Parser.ParseFrom(File.ReadAllBytes(path)).Graph;
        int linears = model.named_modules().Count(m => m.module is TorchSharp.Modules.Linear);
        Assert.Equal(linears, graph.Node.Count(n => n.OpType == "MatMulInteger"));
        using var vit = OnnxVisionTransformer.Load(path, new OnnxRunnerOptions { Threads = 1 });
        using var images = TestUtil.RandomImages(c, 3, seed: 5, ScalarType.Float32);
        var (data, shape) = Pixels(images);
        var actual = vit.Encode(data, shape);
        using var inference = torch.inference_mode();
        using var expected = model.Encode(images);
        AssertClose(expected, actual, Int8Bound, "int8");
        using var scope = torch.NewDisposeScope();
        using var a = AsTensor(actual.Pooled);
        double cosine = nn.functional.cosine_similarity(a, expected.Pooled, 1).min().item<float>();
        Assert.True(cosine >= 0.99, $"int8 features: cosine {cosine:F4} < 0.99");
    }

    [Fact]
    public void The_graph_is_standard_opset_18_with_named_outputs_and_round_trips_its_metadata()
    {
        var c = TestUtil.Variants().Single(v => v.Name == "Sequential-classic").Config;
        using var model = Model(c);
        var preprocessing = new Preprocessing(Preprocessing.ImageNetMean, Preprocessing.ImageNetStd, ResizeMode.CenterCrop, 0.9, Resampling.Bicubic);
        string path = Export(model, new OnnxExportOptions { Preprocessing = preprocessing });
        var proto = ModelProto.Parser.ParseFrom(File.ReadAllBytes(path));
        Assert.Equal(18, proto.OpsetImport.Single().Version);
        Assert.Equal("", proto.OpsetImport.Single().Domain);
        Assert.All(proto.Graph.Node, n => Assert.Equal("", n.Domain));
        Assert.Equal(new[] { "features", "tokens", "logits" }, proto.Graph.Output.Select(o => o.Name));
        Assert.Equal("batch", proto.Graph.Input.Single().Type.TensorType.Shape.Dim[0].DimParam);

        using var vit = OnnxVisionTransformer.Load(path);
        Assert.Equal(c with { DType = ScalarType.Float32 }, ViTConfigJson.FromJson(vit.Metadata[OnnxExport.ConfigMetadataKey]));
        Assert.Equal(preprocessing, Preprocessing.FromJson(vit.Metadata[Preprocessing.MetadataKey]));
        Assert.Equal(new[] { 0.485f, 0.456f, 0.406f }, vit.Mean);
        Assert.Equal(new[] { 0.229f, 0.224f, 0.225f }, vit.Std);
        Assert.Equal((16, 16), vit.ImageSize);
        Assert.Equal(3, vit.Channels);
        Assert.Equal(c.NumClasses, vit.Classes);
        Assert.Equal("CPU", vit.ExecutionProvider);   // the CPU build of ONNX Runtime: no CUDA provider to use

        // A one-channel model normalizes with the mean of the RGB statistics, as Transforms.Normalize does.
        using (var gray = Model(c with { InChans = 1 }))
        using (var grayVit = OnnxVisionTransformer.Load(Export(gray, new OnnxExportOptions { Preprocessing = preprocessing }, "gray.onnx")))
        {
            Assert.Equal(new[] { (float)((0.485 + 0.456 + 0.406) / 3) }, grayVit.Mean);
            var one = new float[] { 0.25f };
            grayVit.Normalize(one, new long[] { 1, 1, 1, 1 });
            using var scope = torch.NewDisposeScope();
            using var expected = Transforms.Normalize(Preprocessing.ImageNetMean, Preprocessing.ImageNetStd)(ScalarMath.Full(new long[] { 1, 1, 1 }, 0.25f, ScalarType.Float32, torch.CPU), new Random(0));
            Assert.Equal(expected.item<float>(), one[0], 5);
        }
        var pixels = new float[] { 0.5f, 0.5f, 0.5f, 0.5f };
        Assert.Throws<ArgumentException>(() => vit.Normalize(pixels, new long[] { 1, 1, 2, 2 }));
        var rgb = Enumerable.Repeat(0.5f, 3).ToArray();
        vit.Normalize(rgb, new long[] { 1, 3, 1, 1 });
        Assert.Equal((0.5f - 0.456f) / 0.224f, rgb[1], 6);
    }

    private sealed class CustomStack : BlockStack<nn.Module<Tensor, Tensor>>
    {
        public CustomStack() : base(nn.Identity()) { }
        public override Tensor forward(Tensor x) => this[0].call(x);
    }

    [Fact]
    public void A_module_without_an_onnx_form_is_named_and_an_existing_file_is_kept()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32, (_, _, _) => new CustomStack(), _ => { });
        string path = Path.Combine(_dir, "keep.onnx");
        File.WriteAllText(path, "previous export");
        var e = Assert.Throws<NotSupportedException>(() => OnnxExport.Save(model, path));
        Assert.Contains("'blocks' is a CustomStack", e.Message, StringComparison.Ordinal);
        Assert.Equal("previous export", File.ReadAllText(path));
    }

    [Fact]
    public void A_model_beyond_one_protobuf_message_is_refused_before_its_weights_are_copied()
    {
        using var model = Model(TestUtil.Tiny(BlockKind.Parallel));
        long parameters = model.parameters().Sum(p => p.numel());
        // Below 4 bytes per parameter: float32 is refused by the check before any copy, 16-bit fits.
        var e = Assert.Throws<NotSupportedException>(() => OnnxExport.Build(model, null, maxBytes: parameters * 3));
        Assert.Contains("external data", e.Message, StringComparison.Ordinal);
        Assert.NotNull(OnnxExport.Build(model, new OnnxExportOptions { Weights = OnnxWeights.BF16 }, maxBytes: parameters * 3));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Weights_beyond_one_message_go_to_an_external_data_file_that_onnx_runtime_reads(bool asked)
    {
        var c = TestUtil.Variants().Single(v => v.Name == "Sequential-classic").Config with { EmbedDim = 64, NumHeads = 4, MlpDim = 128 };
        using var model = Model(c);
        long parameters = model.parameters().Sum(p => p.numel());
        string path = Path.Combine(_dir, "external.onnx");
        // Asked for, or forced by a message limit below the weights' size.
        OnnxExport.SaveWithLimit(model, path, new OnnxExportOptions { ExternalData = asked }, maxBytes: asked ? OnnxExport.MaxModelBytes : parameters * 2);
        Assert.True(File.Exists(path + ".data"));
        var proto = ModelProto.Parser.ParseFrom(File.ReadAllBytes(path));
        var external = proto.Graph.Initializer.Where(t => t.DataLocation == TensorProto.Types.DataLocation.External).ToList();
        Assert.NotEmpty(external);
        Assert.All(external, t => Assert.Equal("external.onnx.data", t.ExternalData.Single(e => e.Key == "location").Value));
        Assert.All(external, t => Assert.Equal(0, long.Parse(t.ExternalData.Single(e => e.Key == "offset").Value, System.Globalization.CultureInfo.InvariantCulture) % 4096));
        Assert.True(new FileInfo(path).Length < new FileInfo(path + ".data").Length / 4, "the weights should live in the data file");
        using var vit = OnnxVisionTransformer.Load(path, new OnnxRunnerOptions { Threads = 1 });
        using var images = TestUtil.RandomImages(c, 2, seed: 9, ScalarType.Float32);
        using var inference = torch.inference_mode();
        using var expected = model.Encode(images);
        var (data, shape) = Pixels(images);
        AssertClose(expected, vit.Encode(data, shape), Float32Bound, "external data");
    }

    [Theory]
    [InlineData(OnnxWeights.F32)]
    [InlineData(OnnxWeights.BF16)]
    [InlineData(OnnxWeights.DynamicInt8)]
    public void The_weights_go_to_external_data_exactly_when_they_exceed_one_message(OnnxWeights weights)
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { EmbedDim = 64, NumHeads = 4, MlpDim = 128 };
        using var model = Model(c);
        TestUtil.Randomize(model, 1, scale: 0.1);
        var options = new OnnxExportOptions { Weights = weights };
        // The dry run's size is the raw data the export with the weights inside really stores (an int8 export also
        // stores float32 scales and its unquantised weights, so no per-parameter count gives it).
        long bytes = OnnxExport.WeightBytes(model, options);
        byte[] inlineBytes = OnnxExport.ToBytes(model, options);
        var inline = ModelProto.Parser.ParseFrom(inlineBytes);
        Assert.Equal(inline.Graph.Initializer.Sum(t => (long)t.RawData.Length), bytes);
        Assert.Throws<NotSupportedException>(() => OnnxExport.Build(model, options, maxBytes: bytes - 1));
        // At the limit: one file; one byte below it: a data file beside the model, computing the same.
        string fits = Path.Combine(_dir, $"fits-{weights}.onnx"), spills = Path.Combine(_dir, $"spills-{weights}.onnx");
        OnnxExport.SaveWithLimit(model, fits, options, maxBytes: bytes);
        OnnxExport.SaveWithLimit(model, spills, options, maxBytes: bytes - 1);
        Assert.False(File.Exists(fits + ".data"));
        Assert.Equal(inlineBytes, File.ReadAllBytes(fits));
        Assert.True(File.Exists(spills + ".data"));
        Assert.True(new FileInfo(spills).Length < new FileInfo(spills + ".data").Length / 4, "the weights should live in the data file");
        using var vit = OnnxVisionTransformer.Load(spills, new OnnxRunnerOptions { Threads = 1 });
        using var inside = OnnxVisionTransformer.Load(fits, new OnnxRunnerOptions { Threads = 1 });
        using var images = TestUtil.RandomImages(c, 2, seed: 4, ScalarType.Float32);
        var (data, shape) = Pixels(images);
        Assert.Equal(inside.Encode(data, shape).Pooled.Data, vit.Encode(data, shape).Pooled.Data);
    }

    [Fact]
    public void Every_scalar_attribute_is_written_even_when_it_is_zero()
    {
        // ReduceMean's keepdims = 0 under global average pooling: a proto3 field without presence would leave the 0 out,
        // and a reader that checks for the field (ONNX's getAttribute with a default) would take keepdims = 1.
        var c = TestUtil.Variants().Single(v => v.Name == "Parallel-gap-sincos").Config;
        using var model = Model(c);
        var graph = ModelProto.Parser.ParseFrom(OnnxExport.ToBytes(model)).Graph;
        var attributes = graph.Node.SelectMany(n => n.Attribute).ToList();
        Assert.Contains(attributes, a => a.Name == "keepdims" && a.HasI && a.I == 0);
        Assert.All(attributes.Where(a => a.Type == AttributeProto.Types.AttributeType.Int), a => Assert.True(a.HasI, a.Name));
        Assert.All(attributes.Where(a => a.Type == AttributeProto.Types.AttributeType.Float), a => Assert.True(a.HasF, a.Name));
    }

    [Fact]
    public void The_runner_rejects_truncated_foreign_and_unrelated_files_and_wrong_images_with_clear_errors()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var model = Model(c);
        var bytes = OnnxExport.ToBytes(model);
        string truncated = Path.Combine(_dir, "truncated.onnx");
        File.WriteAllBytes(truncated, bytes[..(bytes.Length / 2)]);
        var e = Assert.Throws<InvalidDataException>(() => OnnxVisionTransformer.Load(truncated));
        Assert.Contains(truncated, e.Message, StringComparison.Ordinal);

        string foreign = Path.Combine(_dir, "weights.onnx");
        File.WriteAllText(foreign, "{\"__metadata__\": {}} not a protobuf at all");
        Assert.Contains(foreign, Assert.Throws<InvalidDataException>(() => OnnxVisionTransformer.Load(foreign)).Message, StringComparison.Ordinal);

        // A valid ONNX model that is not a ViT: y = Identity(x).
        var other = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "identity" } };
        other.OpsetImport.Add(new OperatorSetIdProto { Version = 18 });
        other.Graph.Node.Add(new NodeProto { OpType = "Identity", Input = { "x" }, Output = { "y" } });
        other.Graph.Input.Add(OnnxGraph.Value("x", TensorProto.Types.DataType.Float, 2));
        other.Graph.Output.Add(OnnxGraph.Value("y", TensorProto.Types.DataType.Float, 2));
        string unrelated = Path.Combine(_dir, "identity.onnx");
        File.WriteAllBytes(unrelated, Google.Protobuf.MessageExtensions.ToByteArray(other));
        var u = Assert.Throws<InvalidDataException>(() => OnnxVisionTransformer.Load(unrelated));
        Assert.Contains("'images'", u.Message, StringComparison.Ordinal);
        Assert.Contains("'x'", u.Message, StringComparison.Ordinal);

        // ViT-like names, but a symbolic channel count (with preprocessing metadata), or float16 outputs.
        ModelProto Lookalike(object channels, TensorProto.Types.DataType outputs)
        {
            var m = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "lookalike" } };
            m.OpsetImport.Add(new OperatorSetIdProto { Version = 18 });
            m.Graph.Input.Add(OnnxGraph.Value("images", TensorProto.Types.DataType.Float, "batch", channels, 16, 16));
            string x = "images";
            if (outputs != TensorProto.Types.DataType.Float)
            {
                m.Graph.Node.Add(new NodeProto { OpType = "Cast", Input = { "images" }, Output = { "half" }, Attribute = { OnnxGraph.Int("to", (long)outputs) } });
                x = "half";
            }
            foreach (var name in new[] { "features", "tokens" })
            {
                m.Graph.Node.Add(new NodeProto { OpType = "Identity", Input = { x }, Output = { name } });
                m.Graph.Output.Add(OnnxGraph.Value(name, outputs, "batch", channels, 16, 16));
            }
            m.MetadataProps.Add(new StringStringEntryProto { Key = "preprocessing", Value = "{\"mean\": [0.5, 0.5, 0.5], \"std\": [0.5, 0.5, 0.5]}" });
            return m;
        }
        foreach (var (name, proto, says) in new[]
        {
            ("symbolic-channels.onnx", Lookalike("channels", TensorProto.Types.DataType.Float), "fixed channel count"),
            ("half-outputs.onnx", Lookalike(3, TensorProto.Types.DataType.Float16), "outputs must be float"),
        })
        {
            string lookalike = Path.Combine(_dir, name);
            File.WriteAllBytes(lookalike, Google.Protobuf.MessageExtensions.ToByteArray(proto));
            var l = Assert.Throws<InvalidDataException>(() => OnnxVisionTransformer.Load(lookalike));
            Assert.Contains(says, l.Message, StringComparison.Ordinal);
            Assert.Contains(lookalike, l.Message, StringComparison.Ordinal);
        }

        Assert.Throws<FileNotFoundException>(() => OnnxVisionTransformer.Load(Path.Combine(_dir, "missing.onnx")));

        string good = Export(model);
        using var vit = OnnxVisionTransformer.Load(good);
        var wrongSize = Assert.Throws<ArgumentException>(() => vit.Encode(new float[3 * 20 * 20], new long[] { 1, 3, 20, 20 }));
        Assert.Contains("[?, 3, 16, 16]", wrongSize.Message, StringComparison.Ordinal);
        var wrongLength = Assert.Throws<ArgumentException>(() => vit.Encode(new float[10], new long[] { 1, 3, 16, 16 }));
        Assert.Contains("768", wrongLength.Message, StringComparison.Ordinal);
    }
}
