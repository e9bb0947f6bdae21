using System.Globalization;
using System.Text.Json;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>
/// The long memory run: 10,000 inference iterations of a small ViT-22B-style model after 3,000 warm-up iterations;
/// reports the growth of the resident set and of TorchSharp's live tensor count over the loop (both should be 0;
/// the guard test <c>InferenceMemoryTests</c> runs the same loop briefly).
/// </summary>
[Config(typeof(MemoryConfig))]
public class MemoryLoopBenchmarks
{
    private VisionTransformer _model = null!;
    private Tensor _images = null!;

    /// <summary>Iterations of the loop.</summary>
    [Params(10_000)] public int Iterations { get; set; }

    /// <summary>Builds the model.</summary>
    [GlobalSetup]
    public void Setup()
    {
        var c = ViTConfig.Parse("22B/14") with { EmbedDim = 64, Depth = 2, NumHeads = 2, MlpDim = 128, ImgSize = 56, NumClasses = 10 };
        _model = new VisionTransformer(c, Bench.Device, ScalarType.Float32);
        _model.eval();
        _images = Bench.Built(() => torch.randn(2, 3, 56, 56).to(Bench.Device));
    }

    private void Step()
    {
        using var inference = torch.inference_mode();
        using var scope = torch.NewDisposeScope();
        _model.call(_images);
    }

    /// <summary>The loop; writes the growth figures for <see cref="MemoryColumn"/>.</summary>
    [Benchmark]
    public void InferenceLoop()
    {
        for (int i = 0; i < 3000; i++) Step();   // the GC's gen0 budget and tiered JIT settle within ~2,000 iterations
        var before = ProcessMemory.Sample();
        long maxLive = 0;
        for (int i = 0; i < Iterations; i++)
        {
            Step();
            maxLive = Math.Max(maxLive, Tensor.TotalCount);
        }
        var after = ProcessMemory.Sample();
        Directory.CreateDirectory(MfuBenchmark.DataFolder);
        File.WriteAllText(Path.Combine(MfuBenchmark.DataFolder, "memory-loop.json"), JsonSerializer.Serialize(new MemoryRecord(
            (after.ResidentBytes - before.ResidentBytes) / 1048576.0, maxLive - before.LiveTensors, after.LiveTensors - before.LiveTensors)));
    }

    /// <summary>Releases the model.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        _model.Dispose();
        _images.Dispose();
    }

    /// <summary>Growth over the loop.</summary>
    public sealed record MemoryRecord(double RssGrowthMiB, long MaxExtraLiveTensors, long LiveTensorDelta);

    private sealed class MemoryConfig : ManualConfig
    {
        public MemoryConfig() => AddColumn(new MemoryColumn("RSS growth (MiB)"), new MemoryColumn("Extra live tensors (max)"));
    }

    private sealed class MemoryColumn(string name) : ComputedColumn(name, name.StartsWith("RSS", StringComparison.Ordinal)
        ? "Resident set growth over the loop, after warm-up (last run)"
        : "Tensors alive after an iteration beyond those alive before the loop (last run)")
    {
        public override string GetValue(Summary summary, BenchmarkCase benchmarkCase)
        {
            string path = Path.Combine(MfuBenchmark.DataFolder, "memory-loop.json");
            if (!File.Exists(path)) return "n/a";
            var r = JsonSerializer.Deserialize<MemoryRecord>(File.ReadAllText(path))!;
            return ColumnName.StartsWith("RSS", StringComparison.Ordinal) ? r.RssGrowthMiB.ToString("F1", CultureInfo.InvariantCulture) : r.MaxExtraLiveTensors.ToString(CultureInfo.InvariantCulture);
        }
    }
}
