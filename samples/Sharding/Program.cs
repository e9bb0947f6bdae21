// Sharding: a ViT-22B-style model on a simulated data × model mesh (ranks are threads of this process), checked
// against the unsharded model, with per-rank parameter bytes and communication volume per training step.
//
//   dotnet run --project samples/Sharding -c Release
//   dotnet run --project samples/Sharding -c Release -- --data 1 --model 4 --mode plain
using System.CommandLine;
using System.Diagnostics;
using Spectre.Console;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

var dataOption = new Option<int>("--data") { Description = "Data-parallel axis size.", DefaultValueFactory = _ => 2 };
var modelOption = new Option<int>("--model") { Description = "Tensor-parallel (model) axis size; must divide the heads and the MLP size.", DefaultValueFactory = _ => 2 };
var modeOption = new Option<CommMode>("--mode") { Description = "Overlapped (ring loops) or Plain (collective, then matmul).", DefaultValueFactory = _ => CommMode.Overlapped };
var fsdpOption = new Option<bool>("--fsdp") { Description = "Also shard the block weights over the data axis (ZeRO-3)." };
var batchOption = new Option<int>("--batch-size") { Description = "Global batch (split over the data axis).", DefaultValueFactory = _ => 4 };
var launchOption = new Option<int>("--launch") { Description = "Start this many local processes with the torchrun variables (one per GPU) running --rendezvous-check, and check that all received rank 0's id." };
var rendezvousOption = new Option<bool>("--rendezvous-check") { Description = "Worker mode: read the torchrun variables, receive a 128-byte id from rank 0 over TCP and print its checksum." };
var root = new RootCommand("Run a ViT-22B-style model on a simulated mesh and check it against the unsharded model.")
{
    dataOption, modelOption, modeOption, fsdpOption, batchOption, launchOption, rendezvousOption,
};
root.SetAction(parse =>
{
    try
    {
        if (parse.GetValue(rendezvousOption)) return RendezvousWorker();
        if (parse.GetValue(launchOption) is > 0 and var n) return Launch(n);
        return Run(parse.GetValue(dataOption), parse.GetValue(modelOption), parse.GetValue(modeOption), parse.GetValue(fsdpOption), parse.GetValue(batchOption));
    }
    catch (ArgumentException e)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 1;
    }
});
return root.Parse(args).Invoke();

// Multi-process check: N processes of this program meet over TCP (MASTER_ADDR:MASTER_PORT) and rank 0 hands every
// rank the same 128 bytes; on GPUs the same exchange carries ncclGetUniqueId's id (docs/gpu.md).
static int Launch(int n)
{
    string self = Environment.ProcessPath ?? throw new InvalidOperationException("Cannot tell this program's path.");
    var args = new List<string>();
    if (Path.GetFileNameWithoutExtension(self) == "dotnet") args.Add(System.Reflection.Assembly.GetEntryAssembly()!.Location);   // started as `dotnet Sharding.dll`
    args.Add("--rendezvous-check");
    var results = LocalLauncher.Run(self, args, n, TimeSpan.FromSeconds(60));
    var table = new Table().Title($"Rendezvous of {n} local processes").AddColumns("rank", "exit code", "output");
    foreach (var r in results) table.AddRow($"{r.Rank}", $"{r.ExitCode}", r.Output.Trim().EscapeMarkup());
    AnsiConsole.Write(table);
    var sums = results.Select(r => r.Output.Split("checksum ").LastOrDefault()?.Trim()).Distinct().ToList();
    bool ok = results.All(r => r.ExitCode == 0) && sums.Count == 1 && sums[0] is { Length: > 0 };
    AnsiConsole.MarkupLine(ok ? $"[green]All {n} ranks received rank 0's id.[/]" : "[red]The rendezvous failed.[/]");
    return ok ? 0 : 1;
}

static int RendezvousWorker()
{
    var env = LaunchEnvironment.FromEnvironment();
    byte[]? id = env.Rank == 0 ? System.Security.Cryptography.RandomNumberGenerator.GetBytes(128) : null;
    var received = Rendezvous.Broadcast(env, id, TimeSpan.FromSeconds(30));
    Console.WriteLine($"rank {env.Rank}/{env.WorldSize} (local {env.LocalRank}) checksum {Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(received))[..16]}");
    return 0;
}

static int Run(int data, int model, CommMode mode, bool fsdp, int batch)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    if (batch % data != 0) throw new ArgumentException($"The batch of {batch} does not split evenly over a data axis of {data}.");
    // ViT-22B's block (parallel, QK-norm, no QKV/norm bias, MAP head) at a laptop size: 65 tokens with the class token.
    var config = ViTConfig.Parse("22B/14") with
    {
        EmbedDim = 256, Depth = 4, NumHeads = 8, MlpDim = 1024, ImgSize = 64, PatchSize = 8, ClassToken = true, NumClasses = 10,
    };
    var plan = new ShardingPlan(config, model, data, fsdp);
    var mesh = new DeviceMesh(data, model);
    AnsiConsole.MarkupLine($"[bold]ViT22B sharding[/]: {config.Depth} parallel blocks, D={config.EmbedDim}, {config.NumHeads} heads, F={config.MlpDim}, {config.NumTokens} tokens; mesh data={data} × model={model}, {mode}{(fsdp ? ", FSDP" : "")}");

    // The unsharded reference: one forward and backward on the whole batch.
    torch.manual_seed(0);
    using var full = new VisionTransformer(config, torch.CPU, ScalarType.Float32);
    using (torch.no_grad())
        foreach (var (name, p) in full.named_parameters())
            if (name.StartsWith("head.")) p.normal_(0, 0.02);     // give the zero-initialized classifier some signal
    var state = full.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
    var images = torch.randn(new long[] { batch, 3, config.ImgSize, config.ImgSize }, generator: new torch.Generator(1));
    var labels = torch.arange(batch, dtype: ScalarType.Int64) % config.NumClasses;
    var refLogits = full.call(images);
    nn.functional.cross_entropy(refLogits, labels).backward();
    var refGrads = full.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone());

    var world = new ThreadedWorld(mesh.WorldSize);
    var contexts = RankContext.CreateThreaded(world, mesh);
    var watch = Stopwatch.StartNew();
    var results = Spmd.Run(world, r =>
    {
        var s = new ShardContext(plan, contexts[r], mode);
        using var shard = ShardedModel.Create(s, ScalarType.Float32);
        ShardedModel.LoadFull(shard, s, state);
        using var scope = torch.NewDisposeScope();
        long per = batch / data;
        var logits = shard.call(images.narrow(0, s.DataIndex * per, per));
        ShardedModel.Backward(nn.functional.cross_entropy(logits, labels.narrow(0, s.DataIndex * per, per)), s);
        ShardedModel.SynchronizeGradients(shard, s);
        double gradErr = 0;
        foreach (var (name, p) in shard.named_parameters())
        {
            var expected = ShardingPlan.Slice(refGrads[name], plan.Spec(name, refGrads[name].shape, s.ModelIndex, s.DataIndex));
            double scale = Math.Max(expected.abs().max().item<float>(), 1e-3);
            gradErr = Math.Max(gradErr, (p.grad! - expected).abs().max().item<float>() / scale);
        }
        double outErr = ((logits - refLogits.narrow(0, s.DataIndex * per, per)).abs().max() / refLogits.abs().max()).item<float>();
        var m = (ThreadedCommunicator)s.Rank.Model;
        var d = (ThreadedCommunicator)s.Rank.Data;
        return (r, s.DataIndex, s.ModelIndex, Bytes: ShardedModel.ParameterBytes(shard), ModelSent: m.BytesSent, ModelOps: m.Operations,
            DataSent: d.BytesSent, DataOps: d.Operations, outErr, gradErr);
    });
    watch.Stop();

    var table = new Table().Title("Per rank: one training step (forward, backward, gradient synchronization)")
        .AddColumns("rank", "(data, model)", "parameter MB", "model-axis MB sent", "model-axis ops", "data-axis MB sent", "data-axis ops", "max rel. err logits", "max rel. err grads");
    foreach (var x in results)
        table.AddRow($"{x.r}", $"({x.DataIndex}, {x.ModelIndex})", $"{x.Bytes / 1e6:F2}", $"{x.ModelSent / 1e6:F2}", $"{x.ModelOps}",
            $"{x.DataSent / 1e6:F2}", $"{x.DataOps}", $"{x.outErr:E1}", $"{x.gradErr:E1}");
    AnsiConsole.Write(table);
    long fullBytes = ModelAccounting.ParameterBytes(config, ScalarType.Float32);
    AnsiConsole.MarkupLine($"Unsharded parameters: {fullBytes / 1e6:F2} MB. Sharded step took {watch.Elapsed.TotalSeconds:F2} s (model build, load and check included).");
    bool ok = results.All(x => x.outErr < 1e-5 && x.gradErr < 1e-4);
    AnsiConsole.MarkupLine(ok
        ? "[green]Equality check passed[/]: every rank's logits and gradient shards match the unsharded model."
        : "[red]Equality check FAILED[/]: see the error columns.");
    return ok ? 0 : 2;
}
