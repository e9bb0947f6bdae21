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
using ViT22B.Accounting;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

var presetOption = new Option<string>("--preset") { Description = "Preset, e.g. B/16, S/16, So400m/14, 22B/14.", DefaultValueFactory = _ => "B/16" };
var blockOption = new Option<string?>("--block") { Description = "Override the block kind: parallel or sequential." };
var batchOption = new Option<int>("--batch-size") { Description = "Images per step.", DefaultValueFactory = _ => 8 };
var dtypeOption = new Option<string>("--dtype") { Description = "float32 or bfloat16 (float16, float64 also accepted).", DefaultValueFactory = _ => "float32" };
var deviceOption = new Option<string>("--device") { Description = "cpu or cuda[:N].", DefaultValueFactory = _ => "cpu" };
var modeOption = new Option<string>("--mode") { Description = "inference or training (forward, backward, AdamW step).", DefaultValueFactory = _ => "inference" };
var samplesOption = new Option<int>("--samples") { Description = "Timed (GEMM, step) pairs; medians are reported.", DefaultValueFactory = _ => 10 };
var warmupOption = new Option<int>("--warmup") { Description = "Untimed warm-up steps.", DefaultValueFactory = _ => 2 };
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 };
var peakOption = new Option<double?>("--datasheet-peak-tflops") { Description = "Also report MFU against this datasheet peak (TFLOP/s), e.g. 989 for an H100 SXM in bf16 dense." };
var jsonOption = new Option<FileInfo?>("--json") { Description = "Write the result as JSON." };
var csvOption = new Option<FileInfo?>("--csv") { Description = "Write the result as CSV." };
var root = new RootCommand("Measure the model-FLOPs utilization (MFU) of a ViT preset against a same-run GEMM peak.")
{
    presetOption, blockOption, batchOption, dtypeOption, deviceOption, modeOption, samplesOption, warmupOption, threadsOption, peakOption, jsonOption, csvOption,
};
root.SetAction(parse =>
{
    try
    {
        if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
        var config = ViTConfig.Parse(parse.GetValue(presetOption)!);
        if (parse.GetValue(blockOption) is { } block)
            config = (config with { Block = ViTConfigJson.ParseBlock(block) }).Validate();
        var dtype = ViTConfigJson.ParseDType(parse.GetValue(dtypeOption)!);
        string mode = parse.GetValue(modeOption)!;
        if (mode is not ("inference" or "training")) throw new ArgumentException($"--mode must be inference or training, found '{mode}'.");
        var result = Measure(config, parse.GetValue(presetOption)!, Math.Max(1, parse.GetValue(batchOption)), dtype, new Device(parse.GetValue(deviceOption)!),
            mode == "training", Math.Max(1, parse.GetValue(samplesOption)), Math.Max(0, parse.GetValue(warmupOption)), parse.GetValue(peakOption));
        Print(result);
        if (parse.GetValue(jsonOption) is { } json) AtomicFile.Write(json.FullName, s => JsonSerializer.Serialize(s, result, new JsonSerializerOptions { WriteIndented = true }));
        if (parse.GetValue(csvOption) is { } csv)
            AtomicFile.Write(csv.FullName, s => { var b = Encoding.UTF8.GetBytes(result.ToCsv()); s.Write(b, 0, b.Length); });
        return 0;
    }
    catch (Exception e) when (e is ArgumentException or FormatException or InsufficientMemoryException)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 1;
    }
});
return root.Parse(args).Invoke();

static MfuResult Measure(ViTConfig config, string preset, int batch, ScalarType dtype, Device device, bool training, int samples, int warmup, double? datasheetTflops)
{
    if (device.type == DeviceType.CPU) ModelAccounting.EnsureFitsInHostMemory(config, dtype);
    torch.manual_seed(0);
    using var model = new VisionTransformer(config, device, dtype);
    using var images = torch.randn(new long[] { batch, config.InChans, config.ImgSize, config.ImgSize }, generator: new torch.Generator(1)).to(dtype).to(device);
    using var labels = (torch.arange(batch, dtype: ScalarType.Int64) % Math.Max(1, config.NumClasses)).to(device);
    var flops = ModelAccounting.Flops(config);
    double stepFlops = batch * (training ? flops.Training : flops.Forward);
    using var meter = new MfuMeter(device, dtype);
    MfuMeasurement m;
    if (training)
    {
        model.train();
        // The library's AdamW, as Trainer runs it: float32 master weights and state for 16-bit parameters.
        using var optimizer = new AdamW(Optimizer.WithWeightDecay(model, weightDecay: 1e-4, headWeightDecay: 1e-4));
        m = meter.Measure(() =>
        {
            using var scope = torch.NewDisposeScope();
            optimizer.ZeroGrad();
            var output = model.call(images);
            var loss = config.NumClasses > 0 ? nn.functional.cross_entropy(output.to(ScalarType.Float32), labels) : output.to(ScalarType.Float32).square().mean();
            loss.backward();
            optimizer.Step(1e-4);
        }, stepFlops, samples, warmup);
    }
    else
    {
        model.eval();
        m = meter.Measure(() =>
        {
            using var inference = torch.inference_mode();
            using var scope = torch.NewDisposeScope();
            model.call(images);
        }, stepFlops, samples, warmup);
    }
    return new MfuResult(preset, config.Block.ToString().ToLowerInvariant(), training ? "training" : "inference", ViTConfigJson.DTypeName(dtype), device.ToString(),
        batch, torch.get_num_threads(), batch * config.NumTokens / m.StepSeconds, batch / m.StepSeconds, m.AchievedFlopsPerSecond / 1e12,
        m.PeakFlopsPerSecond / 1e12, m.Mfu, datasheetTflops, datasheetTflops is { } p ? m.AchievedFlopsPerSecond / (p * 1e12) : null, m.StepSeconds, samples);
}

static void Print(MfuResult r)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 140;
    var t = new Table().AddColumns("preset", "block", "mode", "dtype", "device", "batch", "tokens/s", "images/s", "achieved TFLOP/s", "peak TFLOP/s (same-run GEMM)", "MFU");
    t.AddRow(r.Preset, r.Block, r.Mode, r.DType, r.Device, $"{r.Batch}", $"{r.TokensPerSecond:N0}", $"{r.ImagesPerSecond:F2}",
        $"{r.AchievedTflops:F4}", $"{r.PeakTflops:F4}", $"{r.Mfu:P1}");
    AnsiConsole.Write(t);
    if (r.DatasheetMfu is { } dm) AnsiConsole.MarkupLine($"Against the datasheet peak of {r.DatasheetPeakTflops} TFLOP/s: MFU {dm:P1}.");
    AnsiConsole.MarkupLine($"Median of {r.Samples} interleaved samples; step {r.StepSeconds * 1000:F1} ms; {r.Threads} torch threads. Model FLOPs per SPEC.md §9 (2 per MAC, matmuls only, training = 3 × forward).");
}

/// <summary>One MFU measurement, as printed and as written to JSON/CSV.</summary>
internal sealed record MfuResult(string Preset, string Block, string Mode, string DType, string Device, int Batch, int Threads,
    double TokensPerSecond, double ImagesPerSecond, double AchievedTflops, double PeakTflops, double Mfu,
    double? DatasheetPeakTflops, double? DatasheetMfu, double StepSeconds, int Samples)
{
    public string ToCsv()
    {
        var c = CultureInfo.InvariantCulture;
        return "preset,block,mode,dtype,device,batch,threads,tokens_per_s,images_per_s,achieved_tflops,peak_tflops,mfu,datasheet_peak_tflops,datasheet_mfu,step_s,samples\n" +
            string.Join(",", Preset, Block, Mode, DType, Device, Batch.ToString(c), Threads.ToString(c), TokensPerSecond.ToString("R", c), ImagesPerSecond.ToString("R", c),
                AchievedTflops.ToString("R", c), PeakTflops.ToString("R", c), Mfu.ToString("R", c), DatasheetPeakTflops?.ToString("R", c) ?? "",
                DatasheetMfu?.ToString("R", c) ?? "", StepSeconds.ToString("R", c), Samples.ToString(c)) + "\n";
    }
}
