// Mfu: measures model-FLOPs utilization of a preset against the best same-dtype GEMM timed in the same run (or a
// datasheet peak), and with --backend both the same model through ONNX Runtime beside it.
//
//   dotnet run --project samples/Mfu -c Release -- --preset B/16 --batch-size 8 --dtype bfloat16
//   dotnet run --project samples/Mfu -c Release -- --preset B/16 --mode training --dtype bfloat16 --json mfu.json --csv mfu.csv
//   dotnet run --project samples/Mfu -c Release -- --preset B/16 --backend both --onnx-weights int8
using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Spectre.Console;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Accounting;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Onnx;
using ViT22B.OnnxRuntime;
using ViT22B.Training;
using static TorchSharp.torch;

var presetOption = new Option<string>("--preset") { Description = "Preset (e.g. B/16, S/16, So400m/14, 22B/14) or timm name (e.g. vit_base_patch16_224).", DefaultValueFactory = _ => "B/16" };
var blockOption = new Option<string?>("--block") { Description = "Override the block kind: parallel or sequential, or both (the two models measured interleaved in one run, with their speed ratio)." };
var batchOption = new Option<int>("--batch-size") { Description = "Images per step.", DefaultValueFactory = _ => 8 }.AtLeast(1);
var dtypeOption = new Option<string>("--dtype") { Description = "float32 or bfloat16 (float16, float64 also accepted).", DefaultValueFactory = _ => "float32" };
var deviceOption = SampleMain.DeviceOption();
var modeOption = new Option<string>("--mode") { Description = "inference, forward-backward (no optimizer), or training (forward, backward, AdamW step).", DefaultValueFactory = _ => "inference" };
var samplesOption = new Option<int>("--samples") { Description = "Timed rounds (a GEMM before each measured step); medians are reported.", DefaultValueFactory = _ => 10 }.AtLeast(1);
var warmupOption = new Option<int>("--warmup") { Description = "Untimed warm-up steps.", DefaultValueFactory = _ => 2 }.AtLeast(0);
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var peakOption = new Option<double?>("--peak-tflops") { Description = "Take MFU against this datasheet peak (TFLOP/s) instead of the best GEMM of the run (which is still timed and printed), e.g. 989 for an H100 SXM in bf16 dense." };
var recomputeOption = new Option<string>("--checkpointing") { Description = "Training modes: blocks that recompute their activations in backward (none, all, every:N or blocks:I,J,…); HFU then counts the recomputed forward passes, MFU does not.", DefaultValueFactory = _ => "none" };
var backendOption = new Option<string>("--backend") { Description = "torch (this library), onnx (the same model exported to ONNX and run by ONNX Runtime, inference only), or both (measured interleaved, with their speed ratio).", DefaultValueFactory = _ => "torch" };
var onnxWeightsOption = new Option<string>("--onnx-weights") { Description = "Weights of the ONNX export: float32 or int8 (dynamic int8 linear layers).", DefaultValueFactory = _ => "float32" };
var jsonOption = new Option<FileInfo?>("--json") { Description = "Write the result as JSON." };
var csvOption = new Option<FileInfo?>("--csv") { Description = "Write the result as CSV." };
var root = new RootCommand("Measure the model-FLOPs utilization (MFU) of a ViT preset against a same-run GEMM peak.")
{
    presetOption, blockOption, batchOption, dtypeOption, deviceOption, modeOption, samplesOption, warmupOption, threadsOption, peakOption, recomputeOption, backendOption, onnxWeightsOption, jsonOption, csvOption,
};
root.SetAction(parse =>
{
    if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
    string presetArg = parse.GetValue(presetOption)!;
    var config = ViTConfig.TimmNames.Contains(presetArg) ? ViTConfig.FromTimm(presetArg) : ViTConfig.Parse(presetArg);
    var configs = parse.GetValue(blockOption) switch
    {
        null => new[] { config },
        "both" => new[] { (config with { Block = BlockKind.Sequential }).Validate(), (config with { Block = BlockKind.Parallel }).Validate() },
        var block when block is "parallel" or "sequential" => new[] { (config with { Block = ViTConfigJson.ParseBlock(block) }).Validate() },
        var block => throw new ArgumentException($"--block must be parallel, sequential or both, found '{block}'."),
    };
    var dtype = ViTConfigJson.ParseDType(parse.GetValue(dtypeOption)!);
    string mode = parse.GetValue(modeOption)!;
    if (mode is not ("inference" or "forward-backward" or "training")) throw new ArgumentException($"--mode must be inference, forward-backward or training, found '{mode}'.");
    string backend = parse.GetValue(backendOption)!;
    if (backend is not ("torch" or "onnx" or "both")) throw new ArgumentException($"--backend must be torch, onnx or both, found '{backend}'.");
    if (backend != "torch" && mode != "inference") throw new ArgumentException($"--backend {backend} measures inference only; --mode is {mode}.");
    var onnxWeights = parse.GetValue(onnxWeightsOption) switch
    {
        "float32" => OnnxWeights.F32,
        "int8" => OnnxWeights.DynamicInt8,
        var w => throw new ArgumentException($"--onnx-weights must be float32 or int8, found '{w}'."),
    };
    if (parse.GetValue(peakOption) is double pk && !(pk > 0)) throw new ArgumentException($"--peak-tflops must be positive, found {pk}.");
    SampleMain.CheckOutput(parse.GetValue(jsonOption), "--json");
    SampleMain.CheckOutput(parse.GetValue(csvOption), "--csv");
    var results = Measure(configs, parse.GetValue(presetOption)!, parse.GetValue(batchOption), dtype, SampleMain.Device(parse.GetValue(deviceOption)!),
        mode, parse.GetValue(samplesOption), parse.GetValue(warmupOption), parse.GetValue(peakOption), ActivationCheckpointing.Parse(parse.GetValue(recomputeOption)!),
        backend, onnxWeights);
    Print(results);
    if (parse.GetValue(jsonOption) is { } json) AtomicFile.Write(json.FullName, s => JsonSerializer.Serialize(s, results, new JsonSerializerOptions { WriteIndented = true }));
    if (parse.GetValue(csvOption) is { } csv)
        AtomicFile.Write(csv.FullName, s => s.Write(Encoding.UTF8.GetBytes(MfuResult.CsvHeader + string.Concat(results.Select(r => r.ToCsvRow())))));
    return 0;
});
return SampleMain.Invoke(root, args);

// Builds one model per config and measures them interleaved with the same-dtype GEMM (MfuMeter.MeasureInterleaved);
// with --backend onnx or both, each model is also exported to ONNX (same weights) and run by ONNX Runtime in the rounds.
static MfuResult[] Measure(IReadOnlyList<ViTConfig> configs, string preset, int batch, ScalarType dtype, Device device, string mode, int samples, int warmup, double? datasheetTflops,
    ActivationCheckpointing recompute, string backend, OnnxWeights onnxWeights)
{
    if (device.type == DeviceType.CPU)
        foreach (var c in configs) ModelAccounting.EnsureFitsInHostMemory(c, dtype);
    var config = configs[0];
    using var images = Built(() => torch.randn(new long[] { batch, config.InChans, config.ImageShape.Height, config.ImageShape.Width }, generator: new torch.Generator(1)).to(dtype).to(device));
    using var labels = Built(() => torch.tensor(Enumerable.Range(0, batch).Select(i => (long)(i % Math.Max(1, config.NumClasses))).ToArray()).to(device));
    var disposables = new List<IDisposable>();
    string? folder = null;
    try
    {
        var cases = new List<(ViTConfig Config, string Backend, Action Step, double Flops, double HardwareFlops)>();
        foreach (var c in configs)
        {
            torch.manual_seed(0);
            var model = new VisionTransformer(c, device, dtype);
            disposables.Add(model);
            var flops = ModelAccounting.Flops(c);
            if (backend != "torch")
            {
                // The same weights through ONNX Runtime (float32 compute, or int8 linear layers), on as many threads.
                folder ??= Directory.CreateTempSubdirectory("vit22b-mfu-").FullName;
                string path = Path.Combine(folder, $"{c.Block}.onnx");
                OnnxExport.Save(model, path, new OnnxExportOptions { Weights = onnxWeights });
                var vit = OnnxVisionTransformer.Load(path, new OnnxRunnerOptions { Threads = torch.get_num_threads() });
                disposables.Add(vit);
                using var f32 = Built(() => images.to(ScalarType.Float32).cpu().contiguous());
                var data = f32.data<float>().ToArray();
                var shape = f32.shape;
                cases.Add((c, onnxWeights == OnnxWeights.DynamicInt8 ? "onnx-int8" : "onnx", () => vit.Encode(data, shape), batch * flops.Forward, batch * flops.Forward));
                if (backend == "onnx") continue;
            }
            if (mode == "inference")
            {
                model.eval();
                cases.Add((c, "torch", () =>
                {
                    using var inference = torch.inference_mode();
                    using var scope = torch.NewDisposeScope();
                    model.call(images);
                }, batch * flops.Forward, batch * flops.Forward));
                continue;
            }
            model.train();
            model.Checkpointing = recompute;
            // The library's AdamW, as Trainer runs it: float32 master weights and state for 16-bit parameters.
            var optimizer = new AdamW(Optimizer.WithWeightDecay(model, weightDecay: 1e-4, headWeightDecay: 1e-4));
            disposables.Add(optimizer);
            bool update = mode == "training";
            cases.Add((c, "torch", () =>
            {
                using var scope = torch.NewDisposeScope();
                optimizer.ZeroGrad();
                var output = model.call(images);
                var output32 = output.to(ScalarType.Float32);
                var loss = c.NumClasses > 0 ? nn.functional.cross_entropy(output32, labels) : output32.mul(output32).mean();
                loss.backward();
                if (update) optimizer.Step(1e-4);
            }, batch * flops.Training, batch * ModelAccounting.HardwareTrainingFlops(c, recompute)));
        }
        using var meter = new MfuMeter(device, dtype);
        var measured = meter.MeasureInterleaved(cases.Select(k => (k.Step, k.Flops)).ToList(), samples, warmup);
        return measured.Select((m, i) =>
        {
            var k = cases[i];
            bool onnx = k.Backend != "torch";
            return new MfuResult(preset, k.Config.Block.ToString().ToLowerInvariant(), k.Backend, mode, onnx ? "float32" : ViTConfigJson.DTypeName(dtype), device.ToString(), batch,
                torch.get_num_threads(), batch * k.Config.NumTokens / m.StepSeconds, batch / m.StepSeconds, m.AchievedFlopsPerSecond / 1e12,
                k.HardwareFlops / m.StepSeconds / 1e12, onnx ? null : m.PeakFlopsPerSecond / 1e12, datasheetTflops,
                mode == "inference" ? "none" : recompute.ToString(), m.StepSeconds, samples,
                i == 0 ? null : MfuMeter.MedianRatio(measured[0].StepSamples, m.StepSamples), Machine(device));
        }).ToArray();
    }
    finally
    {
        for (int i = disposables.Count - 1; i >= 0; i--) disposables[i].Dispose();
        if (folder is not null) Directory.Delete(folder, recursive: true);
    }
}

// A tensor made by a chain of calls, in a dispose scope that keeps the chain's temporaries reachable until the native
// calls reading them have returned (docs/torchsharp-notes.md).
static Tensor Built(Func<Tensor> make)
{
    using var scope = torch.NewDisposeScope();
    return make().MoveToOuterDisposeScope();
}

static void Print(IReadOnlyList<MfuResult> results)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 160;
    var first = results[0];
    string peakSource = first.DatasheetPeakTflops is { } d ? $"peak: datasheet {d} TFLOP/s" : "peak: best same-dtype GEMM of the run";
    var t = new Table().AddColumns("preset", "block", "backend", "mode", "dtype", "device", "batch", "tokens/s", "images/s", "achieved TFLOP/s", "best GEMM TFLOP/s", $"MFU ({peakSource})", "HFU", "recompute");
    foreach (var r in results)
        t.AddRow(r.Preset, r.Block, r.Backend, r.Mode, r.DType, r.Device, $"{r.Batch}", $"{r.TokensPerSecond:N0}", $"{r.ImagesPerSecond:F2}",
            $"{r.AchievedTflops:F4}", r.PeakTflops is { } p ? $"{p:F4}" : "-", r.MfuText.EscapeMarkup(), r.HfuText.EscapeMarkup(), r.Recompute);
    AnsiConsole.Write(t);
    string Name(MfuResult r) => $"{r.Block} ({r.Backend})";
    foreach (var r in results.Skip(1))
        AnsiConsole.MarkupLine($"{Name(r)} vs {Name(first)}: {r.SpeedupOverFirst:F3}× as fast (median over rounds of the first step's time over this one's).".EscapeMarkup());
    // A utilization is only as good as its peak: when ONNX Runtime's float32 run beats the run's best libtorch GEMM,
    // that GEMM is not this processor's limit, and the torch rows' utilization is against libtorch's GEMM only.
    double? gemm = results.Where(r => r.Backend == "torch" && r.DType == "float32").Select(r => r.PeakTflops).Max();
    foreach (var r in results.Where(r => r.Backend == "onnx" && gemm is { } g && r.AchievedTflops > g))
        AnsiConsole.MarkupLine(($"Note: ONNX Runtime ({r.Block}, float32) reached {r.AchievedTflops:F4} TFLOP/s of model FLOPs, above the run's best float32 libtorch GEMM ({gemm:F4}): " +
            "that GEMM is not this processor's float32 limit, so the torch rows' float32 utilization is relative to libtorch's GEMM, not to the machine.").EscapeMarkup());
    AnsiConsole.MarkupLine(($"Median of {first.Samples} interleaved samples; step {string.Join(" / ", results.Select(r => $"{r.StepSeconds * 1000:F1} ms"))}; " +
        $"{first.Threads} threads on {first.Machine}. Model FLOPs per docs/model.md (2 per MAC, matmuls only, forward-backward and training = 3 × forward); HFU adds the forward FLOPs of recomputed blocks; " +
        "utilization is never printed above 100 % (docs/performance.md); ONNX Runtime rows report throughput only.").EscapeMarkup());
}

// The machine a measurement ran on, for the record: the CPU's model name and logical CPU count (Linux: /proc/cpuinfo),
// and the CUDA device when one ran it (TorchSharp 0.107 has no device-name call).
static string Machine(Device device)
{
    string? cpu = null;
    if (File.Exists("/proc/cpuinfo"))
        cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim();
    string host = $"{cpu ?? System.Runtime.InteropServices.RuntimeInformation.OSDescription}, {Environment.ProcessorCount} logical CPUs";
    return device.type == DeviceType.CUDA ? $"{device} on {host}" : host;
}

/// <summary>One MFU measurement, as printed and as written to JSON/CSV.</summary>
/// <param name="SpeedupOverFirst">With several blocks measured in one run: how many times as fast as the first
/// (median over rounds of the first step's time over this step's); null for the first.</param>
/// <param name="Machine">The CPU model and logical CPU count, and the CUDA device when one ran it.</param>
/// <param name="PeakTflops">The best same-dtype GEMM of the run; null for ONNX Runtime rows (its own GEMM peak is not
/// measured, so they report throughput only).</param>
internal sealed record MfuResult(string Preset, string Block, string Backend, string Mode, string DType, string Device, int Batch, int Threads,
    double TokensPerSecond, double ImagesPerSecond, double AchievedTflops, double HardwareTflops, double? PeakTflops, double? DatasheetPeakTflops,
    string Recompute, double StepSeconds, int Samples, double? SpeedupOverFirst, string Machine)
{
    /// <summary>The peak the utilization is taken against: the datasheet's when given, else the best GEMM of the run.</summary>
    public double? UtilizationPeakTflops => PeakTflops is null ? null : DatasheetPeakTflops ?? PeakTflops;
    public double? Mfu => UtilizationPeakTflops is { } p ? Utilization.Of(AchievedTflops, p) : null;
    public double? Hfu => UtilizationPeakTflops is { } p ? Utilization.Of(HardwareTflops, p) : null;
    public string MfuText => UtilizationPeakTflops is { } p ? Utilization.Format(AchievedTflops * 1e12, p * 1e12) : "-";
    public string HfuText => UtilizationPeakTflops is { } p ? Utilization.Format(HardwareTflops * 1e12, p * 1e12) : "-";

    public const string CsvHeader = "preset,block,backend,mode,dtype,device,batch,threads,tokens_per_s,images_per_s,achieved_tflops,hardware_tflops,best_gemm_tflops,datasheet_peak_tflops,mfu,hfu,recompute,step_s,samples,speedup_over_first,machine\n";

    public string ToCsvRow()
    {
        var c = CultureInfo.InvariantCulture;
        return string.Join(",", Preset, Block, Backend, Mode, DType, Device, Batch.ToString(c), Threads.ToString(c), TokensPerSecond.ToString("R", c), ImagesPerSecond.ToString("R", c),
            AchievedTflops.ToString("R", c), HardwareTflops.ToString("R", c), PeakTflops?.ToString("R", c) ?? "", DatasheetPeakTflops?.ToString("R", c) ?? "",
            Mfu?.ToString("R", c) ?? "", Hfu?.ToString("R", c) ?? "", $"\"{Recompute}\"", StepSeconds.ToString("R", c), Samples.ToString(c), SpeedupOverFirst?.ToString("R", c) ?? "", $"\"{Machine.Replace("\"", "'", StringComparison.Ordinal)}\"") + "\n";
    }
}
