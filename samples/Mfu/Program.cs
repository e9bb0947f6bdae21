// Mfu: measures model-FLOPs utilization of a preset against the peak of a same-dtype GEMM timed in the same run.
//
//   dotnet run --project samples/Mfu -c Release -- --preset B/16 --batch-size 8 --dtype bfloat16
//   dotnet run --project samples/Mfu -c Release -- --preset B/16 --mode training --dtype bfloat16 --json mfu.json --csv mfu.csv
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
using ViT22B.Training;
using static TorchSharp.torch;

var presetOption = new Option<string>("--preset") { Description = "Preset, e.g. B/16, S/16, So400m/14, 22B/14.", DefaultValueFactory = _ => "B/16" };
var blockOption = new Option<string?>("--block") { Description = "Override the block kind: parallel or sequential, or both (the two models measured interleaved in one run, with their speed ratio)." };
var batchOption = new Option<int>("--batch-size") { Description = "Images per step.", DefaultValueFactory = _ => 8 }.AtLeast(1);
var dtypeOption = new Option<string>("--dtype") { Description = "float32 or bfloat16 (float16, float64 also accepted).", DefaultValueFactory = _ => "float32" };
var deviceOption = new Option<string>("--device") { Description = "cpu or cuda[:N].", DefaultValueFactory = _ => "cpu" };
var modeOption = new Option<string>("--mode") { Description = "inference, forward-backward (no optimizer), or training (forward, backward, AdamW step).", DefaultValueFactory = _ => "inference" };
var samplesOption = new Option<int>("--samples") { Description = "Timed rounds (a GEMM before each measured step); medians are reported.", DefaultValueFactory = _ => 10 }.AtLeast(1);
var warmupOption = new Option<int>("--warmup") { Description = "Untimed warm-up steps.", DefaultValueFactory = _ => 2 }.AtLeast(0);
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var peakOption = new Option<double?>("--datasheet-peak-tflops") { Description = "Also report MFU against this datasheet peak (TFLOP/s), e.g. 989 for an H100 SXM in bf16 dense." };
var recomputeOption = new Option<string>("--checkpointing") { Description = "Training modes: blocks that recompute their activations in backward (none, all, every:N or blocks:I,J,…); HFU then counts the recomputed forward passes, MFU does not.", DefaultValueFactory = _ => "none" };
var jsonOption = new Option<FileInfo?>("--json") { Description = "Write the result as JSON." };
var csvOption = new Option<FileInfo?>("--csv") { Description = "Write the result as CSV." };
var root = new RootCommand("Measure the model-FLOPs utilization (MFU) of a ViT preset against a same-run GEMM peak.")
{
    presetOption, blockOption, batchOption, dtypeOption, deviceOption, modeOption, samplesOption, warmupOption, threadsOption, peakOption, recomputeOption, jsonOption, csvOption,
};
root.SetAction(parse =>
{
    try
    {
        if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
        var config = ViTConfig.Parse(parse.GetValue(presetOption)!);
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
        var results = Measure(configs, parse.GetValue(presetOption)!, parse.GetValue(batchOption), dtype, new Device(parse.GetValue(deviceOption)!),
            mode, parse.GetValue(samplesOption), parse.GetValue(warmupOption), parse.GetValue(peakOption), ActivationCheckpointing.Parse(parse.GetValue(recomputeOption)!));
        Print(results);
        if (parse.GetValue(jsonOption) is { } json) AtomicFile.Write(json.FullName, s => JsonSerializer.Serialize(s, results, new JsonSerializerOptions { WriteIndented = true }));
        if (parse.GetValue(csvOption) is { } csv)
            AtomicFile.Write(csv.FullName, s => s.Write(Encoding.UTF8.GetBytes(MfuResult.CsvHeader + string.Concat(results.Select(r => r.ToCsvRow())))));
        return 0;
    }
    catch (Exception e) when (e is ArgumentException or FormatException or InsufficientMemoryException)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 1;
    }
});
return SampleMain.Invoke(root, args);

// Builds one model per config and measures them interleaved with the same-dtype GEMM (MfuMeter.MeasureInterleaved).
static MfuResult[] Measure(IReadOnlyList<ViTConfig> configs, string preset, int batch, ScalarType dtype, Device device, string mode, int samples, int warmup, double? datasheetTflops, ActivationCheckpointing recompute)
{
    if (device.type == DeviceType.CPU)
        foreach (var c in configs) ModelAccounting.EnsureFitsInHostMemory(c, dtype);
    var config = configs[0];
    using var images = torch.randn(new long[] { batch, config.InChans, config.ImageShape.Height, config.ImageShape.Width }, generator: new torch.Generator(1)).to(dtype).to(device);
    using var labels = (torch.arange(batch, dtype: ScalarType.Int64) % Math.Max(1, config.NumClasses)).to(device);
    var models = new List<VisionTransformer>();
    var optimizers = new List<AdamW>();
    try
    {
        var steps = new List<(Action, double)>();
        foreach (var c in configs)
        {
            torch.manual_seed(0);
            var model = new VisionTransformer(c, device, dtype);
            models.Add(model);
            var flops = ModelAccounting.Flops(c);
            if (mode == "inference")
            {
                model.eval();
                steps.Add((() =>
                {
                    using var inference = torch.inference_mode();
                    using var scope = torch.NewDisposeScope();
                    model.call(images);
                }, batch * flops.Forward));
                continue;
            }
            model.train();
            model.Checkpointing = recompute;
            // The library's AdamW, as Trainer runs it: float32 master weights and state for 16-bit parameters.
            var optimizer = new AdamW(Optimizer.WithWeightDecay(model, weightDecay: 1e-4, headWeightDecay: 1e-4));
            optimizers.Add(optimizer);
            bool update = mode == "training";
            steps.Add((() =>
            {
                using var scope = torch.NewDisposeScope();
                optimizer.ZeroGrad();
                var output = model.call(images);
                var loss = c.NumClasses > 0 ? nn.functional.cross_entropy(output.to(ScalarType.Float32), labels) : output.to(ScalarType.Float32).square().mean();
                loss.backward();
                if (update) optimizer.Step(1e-4);
            }, batch * flops.Training));
        }
        using var meter = new MfuMeter(device, dtype);
        var measured = meter.MeasureInterleaved(steps, samples, warmup);
        return measured.Select((m, i) => new MfuResult(preset, configs[i].Block.ToString().ToLowerInvariant(), mode,
            ViTConfigJson.DTypeName(dtype), device.ToString(), batch, torch.get_num_threads(), batch * configs[i].NumTokens / m.StepSeconds,
            batch / m.StepSeconds, m.AchievedFlopsPerSecond / 1e12, m.PeakFlopsPerSecond / 1e12, m.Mfu,
            mode == "inference" ? m.Mfu : m.Mfu * ModelAccounting.HardwareTrainingFlops(configs[i], recompute) / ModelAccounting.Flops(configs[i]).Training,
            mode == "inference" ? "none" : recompute.ToString(), datasheetTflops,
            datasheetTflops is { } p ? m.AchievedFlopsPerSecond / (p * 1e12) : null, m.StepSeconds, samples,
            i == 0 ? null : MfuMeter.MedianRatio(measured[0].StepSamples, m.StepSamples))).ToArray();
    }
    finally
    {
        foreach (var o in optimizers) o.Dispose();
        foreach (var m in models) m.Dispose();
    }
}

static void Print(IReadOnlyList<MfuResult> results)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 140;
    var t = new Table().AddColumns("preset", "block", "mode", "dtype", "device", "batch", "tokens/s", "images/s", "achieved TFLOP/s", "peak TFLOP/s (same-run GEMM)", "MFU", "HFU", "recompute");
    foreach (var r in results)
        t.AddRow(r.Preset, r.Block, r.Mode, r.DType, r.Device, $"{r.Batch}", $"{r.TokensPerSecond:N0}", $"{r.ImagesPerSecond:F2}",
            $"{r.AchievedTflops:F4}", $"{r.PeakTflops:F4}", $"{r.Mfu:P1}", $"{r.Hfu:P1}", r.Recompute);
    AnsiConsole.Write(t);
    foreach (var r in results)
        if (r.DatasheetMfu is { } dm) AnsiConsole.MarkupLine($"{r.Block}: against the datasheet peak of {r.DatasheetPeakTflops} TFLOP/s, MFU {dm:P1}.");
    var first = results[0];
    foreach (var r in results.Skip(1))
        AnsiConsole.MarkupLine($"{r.Block} vs {first.Block}: {r.SpeedupOverFirst:F3}× as fast (median over rounds of the {first.Block} step's time over the {r.Block} step's).");
    AnsiConsole.MarkupLine($"Median of {first.Samples} interleaved samples; step {string.Join(" / ", results.Select(r => $"{r.StepSeconds * 1000:F1} ms"))}; " +
        $"{first.Threads} torch threads. Model FLOPs per docs/model.md (2 per MAC, matmuls only, forward-backward and training = 3 × forward); HFU adds the forward FLOPs of recomputed blocks.");
}

/// <summary>One MFU measurement, as printed and as written to JSON/CSV.</summary>
/// <param name="SpeedupOverFirst">With several blocks measured in one run: how many times as fast as the first
/// (median over rounds of the first step's time over this step's); null for the first.</param>
internal sealed record MfuResult(string Preset, string Block, string Mode, string DType, string Device, int Batch, int Threads,
    double TokensPerSecond, double ImagesPerSecond, double AchievedTflops, double PeakTflops, double Mfu, double Hfu, string Recompute,
    double? DatasheetPeakTflops, double? DatasheetMfu, double StepSeconds, int Samples, double? SpeedupOverFirst)
{
    public const string CsvHeader = "preset,block,mode,dtype,device,batch,threads,tokens_per_s,images_per_s,achieved_tflops,peak_tflops,mfu,hfu,recompute,datasheet_peak_tflops,datasheet_mfu,step_s,samples,speedup_over_first\n";

    public string ToCsvRow()
    {
        var c = CultureInfo.InvariantCulture;
        return string.Join(",", Preset, Block, Mode, DType, Device, Batch.ToString(c), Threads.ToString(c), TokensPerSecond.ToString("R", c), ImagesPerSecond.ToString("R", c),
            AchievedTflops.ToString("R", c), PeakTflops.ToString("R", c), Mfu.ToString("R", c), Hfu.ToString("R", c), $"\"{Recompute}\"", DatasheetPeakTflops?.ToString("R", c) ?? "",
            DatasheetMfu?.ToString("R", c) ?? "", StepSeconds.ToString("R", c), Samples.ToString(c), SpeedupOverFirst?.ToString("R", c) ?? "") + "\n";
    }
}
