// QkNormStability: the ViT-22B paper's QK-norm finding at laptop scale. The same model, data, initialization and
// optimizer settings are trained twice at a learning rate high enough to destabilize training, once with QK-norm
// (LayerNorm on queries and keys) and once without; per step it logs the loss, the largest attention logit and the
// attention entropy of every layer, writes them as CSV and plots both runs into a PNG.
//
//   dotnet run --project samples/QkNormStability -c Release
//   dotnet run --project samples/QkNormStability -c Release -- --lr 3e-2 --steps 400 --out qk-norm
using System.CommandLine;
using System.Globalization;
using System.Text;
using Spectre.Console;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Data;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

var dataOption = new Option<DirectoryInfo>("--data") { Description = "Folder with the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist).", DefaultValueFactory = _ => new DirectoryInfo("/usr/share/datasets/fashion-mnist") };
var lrOption = new Option<double>("--lr") { Description = "Peak learning rate (AdamW), reached after the warmup and kept constant.", DefaultValueFactory = _ => 1e-2 }.Positive();
var stepsOption = new Option<int>("--steps") { Description = "Training steps per run.", DefaultValueFactory = _ => 500 }.AtLeast(1);
var warmupOption = new Option<int>("--warmup") { Description = "Linear warmup steps.", DefaultValueFactory = _ => 50 }.AtLeast(0);
var batchOption = new Option<int>("--batch-size") { Description = "Images per step.", DefaultValueFactory = _ => 128 }.AtLeast(1);
var widthOption = new Option<int>("--width") { Description = "Embedding width D.", DefaultValueFactory = _ => 128 }.AtLeast(1);
var depthOption = new Option<int>("--depth") { Description = "Blocks.", DefaultValueFactory = _ => 4 }.AtLeast(1);
var headsOption = new Option<int>("--heads") { Description = "Attention heads.", DefaultValueFactory = _ => 4 }.AtLeast(1);
var patchOption = new Option<int>("--patch") { Description = "Patch size.", DefaultValueFactory = _ => 7 }.AtLeast(1);
var clipOption = new Option<double>("--clip") { Description = "Gradient clipping by global norm (0 = none).", DefaultValueFactory = _ => 1.0 };
var seedOption = new Option<int>("--seed") { Description = "Seed of the initialization and the data order (the same for both runs).", DefaultValueFactory = _ => 0 };
var outOption = new Option<DirectoryInfo>("--out") { Description = "Output folder for qk-norm.csv and qk-norm.png.", DefaultValueFactory = _ => new DirectoryInfo("qk-norm") };
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var root = new RootCommand("Train the same small ViT with and without QK-norm at a high learning rate and compare loss, attention logits and attention entropy.")
{
    dataOption, lrOption, stepsOption, warmupOption, batchOption, widthOption, depthOption, headsOption, patchOption, clipOption, seedOption, outOption, threadsOption,
};
root.SetAction(parse =>
{
    if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    var baseConfig = new ViTConfig
    {
        ImgSize = 28, PatchSize = parse.GetValue(patchOption), InChans = 1, NumClasses = 10,
        EmbedDim = parse.GetValue(widthOption), Depth = parse.GetValue(depthOption), NumHeads = parse.GetValue(headsOption), MlpDim = 4 * parse.GetValue(widthOption),
    }.Validate();
    var settings = new Settings(parse.GetValue(lrOption), parse.GetValue(stepsOption), parse.GetValue(warmupOption), parse.GetValue(batchOption), parse.GetValue(clipOption), parse.GetValue(seedOption));
    var outDir = parse.GetValue(outOption)!;
    outDir.Create();
    using var data = IdxFile.LoadFashionMnist(parse.GetValue(dataOption)!.FullName, train: true, Transforms.Normalize(PixelNormalization.MinusOneToOne));

    AnsiConsole.MarkupLine($"[bold]QK-norm stability[/]: parallel-block ViT D={baseConfig.EmbedDim} L={baseConfig.Depth} H={baseConfig.NumHeads} patch {baseConfig.PatchSize}, AdamW lr {settings.Lr} (warmup {settings.Warmup}), clip {settings.Clip}, batch {settings.Batch}, {settings.Steps} steps, seed {settings.Seed}; {torch.get_num_threads()} threads");
    var runs = new[] { ("with QK-norm", baseConfig with { QkNorm = true }), ("without QK-norm", baseConfig with { QkNorm = false }) }
        .Select(r => Train(r.Item1, r.Item2, data, settings)).ToList();

    string csv = Path.Combine(outDir.FullName, "qk-norm.csv");
    AtomicFile.Write(csv, s => { using var w = new StreamWriter(s, leaveOpen: true); WriteCsv(w, runs, baseConfig.Depth); });
    string png = Path.Combine(outDir.FullName, "qk-norm.png");
    Plots.Save(png, runs, settings);

    var table = new Table().Title("Summary").AddColumns("run", "steps", "final loss (mean of last 20)", "max |logit| (any layer, any step)", "lowest entropy (nats)", "outcome");
    foreach (var r in runs)
    {
        var tail = r.Records.TakeLast(20).Select(x => x.Loss).ToList();
        table.AddRow(r.Name, $"{r.Records.Count}", tail.Count > 0 ? $"{tail.Average():F3}" : "-",
            r.Records.Count > 0 ? $"{r.Records.Max(x => x.Layers.Max(l => l.MaxAbsLogit)):F1}" : "-",
            r.Records.Count > 0 ? $"{r.Records.Min(x => x.Layers.Min(l => l.MinEntropy)):F3}" : "-",
            r.Diverged is { } d ? $"[red]stopped: {d.EscapeMarkup()}[/]" : "finished");
    }
    AnsiConsole.Write(table);
    AnsiConsole.MarkupLine($"Wrote [blue]{csv.EscapeMarkup()}[/] and [blue]{png.EscapeMarkup()}[/].");
    return 0;
});
return SampleMain.Invoke(root, args);

static RunResult Train(string name, ViTConfig config, IDataset data, Settings s)
{
    torch.manual_seed(s.Seed);
    using var model = new VisionTransformer(config, torch.CPU, ScalarType.Float32);
    using var optimizer = new AdamW(Optimizer.WithWeightDecay(model, 0, 0));
    var schedule = new LearningRateSchedule { PeakLr = s.Lr, TotalSteps = s.Steps, Decay = DecayKind.Constant, WarmupSteps = s.Warmup }.Validate();
    var trainer = new Trainer(model, optimizer, schedule, new TrainerOptions { ClipGradNorm = s.Clip });
    var loader = new DataLoader(data, new DataLoaderOptions { BatchSize = s.Batch, Seed = s.Seed, DropLast = true });
    var records = new List<StepRecord>();
    string? diverged = null;
    AnsiConsole.Progress().AutoClear(true).Start(ctx =>
    {
        var task = ctx.AddTask(name, maxValue: s.Steps);
        for (int epoch = 0; records.Count < s.Steps && diverged is null; epoch++)
        {
            foreach (var batch in loader.Epoch(epoch))
            {
                using (batch)
                {
                    var layers = new List<AttentionStats>();
                    try
                    {
                        using (AttentionOps.Observe(layers.Add))
                        {
                            var r = trainer.TrainStep(batch.Images, batch.Labels);
                            records.Add(new StepRecord(r.Step, r.Loss, r.LearningRate, r.GradNorm, layers.Take(config.Depth).ToArray()));
                        }
                    }
                    catch (NonFiniteLossException e)
                    {
                        diverged = $"non-finite at step {e.Step}";
                        break;
                    }
                }
                task.Increment(1);
                if (records.Count >= s.Steps) break;
            }
        }
    });
    return new RunResult(name, records, diverged);
}

static void WriteCsv(TextWriter w, IReadOnlyList<RunResult> runs, int depth)
{
    var header = new StringBuilder("run,step,lr,loss,grad_norm");
    for (int l = 0; l < depth; l++) header.Append(CultureInfo.InvariantCulture, $",max_logit_{l},mean_entropy_{l},min_entropy_{l}");
    w.WriteLine(header);
    foreach (var r in runs)
        foreach (var x in r.Records)
        {
            var line = new StringBuilder(string.Create(CultureInfo.InvariantCulture, $"{(r.Name.StartsWith("with ", StringComparison.Ordinal) ? "qk_norm" : "no_qk_norm")},{x.Step},{x.Lr:R},{x.Loss:R},{x.GradNorm:R}"));
            foreach (var l in x.Layers) line.Append(string.Create(CultureInfo.InvariantCulture, $",{l.MaxAbsLogit:R},{l.MeanEntropy:R},{l.MinEntropy:R}"));
            w.WriteLine(line);
        }
}

internal sealed record Settings(double Lr, int Steps, int Warmup, int Batch, double Clip, int Seed);
internal sealed record StepRecord(long Step, double Loss, double Lr, double GradNorm, AttentionStats[] Layers);
internal sealed record RunResult(string Name, IReadOnlyList<StepRecord> Records, string? Diverged);
