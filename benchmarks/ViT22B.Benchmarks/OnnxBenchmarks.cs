using System.Globalization;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Onnx;
using ViT22B.OnnxRuntime;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>
/// The same model on the same weights (seeded): this library in float32 (the baseline) and bfloat16, and the ONNX
/// export run by ONNX Runtime with float32 and with int8 linear layers, each case in its own process as BenchmarkDotNet
/// runs them (one process with <c>--inProcess</c>; the interleaved one-process comparison is
/// <c>samples/Mfu --backend both</c>); batch 8 at 224 px, ONNX Runtime on as many
/// threads as libtorch. Models: timm's <c>vit_base_patch16_224</c> (classic blocks) and the B/16 preset with parallel
/// blocks (<c>samples/Mfu --preset B/16 --block parallel</c>). Columns: images/s, and BenchmarkDotNet's ratio to the
/// baseline.
/// </summary>
[Config(typeof(ImagesPerSecondConfig))]
public class OnnxBenchmarks
{
    private const int Batch = 8;
    private VisionTransformer _f32 = null!, _bf16 = null!;
    private OnnxVisionTransformer _onnx = null!, _int8 = null!;
    private Tensor _images = null!, _imagesBf16 = null!;
    private float[] _pixels = null!;
    private long[] _shape = null!;
    private string _folder = null!;

    /// <summary>timm's classic ViT-B/16, or the B/16 preset with parallel blocks.</summary>
    [Params("vit_base_patch16_224", "B/16 parallel")] public string Model { get; set; } = "";

    /// <summary>Builds the four runners from one set of weights.</summary>
    [GlobalSetup]
    public void Setup()
    {
        var c = Model == "B/16 parallel" ? ViTConfig.Parse("B/16") with { Block = BlockKind.Parallel } : ViTConfig.FromTimm(Model);
        torch.manual_seed(0);
        _f32 = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        _f32.eval();
        _bf16 = new VisionTransformer(c, torch.CPU, ScalarType.BFloat16);
        _bf16.eval();
        using (torch.no_grad())
        {
            var source = _f32.state_dict();
            foreach (var (name, p) in _bf16.state_dict()) p.copy_(source[name]);
        }
        _folder = Directory.CreateTempSubdirectory("vit22b-onnx-bench-").FullName;
        var options = new OnnxRunnerOptions { Threads = torch.get_num_threads() };
        string f32 = Path.Combine(_folder, "f32.onnx"), int8 = Path.Combine(_folder, "int8.onnx");
        OnnxExport.Save(_f32, f32);
        OnnxExport.Save(_f32, int8, new OnnxExportOptions { Weights = OnnxWeights.DynamicInt8 });
        _onnx = OnnxVisionTransformer.Load(f32, options);
        _int8 = OnnxVisionTransformer.Load(int8, options);
        _images = torch.randn(new long[] { Batch, c.InChans, c.ImgSize, c.ImgSize }, generator: new torch.Generator(1));
        _imagesBf16 = _images.to(ScalarType.BFloat16);
        _pixels = _images.data<float>().ToArray();
        _shape = _images.shape;
    }

    /// <summary>This library, float32.</summary>
    [Benchmark(Baseline = true)]
    public void TorchFloat32()
    {
        using var mode = torch.inference_mode();
        using var output = _f32.Encode(_images);
    }

    /// <summary>This library, bfloat16.</summary>
    [Benchmark]
    public void TorchBFloat16()
    {
        using var mode = torch.inference_mode();
        using var output = _bf16.Encode(_imagesBf16);
    }

    /// <summary>ONNX Runtime, float32.</summary>
    [Benchmark]
    public void OnnxFloat32() => _onnx.Encode(_pixels, _shape);

    /// <summary>ONNX Runtime, int8 linear layers.</summary>
    [Benchmark]
    public void OnnxInt8() => _int8.Encode(_pixels, _shape);

    /// <summary>Releases everything.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        _onnx.Dispose();
        _int8.Dispose();
        _f32.Dispose();
        _bf16.Dispose();
        _images.Dispose();
        _imagesBf16.Dispose();
        Directory.Delete(_folder, recursive: true);
    }

    /// <summary>Images per second from the mean time of one batch of <see cref="Batch"/>.</summary>
    public sealed class ImagesPerSecondColumn : ComputedColumn
    {
        /// <summary>Creates the column.</summary>
        public ImagesPerSecondColumn() : base("images/s", "Images per second: the batch of 8 over the mean time") { }

        /// <inheritdoc />
        public override string GetValue(Summary summary, BenchmarkCase benchmarkCase) =>
            summary[benchmarkCase]?.ResultStatistics?.Mean is { } ns ? (Batch / (ns * 1e-9)).ToString("F2", CultureInfo.InvariantCulture) : "n/a";
    }

    /// <summary>The images/s column, for [Config].</summary>
    public sealed class ImagesPerSecondConfig : ManualConfig
    {
        /// <summary>Adds the column.</summary>
        public ImagesPerSecondConfig() => AddColumn(new ImagesPerSecondColumn());
    }
}
