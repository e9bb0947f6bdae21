// Streaming: runs a model whose weights do not fit in memory (ViT-22B/14, 44 GB in bfloat16, on a 24 GiB machine)
// forward one block at a time, first on one device, then on a simulated model axis whose ranks (threads) each hold a
// slice of every block, and checks the two against each other. The weights are computed from a seed, parameter by
// parameter (SeededWeights): no checkpoint of ViT-22B was ever released. docs/scale.md records a run.
//   dotnet run --project samples/Streaming -c Release                              # ViT-22B/14, bfloat16, model axis 4
//   dotnet run --project samples/Streaming -c Release -- --preset S/16 --model 2   # the same code on a small preset
using System.CommandLine;
using System.Diagnostics;
using Spectre.Console;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

var presetOption = new Option<string>("--preset") { Description = "Preset, e.g. 22B/14, So400m/14, S/16.", DefaultValueFactory = _ => "22B/14" };
var dtypeOption = new Option<string>("--dtype") { Description = "bfloat16, float32 or float64.", DefaultValueFactory = _ => "bfloat16" };
var modelOption = new Option<int>("--model") { Description = "Model-axis size of the sharded run (ranks are threads of this process).", DefaultValueFactory = _ => 4 }.AtLeast(2);
var seedOption = new Option<ulong>("--seed") { Description = "Seed of the weights and of the image.", DefaultValueFactory = _ => 0 };
var noPrefetchOption = new Option<bool>("--no-prefetch") { Description = "Load each block only when it is needed (one block in memory instead of two)." };
var depthOption = new Option<int?>("--depth") { Description = "Run only this many of the preset's blocks (a shorter check at full width)." };
var planOption = new Option<bool>("--plan") { Description = "Only print the memory planner's per-GPU table for the preset on 1, 8 and 64 GPUs (inference and training, with and without activation checkpointing), and exit." };
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var root = new RootCommand("Run a model too large for memory forward block by block, unsharded and on a simulated model axis, and compare.")
{
    presetOption, dtypeOption, modelOption, seedOption, noPrefetchOption, depthOption, planOption, threadsOption,
};
root.SetAction(parse =>
{
    if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
    var config = ViTConfig.Parse(parse.GetValue(presetOption)!);
    if (parse.GetValue(depthOption) is { } depth)
    {
        if (depth < 1 || depth > config.Depth) throw new ArgumentException($"--depth must be between 1 and the preset's {config.Depth} blocks, found {depth}.");
        config = config with { Depth = depth };
    }
    var dtype = ViTConfigJson.ParseDType(parse.GetValue(dtypeOption)!);
    if (parse.GetValue(planOption)) return PrintPlan(config, parse.GetValue(presetOption)!, dtype);
    return Run(config, parse.GetValue(presetOption)!, dtype, parse.GetValue(modelOption), parse.GetValue(seedOption), !parse.GetValue(noPrefetchOption));
});
return SampleMain.Invoke(root, args);

static int Run(ViTConfig c, string preset, ScalarType dtype, int k, ulong seed, bool prefetch)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 130;
    // The agreement required of the sharded and the unsharded pass, fixed before any run: the two compute the same
    // function with the sums of every sharded projection taken in another order (partial products added around the
    // ring). In bfloat16 each rounding is up to 2^-8 relative and the differences pass through every block, so the
    // pooled embeddings must agree to 5% of their largest magnitude with a cosine similarity of at least 0.999; in
    // float32 to 1e-4, in float64 to 1e-10.
    double tolerance = dtype is ScalarType.BFloat16 or ScalarType.Float16 ? 5e-2 : dtype == ScalarType.Float32 ? 1e-4 : 1e-10;
    double minCosine = dtype is ScalarType.BFloat16 or ScalarType.Float16 ? 0.999 : 1 - tolerance;
    if (c.NumHeads % k != 0 || c.MlpDim % k != 0)
        throw new ArgumentException($"--model {k} must divide the preset's {c.NumHeads} heads and MLP width {c.MlpDim}.");

    var p = ModelAccounting.Parameters(c);
    double flops = ModelAccounting.Flops(c).Forward;
    var one = MemoryPlanner.PlanStreamedInference(c, dtype, batch: 1, model: 1, prefetch);
    var perRank = MemoryPlanner.PlanStreamedInference(c, dtype, batch: 1, model: k, prefetch);
    AnsiConsole.MarkupLine($"[bold]{preset}[/]: {c.Depth} {c.Block.ToString().ToLowerInvariant()} blocks, D = {c.EmbedDim}, {c.NumHeads} heads, F = {c.MlpDim}, " +
        $"{c.NumTokens} tokens, {p.Total / 1e9:F2} B parameters ({ModelAccounting.ParameterBytes(c, dtype) / 1e9:F1} GB in {ViTConfigJson.DTypeName(dtype)}), " +
        $"{flops / 1e12:F2} TFLOP per image; seeded weights (seed {seed}), one {c.ImageShape.Height}×{c.ImageShape.Width} image, {(prefetch ? "prefetch on" : "no prefetch")}.");
    AnsiConsole.MarkupLine($"Machine: {Environment.ProcessorCount} cores, {GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 1e9:F1} GB; libtorch threads {torch.get_num_threads()}.");

    using var noise = torch.randn(new long[] { 1, c.InChans, c.ImageShape.Height, c.ImageShape.Width }, generator: new torch.Generator(seed));
    using var image = noise.to(dtype);   // noise held through the conversion (docs/torchsharp-notes.md)
    using var weights = new SeededWeights(c, seed);

    // 1. One device.
    var unsharded = Measure(() =>
    {
        using var model = new StreamedVisionTransformer(c, weights, torch.CPU, dtype, prefetch);
        var forward = Stopwatch.StartNew();
        using var output = model.Encode(image);
        forward.Stop();
        return (output.Pooled.clone(), forward.Elapsed.TotalSeconds, model.LastPass!);
    });

    // 2. A model axis of k ranks, each a thread of this process holding 1/k of every block's projections.
    var world = new ThreadedWorld(k, TimeSpan.FromMinutes(30));
    var ranks = RankContext.CreateThreaded(world, new DeviceMesh(1, k));
    var plan = new ShardingPlan(c, k);
    // The k ranks share one computed copy of each tensor and cut their slices from it, as ranks on k machines would
    // each read their slices of a checkpoint file; k independent generators would only add k − 1 copies of the work.
    using var sharedWeights = new SeededWeights(c, seed, readersPerTensor: k);
    var sharded = Measure(() =>
    {
        var perRankResults = Spmd.Run(world, r =>
        {
            using var shard = new StreamedShardedVisionTransformer(plan, ranks[r], sharedWeights, CommMode.Overlapped, dtype, prefetch);
            var forward = Stopwatch.StartNew();
            using var output = shard.Encode(image);
            forward.Stop();
            return (Output: output.Pooled.clone(), Seconds: forward.Elapsed.TotalSeconds, Stats: shard.LastPass!);
        });
        for (int r = 1; r < k; r++) perRankResults[r].Output.Dispose();
        return (perRankResults[0].Output, perRankResults.Max(x => x.Seconds), perRankResults[0].Stats);
    });

    using var scope = torch.NewDisposeScope();   // the comparison's temporaries stay reachable through each native call
    using var a = unsharded.Output.to(ScalarType.Float64);
    using var b = sharded.Output.to(ScalarType.Float64);
    double scale = a.abs().max().item<double>();
    double maxErr = (a - b).abs().max().item<double>() / scale;
    double cosine = nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim: 0).item<double>();
    unsharded.Output.Dispose();
    sharded.Output.Dispose();

    var table = new Table().AddColumns("run", "load resident (s)", "forward (s)", "blocks: load / waited / compute (s)", "model TFLOP/s",
        "peak RSS − before (GB)", "planned (GB)");
    void Row(string name, Outcome o, MemoryPlan plan, int planCopies) => table.AddRow(name, $"{o.TotalSeconds - o.ForwardSeconds:F1}", $"{o.ForwardSeconds:F1}",
        $"{o.Stats.LoadSeconds:F1} / {o.Stats.WaitSeconds:F1} / {o.Stats.ComputeSeconds:F1}", $"{flops / o.ForwardSeconds / 1e12:F3}",
        o.PeakBytes is { } peak ? $"{peak / 1e9:F2}" : "n/a", $"{planCopies * plan.Total / 1e9:F2}" + (planCopies > 1 ? $" ({planCopies} × {plan.Total / 1e9:F2})" : ""));
    Row("unsharded", unsharded, one, 1);
    Row($"model axis {k} (threads)", sharded, perRank, k);
    AnsiConsole.Write(table);
    AnsiConsole.MarkupLine($"Plan per rank: resident + {(prefetch ? 2 : 1)} block(s) {perRank.Weights / 1e9:F2} GB, staging {perRank.Staging / 1e9:F2} GB, activations {perRank.Activations / 1e6:F1} MB " +
        $"(unsharded: {one.Weights / 1e9:F2} / {one.Staging / 1e9:F2} GB / {one.Activations / 1e6:F1} MB). Sharded: per-rank block times of rank 0, forward time of the slowest rank.");
    bool ok = maxErr <= tolerance && cosine >= minCosine;
    AnsiConsole.MarkupLine($"Sharded vs unsharded pooled embedding ({string.Join("×", a.shape)}): max |difference| / max |output| = {maxErr:E2} (tolerance {tolerance:E0}), cosine similarity {cosine:F6} (at least {minCosine}): " +
        (ok ? "[green]agree[/]" : "[red]DISAGREE[/]"));
    return ok ? 0 : 1;
}

// The planner's per-GPU memory for the preset on 1, 8 and 64 GPUs (docs/scale.md).
static int PrintPlan(ViTConfig c, string preset, ScalarType dtype)
{
    static string Gb(long bytes, string format = "F1") => (bytes / 1e9).ToString(format, System.Globalization.CultureInfo.InvariantCulture);
    Console.WriteLine($"{preset} at {c.ImageShape.Height} px in {ViTConfigJson.DTypeName(dtype)}, per GPU, GB (MemoryPlanner.Plan):");
    Console.WriteLine("| run | GPUs (data × model) | weights | gradients | optimizer | activations | gathered weights (FSDP) | total per GPU | fits 80 GB |");
    Console.WriteLine("|---|---|---:|---:|---:|---:|---:|---:|---|");
    var rows = new (string Run, bool Training, int Batch, int Data, int Model, bool Fsdp, ActivationCheckpointing Recompute)[]
    {
        ("inference, batch 1", false, 1, 1, 1, false, ActivationCheckpointing.None),
        ("inference, batch 1", false, 1, 1, 8, false, ActivationCheckpointing.None),
        ("inference, batch 64", false, 64, 8, 8, false, ActivationCheckpointing.None),
        ("training, batch 64", true, 64, 1, 1, false, ActivationCheckpointing.None),
        ("training, batch 64", true, 64, 1, 1, false, ActivationCheckpointing.AllBlocks),
        ("training, batch 64", true, 64, 1, 8, false, ActivationCheckpointing.None),
        ("training, batch 64", true, 64, 1, 8, false, ActivationCheckpointing.AllBlocks),
        ("training, batch 64", true, 64, 8, 8, true, ActivationCheckpointing.None),
        ("training, batch 64", true, 64, 8, 8, true, ActivationCheckpointing.AllBlocks),
        ("training, batch 1024", true, 1024, 8, 8, true, ActivationCheckpointing.None),
        ("training, batch 1024", true, 1024, 8, 8, true, ActivationCheckpointing.AllBlocks),
    };
    foreach (var r in rows)
    {
        if (c.NumHeads % r.Model != 0 || c.MlpDim % r.Model != 0) continue;
        var p = MemoryPlanner.Plan(c, dtype, r.Batch, r.Training, r.Model, r.Data, r.Fsdp, r.Recompute);
        string run = r.Run + (!r.Training ? "" : r.Recompute == ActivationCheckpointing.None ? ", activations kept" : ", every block recomputed");
        string grads = r.Training ? Gb(p.Gradients) : "–", opt = r.Training ? Gb(p.OptimizerState) : "–";
        Console.WriteLine($"| {run} | {r.Data * r.Model} ({r.Data} × {r.Model}{(r.Fsdp ? ", FSDP" : "")}) | {Gb(p.Weights)} | {grads} | {opt} | {Gb(p.Activations, "F2")} | {(r.Fsdp ? Gb(p.GatheredWeights) : "–")} | {Gb(p.Total)} | {(p.FitsIn(80_000_000_000) ? "yes" : "no")} |");
    }
    var f = ModelAccounting.Flops(c);
    Console.WriteLine($"Training FLOPs per image: {f.Training / 1e12:F2} T (model), {ModelAccounting.HardwareTrainingFlops(c, ActivationCheckpointing.AllBlocks) / 1e12:F2} T with every block recomputed (hardware).");
    foreach (int k in new[] { 1, 4 })
    {
        if (c.NumHeads % k != 0 || c.MlpDim % k != 0) continue;
        var s = MemoryPlanner.PlanStreamedInference(c, dtype, 1, k);
        Console.WriteLine($"Streamed inference, batch 1, model axis {k}, per rank: resident + two blocks {Gb(s.Weights)} GB, staging {Gb(s.Staging)} GB, activations {s.Activations / 1e6:F1} MB, total {Gb(s.Total)} GB.");
    }
    return 0;
}

// Runs one pass after a full collection, with the peak resident size counted from there.
static Outcome Measure(Func<(Tensor Output, double ForwardSeconds, StreamingStats Stats)> pass)
{
    GC.Collect();
    GC.WaitForPendingFinalizers();
    long before = ProcessMemory.Sample().ResidentBytes;
    bool reset = ProcessMemory.ResetPeak();
    var total = Stopwatch.StartNew();
    var (output, forward, stats) = pass();
    total.Stop();
    long? peak = reset ? ProcessMemory.PeakResidentBytes() - before : null;
    return new Outcome(output, total.Elapsed.TotalSeconds, forward, stats, peak);
}

internal sealed record Outcome(Tensor Output, double TotalSeconds, double ForwardSeconds, StreamingStats Stats, long? PeakBytes);
