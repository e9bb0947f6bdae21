// TrainFashionMnist: trains a small ViT-22B-style model (parallel blocks, QK-norm, bias-free QKV and norms) from
// scratch on Fashion-MNIST and reports test accuracy per epoch; the final weights are a training checkpoint.
//
//   apt-get install dataset-fashion-mnist          # the real dataset, files under /usr/share/datasets/fashion-mnist
//   dotnet run --project samples/TrainFashionMnist -c Release
//   dotnet run --project samples/TrainFashionMnist -c Release -- --epochs 1 --train-limit 2000 --test-limit 1000
using System.CommandLine;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Spectre.Console;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Data;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Training;

var dataOption = new Option<DirectoryInfo>("--data") { Description = "Folder with the Fashion-MNIST IDX files (gzipped or not).", DefaultValueFactory = _ => new DirectoryInfo("/usr/share/datasets/fashion-mnist") };
var epochsOption = new Option<int>("--epochs") { Description = "Training epochs.", DefaultValueFactory = _ => 13 }.AtLeast(1);
var batchOption = new Option<int>("--batch-size") { Description = "Images per step.", DefaultValueFactory = _ => 128 }.AtLeast(1);
var lrOption = new Option<double>("--lr") { Description = "Peak learning rate.", DefaultValueFactory = _ => 2e-3 }.Positive();
var smoothingOption = new Option<double>("--label-smoothing") { Description = "Softmax label smoothing.", DefaultValueFactory = _ => 0.0 }.Within(0, 1);
var dtypeOption = new Option<string>("--dtype") { Description = "Model dtype: float32 or bfloat16 (bfloat16: forward/backward in bf16, loss and optimizer state in float32 with float32 master weights).", DefaultValueFactory = _ => "float32" };
var optimizerOption = new Option<string>("--optimizer") { Description = "adamw or adafactor.", DefaultValueFactory = _ => "adamw" };
var widthOption = new Option<int>("--width") { Description = "Embedding width D.", DefaultValueFactory = _ => 128 }.AtLeast(1);
var depthOption = new Option<int>("--depth") { Description = "Blocks.", DefaultValueFactory = _ => 4 }.AtLeast(1);
var headsOption = new Option<int>("--heads") { Description = "Attention heads.", DefaultValueFactory = _ => 4 }.AtLeast(1);
var patchOption = new Option<int>("--patch") { Description = "Patch size (28 must be divisible by it).", DefaultValueFactory = _ => 7 }.AtLeast(1);
patchOption.Validators.Add(r =>
{
    int p = r.GetValueOrDefault<int>();
    if (p > 0 && 28 % p != 0) r.AddError($"--patch must divide the 28-pixel images (1, 2, 4, 7, 14 or 28), found {p}.");
});
var poolOption = new Option<string>("--pool") { Description = "Pooling head: map (ViT-22B), gap or token.", DefaultValueFactory = _ => "map" };
var augmentOption = new Option<string>("--augment") { Description = "Training augmentation: none, flip, or crop-flip (random 28×28 crop of the 2-pixel zero-padded image, then flip).", DefaultValueFactory = _ => "flip" };
var checkpointOption = new Option<FileInfo>("--checkpoint") { Description = "Training checkpoint written after every epoch (an existing one is continued with --resume, and never replaced without it).", DefaultValueFactory = _ => new FileInfo("fashion-mnist-vit.safetensors") };
var exportOption = new Option<DirectoryInfo?>("--export-test-images") { Description = "Also write the first --export-count test images as PNG files into this folder (input for samples/Classify)." };
var exportCountOption = new Option<int>("--export-count") { Description = "Test images to export.", DefaultValueFactory = _ => 8 }.AtLeast(0);
var resumeOption = new Option<bool>("--resume") { Description = "Continue from --checkpoint." };
var seedOption = new Option<int>("--seed") { Description = "Seed of the initialization and the data order.", DefaultValueFactory = _ => 0 };
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var trainLimitOption = new Option<int>("--train-limit") { Description = "Use only the first N training images (0 = all 60,000).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var testLimitOption = new Option<int>("--test-limit") { Description = "Use only the first N test images (0 = all 10,000).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var recomputeOption = new Option<string>("--checkpointing") { Description = "Blocks that recompute their activations in backward: none, all, every:N or blocks:I,J,…", DefaultValueFactory = _ => "none" };
var peakOption = new Option<double?>("--peak-tflops") { Description = "The device's peak TFLOP/s from its datasheet, for the MFU in the log; without it the peak is the best same-dtype GEMM timed during the run." };
var root = new RootCommand("Train a small ViT-22B-style model on Fashion-MNIST (install it with `apt-get install dataset-fashion-mnist`).")
{
    dataOption, epochsOption, batchOption, lrOption, smoothingOption, dtypeOption, optimizerOption, widthOption, depthOption, headsOption, patchOption, poolOption, augmentOption,
    checkpointOption, resumeOption, exportOption, exportCountOption, seedOption, threadsOption, trainLimitOption, testLimitOption, recomputeOption, peakOption,
};
peakOption.Validators.Add(r =>
{
    if (r.GetValueOrDefault<double?>() is double v && !(v > 0)) r.AddError($"--peak-tflops must be positive, found {v}.");
});
root.SetAction(parse =>
{
    if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
    int width = parse.GetValue(widthOption), heads = parse.GetValue(headsOption);
    // ViT-22B's block (parallel, QK-norm, no QKV/norm bias, MAP head) at toy scale, on 28×28 grayscale images.
    var config = new ViTConfig
    {
        ImgSize = 28, PatchSize = parse.GetValue(patchOption), InChans = 1, NumClasses = 10,
        EmbedDim = width, Depth = parse.GetValue(depthOption), NumHeads = heads, MlpDim = 4 * width,
        GlobalPool = parse.GetValue(poolOption) switch
        {
            "map" => GlobalPool.Map, "gap" => GlobalPool.Gap, "token" => GlobalPool.Token,
            var other => throw new ArgumentException($"--pool must be map, gap or token, found '{other}'."),
        },
    };
    config = (config with { ClassToken = config.GlobalPool == GlobalPool.Token }).Validate();
    var augment = parse.GetValue(augmentOption) switch
    {
        "none" => Array.Empty<ImageTransform>(),
        "flip" => new[] { Transforms.HorizontalFlip() },
        "crop-flip" => new[] { Transforms.RandomCrop(28, padding: 2), Transforms.HorizontalFlip() },
        var other => throw new ArgumentException($"--augment must be none, flip or crop-flip, found '{other}'."),
    };
    config = config with { DType = ViTConfigJson.ParseDType(parse.GetValue(dtypeOption)!) };
    return Train(config, augment, parse.GetValue(dataOption)!, parse.GetValue(epochsOption), parse.GetValue(batchOption), parse.GetValue(lrOption), parse.GetValue(smoothingOption),
        parse.GetValue(optimizerOption)!, parse.GetValue(checkpointOption)!, parse.GetValue(resumeOption), parse.GetValue(seedOption),
        parse.GetValue(trainLimitOption), parse.GetValue(testLimitOption), parse.GetValue(exportOption), parse.GetValue(exportCountOption),
        ActivationCheckpointing.Parse(parse.GetValue(recomputeOption)!), parse.GetValue(peakOption));
});
return SampleMain.Invoke(root, args);

static int Train(ViTConfig config, ImageTransform[] augment, DirectoryInfo data, int epochs, int batchSize, double lr, double labelSmoothing, string optimizerName, FileInfo checkpoint,
    bool resume, int seed, int trainLimit, int testLimit, DirectoryInfo? export, int exportCount, ActivationCheckpointing recompute, double? peakTflops)
{
    // Everything the user asked for is checked before anything is written: the optimizer, and the checkpoint, which
    // the first epoch would replace (a finished run's weights are not overwritten by a new run without being asked).
    if (optimizerName is not ("adamw" or "adafactor")) throw new ArgumentException($"--optimizer must be adamw or adafactor, found '{optimizerName}'.");
    SampleMain.CheckOutput(checkpoint, "--checkpoint");
    if (checkpoint.Exists && !resume)
        throw new IOException($"--checkpoint {checkpoint.FullName} exists: pass --resume to continue it, or name another file (or delete it) to start a new run.");
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    // Interactive: a progress bar, and only warnings from the logger; redirected (logs, CI): the logger's lines.
    bool interactive = !Console.IsOutputRedirected;
    using var loggerFactory = LoggerFactory.Create(b => b.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = "HH:mm:ss "; })
        .SetMinimumLevel(interactive ? LogLevel.Warning : LogLevel.Information));
    var logger = loggerFactory.CreateLogger("TrainFashionMnist");

    var trainTransform = Transforms.Compose(augment.Append(Transforms.Normalize(PixelNormalization.MinusOneToOne)).ToArray());
    var testTransform = Transforms.Normalize(PixelNormalization.MinusOneToOne);
    using var fullTrain = IdxFile.LoadFashionMnist(data.FullName, train: true, trainTransform);
    using var fullTest = IdxFile.LoadFashionMnist(data.FullName, train: false, testTransform);
    IDataset trainSet = trainLimit > 0 ? Subset.First(fullTrain, trainLimit) : fullTrain;
    IDataset testSet = testLimit > 0 ? Subset.First(fullTest, testLimit) : fullTest;
    var trainLoader = new DataLoader(trainSet, new DataLoaderOptions { BatchSize = batchSize, Shuffle = true, Seed = seed, DropLast = true, Workers = 2 });
    var testLoader = new DataLoader(testSet, new DataLoaderOptions { BatchSize = 500, Shuffle = false, Workers = 2 });

    string labelsPath = Path.ChangeExtension(checkpoint.FullName, ".labels.txt");
    ViT22B.Interop.AtomicFile.Write(labelsPath, s => { using var w = new StreamWriter(s, leaveOpen: true); foreach (var c in fullTest.Classes) w.WriteLine(c); });
    if (export is not null) Export(fullTest, export, exportCount);

    torch.manual_seed(seed);
    using var model = new VisionTransformer(config, torch.CPU, config.DType);
    var parameters = Optimizer.WithWeightDecay(model, weightDecay: 0.05, headWeightDecay: 0.05);
    using Optimizer optimizer = optimizerName switch
    {
        "adamw" => new AdamW(parameters, beta2: 0.99),
        "adafactor" => new Adafactor(parameters),
        _ => throw new ArgumentException($"--optimizer must be adamw or adafactor, found '{optimizerName}'."),
    };
    long total = (long)epochs * trainLoader.BatchesPerEpoch;
    var schedule = new LearningRateSchedule { PeakLr = lr, TotalSteps = total, Decay = DecayKind.Cosine, WarmupSteps = Math.Min(total / 10, 500) }.Validate();
    // MFU in the log: against --peak-tflops, else against the best same-dtype GEMM timed during the run (MfuMeter).
    using var meter = peakTflops is null ? new MfuMeter(torch.CPU, config.DType) : null;
    var trainer = new Trainer(model, optimizer, schedule, new TrainerOptions { ClipGradNorm = 1.0, LabelSmoothing = labelSmoothing, CheckpointPath = checkpoint.FullName, LogEverySteps = 100, PeakFlopsPerSecond = peakTflops * 1e12, PeakMeter = meter, Checkpointing = recompute }, logger);
    if (resume) trainer.LoadCheckpoint(checkpoint.FullName);

    AnsiConsole.MarkupLine($"[bold]Fashion-MNIST[/]: {trainSet.Count:N0} training / {testSet.Count:N0} test images; model {ModelSummary(config)}, " +
        $"{model.parameters().Sum(p => p.numel()):N0} parameters; {optimizerName}, peak lr {lr}, {epochs} epochs × {trainLoader.BatchesPerEpoch} steps; {torch.get_num_threads()} threads; {ViTConfigJson.DTypeName(config.DType)}; MFU against {(peakTflops is { } pt ? $"the datasheet peak {pt} TFLOP/s" : "the best same-dtype GEMM of the run")}");
    var sw = Stopwatch.StartNew();
    IReadOnlyList<EpochResult> results;
    if (interactive)
    {
        results = AnsiConsole.Progress().Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("training", maxValue: total);
                task.Value = trainer.Step;
                string last = "";
                return trainer.Fit(trainLoader, epochs, testLoader,
                    new StepReporter(r => { task.Value = r.Step; task.Description = $"step {r.Step}/{total} loss {r.Loss:F3}{last}"; }),
                    onEpoch: e => last = $" · epoch {e.Epoch + 1} test top-1 {e.Eval!.Top1:P2}");
            });
    }
    else
    {
        results = trainer.Fit(trainLoader, epochs, testLoader);
    }
    if (results.Count == 0)
    {
        AnsiConsole.MarkupLine($"Nothing to do: the checkpoint [blue]{checkpoint.FullName.EscapeMarkup()}[/] already holds {trainer.Position.Epoch} of {epochs} epochs (step {trainer.Step}); raise --epochs only by starting a new run, the schedule depends on it.");
        return 0;
    }
    var table = new Table().Title("Test accuracy per epoch").AddColumns("epoch", "step", "train loss", "train top-1", "test loss", "test top-1", "test top-5", "epoch time", "img/s");
    foreach (var r in results)
        table.AddRow($"{r.Epoch + 1}", $"{r.Step}", $"{r.TrainLoss:F4}", $"{r.TrainTop1:P2}", $"{r.Eval!.Loss:F4}", $"{r.Eval.Top1:P2}", $"{r.Eval.Top5:P2}", $"{r.Elapsed.TotalSeconds:F0} s", $"{r.ImagesPerSecond:F0}");
    AnsiConsole.Write(table);
    if (results.Count > 0)
        AnsiConsole.MarkupLine($"Final test accuracy [green]{results[^1].Eval!.Top1:P2}[/] after {sw.Elapsed.TotalMinutes:F1} min; checkpoint [blue]{checkpoint.FullName.EscapeMarkup()}[/].");
    return 0;
}

// Writes test images as PNG files named <index>-<class>.png, for samples/Classify.
static void Export(TensorDataset test, DirectoryInfo folder, int count)
{
    folder.Create();
    for (int i = 0; i < Math.Min(count, test.Count); i++)
    {
        using var scope = torch.NewDisposeScope();   // the temporaries stay reachable through each native call
        var ex = test.Get(i, new Random(0));
        using var image = ex.Image;
        // Back from [-1, 1] to [0, 1], with tensors rather than C# numbers: TorchSharp 0.107 can free the Scalar an
        // implicit conversion makes while libtorch still reads it (docs/torchsharp-notes.md).
        using var pixels = (image - torch.tensor(-1f)) / torch.tensor(2f);
        string name = $"{i:D4}-{test.Classes[(int)ex.Label].Replace('/', '-').Replace(' ', '-')}.png";
        ViT22B.Imaging.ImageTensors.SavePng(pixels, Path.Combine(folder.FullName, name));
    }
    AnsiConsole.MarkupLine($"Wrote {Math.Min(count, test.Count)} test images to [blue]{folder.FullName.EscapeMarkup()}[/].");
}

static string ModelSummary(ViTConfig c) => $"{c.Block.ToString().ToLowerInvariant()} D={c.EmbedDim} L={c.Depth} H={c.NumHeads} patch={c.PatchSize} ({c.NumPatches} tokens), qk_norm={c.QkNorm}, pool={c.GlobalPool.ToString().ToLowerInvariant()}";

// Reports each step synchronously on the training thread (System.Progress would post to the thread pool).
internal sealed class StepReporter(Action<StepResult> report) : IProgress<StepResult>
{
    public void Report(StepResult value) => report(value);
}
