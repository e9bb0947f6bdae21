using System.Globalization;
using System.Reflection;
using System.Text.Json;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using ViT22B.Accounting;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>
/// Base of the MFU suites. After every measured iteration (<see cref="IterationCleanupAttribute"/>, untimed) one
/// GEMM of the benchmark's dtype is timed on the same device (<see cref="MfuMeter"/>'s shapes in turn), so the peak is
/// sampled interleaved with the measured operation in the same process; the peak is the best of those samples. At
/// global cleanup the case writes its model FLOPs per invocation and its GEMM rates to a file that
/// <see cref="MfuColumn"/> reads in the host process.
/// </summary>
public abstract class MfuBenchmark
{
    /// <summary>Folder shared by the benchmark processes and the host (cleared by Program at start).</summary>
    public static string DataFolder => Path.Combine(Path.GetTempPath(), "vit22b-benchmarks-mfu");

    private MfuMeter? _meter;
    private readonly List<double> _gemmRates = new();

    /// <summary>Model FLOPs of one benchmark invocation (set by the derived setup).</summary>
    protected double FlopsPerInvocation { get; set; }

    /// <summary>Starts peak sampling for <paramref name="dtype"/> on <paramref name="device"/>.</summary>
    protected void StartPeakSampling(ScalarType dtype, Device device)
    {
        _meter = new MfuMeter(device, dtype);
        for (int i = 0; i < MfuMeter.MinimumRounds * _meter.Shapes.Count; i++) _gemmRates.Add(_meter.SamplePeak());
    }

    /// <summary>Samples the peak (call from the derived class's [IterationCleanup]).</summary>
    protected void SamplePeak() => _gemmRates.Add(_meter!.SamplePeak());

    /// <summary>Writes the samples (call from the derived class's [GlobalCleanup]).</summary>
    protected void WriteSamples()
    {
        Directory.CreateDirectory(DataFolder);
        var record = new MfuRecord(FlopsPerInvocation, _gemmRates.ToArray());
        var suite = GetType();
        while (suite.BaseType is not null && suite.BaseType != typeof(MfuBenchmark)) suite = suite.BaseType;   // skip BenchmarkDotNet's generated subclasses
        File.WriteAllText(Path.Combine(DataFolder, Key(suite, ParameterPairs(this)) + ".json"), JsonSerializer.Serialize(record));
        _meter!.Dispose();
        _gemmRates.Clear();
    }

    internal static IEnumerable<(string Name, string Value)> ParameterPairs(object benchmark) =>
        benchmark.GetType().GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .Where(p => p.GetCustomAttribute<ParamsAttribute>() is not null)
            .Select(p => (p.Name, Convert.ToString(p.GetValue(benchmark), CultureInfo.InvariantCulture) ?? ""));

    internal static string Key(Type type, IEnumerable<(string Name, string Value)> pairs) =>
        string.Join("_", new[] { type.Name }.Concat(pairs.OrderBy(p => p.Name, StringComparer.Ordinal).Select(p => $"{p.Name}-{p.Value}")))
            .Replace('/', '-').Replace(' ', '-').Replace('+', 'p');
}

/// <summary>What a benchmark case reports to the columns: model FLOPs per invocation, and the FLOP/s of every GEMM
/// timed beside it.</summary>
public sealed record MfuRecord(double Flops, double[] GemmRates);

/// <summary>Columns computed from a case's mean time and its interleaved GEMM samples.</summary>
public sealed class MfuColumn : ComputedColumn
{
    private readonly string _kind;

    private MfuColumn(string kind, string legend, int priority) : base(kind, legend, priority) => _kind = kind;

    /// <summary>Model GFLOP/s achieved.</summary>
    public static readonly IColumn Achieved = new MfuColumn("GFLOP/s",
        "Model FLOPs (docs/model.md: 2 per MAC, matmuls only, training = 3 × forward) per second", 0);
    /// <summary>Best same-run GEMM GFLOP/s.</summary>
    public static readonly IColumn Peak = new MfuColumn("Peak GFLOP/s",
        "Best of the same-dtype GEMMs (MfuMeter's shapes) timed after every iteration of the same case", 1);
    /// <summary>Achieved over same-run peak.</summary>
    public static readonly IColumn Mfu = new MfuColumn("MFU", "Model-FLOPs utilization: GFLOP/s over the same-run peak (n/a when above it: docs/performance.md)", 2);
    /// <summary>Achieved over the datasheet peak in VIT22B_DATASHEET_PEAK_TFLOPS (GPU runs), else "-".</summary>
    public static readonly IColumn DatasheetMfu = new MfuColumn("MFU (datasheet)",
        "Model FLOP/s over VIT22B_DATASHEET_PEAK_TFLOPS (set it on a GPU machine)", 3);

    /// <inheritdoc />
    public override string GetValue(Summary summary, BenchmarkCase benchmarkCase)
    {
        string key = MfuBenchmark.Key(benchmarkCase.Descriptor.Type,
            benchmarkCase.Parameters.Items.Select(p => (p.Name, Convert.ToString(p.Value, CultureInfo.InvariantCulture) ?? "")));
        string path = Path.Combine(MfuBenchmark.DataFolder, key + ".json");
        var mean = summary[benchmarkCase]?.ResultStatistics?.Mean;
        if (!File.Exists(path) || mean is null) return "n/a";
        var r = JsonSerializer.Deserialize<MfuRecord>(File.ReadAllText(path))!;
        if (r.Flops <= 0 || r.GemmRates.Length == 0) return "n/a";
        double achieved = r.Flops / (mean.Value * 1e-9);
        double peak = r.GemmRates.Max();
        return _kind switch
        {
            "GFLOP/s" => (achieved / 1e9).ToString("F1", CultureInfo.InvariantCulture),
            "Peak GFLOP/s" => (peak / 1e9).ToString("F1", CultureInfo.InvariantCulture),
            "MFU" => Short(achieved, peak),
            _ => double.TryParse(Environment.GetEnvironmentVariable("VIT22B_DATASHEET_PEAK_TFLOPS"), CultureInfo.InvariantCulture, out double tf) && tf > 0
                ? Short(achieved, tf * 1e12) : "-",
        };
    }

    // Utilization.Of's definition; a table cell has no room for Utilization.Format's sentence.
    private static string Short(double achieved, double peak) =>
        Utilization.Of(achieved, peak) is { } u ? u.ToString("P1", CultureInfo.InvariantCulture) : "n/a (> peak)";
}

/// <summary>The MFU columns, for [Config].</summary>
public sealed class MfuConfig : ManualConfig
{
    /// <summary>Adds the columns.</summary>
    public MfuConfig() => AddColumn(MfuColumn.Achieved, MfuColumn.Peak, MfuColumn.Mfu, MfuColumn.DatasheetMfu);
}
