// Sharding: a ViT-22B-style model on a simulated data × model mesh (ranks are threads of this process), checked
// against the unsharded model, with per-rank parameter bytes and communication volume per training step.
//
//   dotnet run --project samples/Sharding -c Release
//   dotnet run --project samples/Sharding -c Release -- --data 1 --model 4 --mode plain
//   dotnet run --project samples/Sharding -c Release -- --device cuda --data 1 --model 2     # simulated ranks on GPUs
//   dotnet run --project samples/Sharding -c Release -- --launch 8 --backend nccl --data 1 --model 8   # 8 GPUs, NCCL
using System.CommandLine;
using System.Diagnostics;
using Spectre.Console;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Cuda;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

var dataOption = new Option<int>("--data") { Description = "Data-parallel axis size.", DefaultValueFactory = _ => 2 };
var modelOption = new Option<int>("--model") { Description = "Tensor-parallel (model) axis size; must divide the heads and the MLP size.", DefaultValueFactory = _ => 2 };
var modeOption = new Option<CommMode>("--mode") { Description = "Overlapped (ring loops) or Plain (collective, then matmul).", DefaultValueFactory = _ => CommMode.Overlapped };
var fsdpOption = new Option<bool>("--fsdp") { Description = "Also shard the block weights over the data axis (ZeRO-3)." };
var batchOption = new Option<int>("--batch-size") { Description = "Global batch (split over the data axis).", DefaultValueFactory = _ => 4 };
var launchOption = new Option<int>("--launch") { Description = "Start this many local processes with the torchrun variables (one per GPU): with --backend nccl each runs its rank of the sharded step; otherwise each runs --rendezvous-check and all must receive rank 0's id." };
var backendOption = new Option<Backend>("--backend") { Description = "Threads: every rank is a thread of this process (CPU, or GPUs with --device cuda). Nccl: this process is one rank of a multi-process run (one per GPU; torchrun variables; start them with --launch N).", DefaultValueFactory = _ => Backend.Threads };
var deviceOption = new Option<string>("--device") { Description = "Threads backend: cpu, or cuda (rank r on GPU r mod the GPU count; ranks sharing a GPU check the forward pass only).", DefaultValueFactory = _ => "cpu" };
var rendezvousOption = new Option<bool>("--rendezvous-check") { Description = "Worker mode: read the torchrun variables, receive a 128-byte id from rank 0 over TCP and print its checksum." };
var root = new RootCommand("Run a ViT-22B-style model on a simulated mesh and check it against the unsharded model.")
{
    dataOption, modelOption, modeOption, fsdpOption, batchOption, backendOption, deviceOption, launchOption, rendezvousOption,
};
root.SetAction(parse =>
{
    try
    {
        if (parse.GetValue(rendezvousOption)) return RendezvousWorker();
        var backend = parse.GetValue(backendOption);
        if (parse.GetValue(launchOption) is > 0 and var n)
        {
            // Workers: the rendezvous check, or (nccl) this program's sharded step, one process per GPU.
            var workerArgs = backend == Backend.Nccl
                ? new List<string> { "--backend", "nccl", "--data", $"{parse.GetValue(dataOption)}", "--model", $"{parse.GetValue(modelOption)}",
                                     "--mode", $"{parse.GetValue(modeOption)}", "--batch-size", $"{parse.GetValue(batchOption)}" }
                : new List<string> { "--rendezvous-check" };
            if (backend == Backend.Nccl && parse.GetValue(fsdpOption)) workerArgs.Add("--fsdp");
            return Launch(n, workerArgs, backend == Backend.Nccl);
        }
        return Run(parse.GetValue(dataOption), parse.GetValue(modelOption), parse.GetValue(modeOption), parse.GetValue(fsdpOption), parse.GetValue(batchOption),
            backend, parse.GetValue(deviceOption) ?? "cpu");
    }
    catch (Exception e) when (e is ArgumentException or RendezvousException or CommunicatorException or ViT22B.Interop.NativeLibraryException or CudaException)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 1;
    }
});
return root.Parse(args).Invoke();

// Multi-process check: N processes of this program meet over TCP (MASTER_ADDR:MASTER_PORT) and rank 0 hands every
// rank the same 128 bytes; on GPUs the same exchange carries ncclGetUniqueId's id (docs/gpu.md).
static int Launch(int n, List<string> workerArgs, bool sharded)
{
    string self = Environment.ProcessPath ?? throw new InvalidOperationException("Cannot tell this program's path.");
    var args = new List<string>();
    if (Path.GetFileNameWithoutExtension(self) == "dotnet") args.Add(System.Reflection.Assembly.GetEntryAssembly()!.Location);   // started as `dotnet Sharding.dll`
    args.AddRange(workerArgs);
    var results = LocalLauncher.Run(self, args, n, sharded ? TimeSpan.FromMinutes(10) : TimeSpan.FromSeconds(60));
    var table = new Table().Title(sharded ? $"Sharded step on {n} local processes (NCCL)" : $"Rendezvous of {n} local processes").AddColumns("rank", "exit code", "output");
    foreach (var r in results) table.AddRow($"{r.Rank}", $"{r.ExitCode}", r.Output.Trim().EscapeMarkup());
    AnsiConsole.Write(table);
    if (sharded)
    {
        bool passed = results.All(r => r.ExitCode == 0);
        AnsiConsole.MarkupLine(passed ? $"[green]All {n} ranks match the unsharded model.[/]" : "[red]A rank failed or did not match: see its output.[/]");
        return passed ? 0 : 1;
    }
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

static int Run(int data, int model, CommMode mode, bool fsdp, int batch, Backend backend, string device)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    if (batch % data != 0) throw new ArgumentException($"The batch of {batch} does not split evenly over a data axis of {data}.");
    if (device is not ("cpu" or "cuda")) throw new ArgumentException($"--device must be cpu or cuda, found '{device}'.");
    // ViT-22B's block (parallel, QK-norm, no QKV/norm bias, MAP head) at a laptop size: 65 tokens with the class token.
    var config = ViTConfig.Parse("22B/14") with
    {
        EmbedDim = 256, Depth = 4, NumHeads = 8, MlpDim = 1024, ImgSize = 64, PatchSize = 8, ClassToken = true, NumClasses = 10,
    };
    var plan = new ShardingPlan(config, model, data, fsdp);
    var reference = Reference.Compute(config, batch);

    if (backend == Backend.Nccl)
    {
        // One process per GPU (started by --launch N, torchrun or a cluster scheduler with the torchrun variables).
        if (Environment.GetEnvironmentVariable("WORLD_SIZE") is null)
            throw new ArgumentException("--backend nccl runs one rank per process: start the processes with --launch N, or set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (torchrun's variables) for each.");
        var env = LaunchEnvironment.FromEnvironment();
        var ctx = NcclCommunicator.CreateRankContext(env, data, model, TimeSpan.FromMinutes(5));
        var s = new ShardContext(plan, ctx, mode);
        var x = RankStep(s, reference, batch, forwardOnly: false);
        Console.WriteLine($"rank {x.Rank} (data {x.DataIndex}, model {x.ModelIndex}) on {ctx.Device}: parameter MB {x.Bytes / 1e6:F2}, " +
                          $"max rel. err logits {x.OutErr:E1}, grads {x.GradErr:E1}");
        ((IDisposable)ctx.Model).Dispose();
        ((IDisposable)ctx.Data).Dispose();
        return x.OutErr < GpuTolerance && x.GradErr < GpuTolerance ? 0 : 2;
    }

    if (device == "cuda" && !torch.cuda.is_available())
        throw new ArgumentException("--device cuda: TorchSharp sees no CUDA device (a CUDA build of libtorch 2.10 and an NVIDIA driver are needed; docs/gpu.md).");
    var devices = Enumerable.Range(0, data * model).Select(r => device == "cpu" ? torch.CPU : torch.device($"cuda:{r % (int)torch.cuda.device_count()}")).ToArray();
    var mesh = new DeviceMesh(data, model, devices);
    var world = new ThreadedWorld(mesh.WorldSize);
    var contexts = RankContext.CreateThreaded(world, mesh);
    bool forwardOnly = contexts.Any(c => c.SharesGpuInProcess);
    AnsiConsole.MarkupLine($"[bold]ViT22B sharding[/]: {config.Depth} parallel blocks, D={config.EmbedDim}, {config.NumHeads} heads, F={config.MlpDim}, {config.NumTokens} tokens; mesh data={data} × model={model}, {mode}{(fsdp ? ", FSDP" : "")}, {device}");
    if (forwardOnly)
        AnsiConsole.MarkupLine("[yellow]Ranks share a GPU in this process: checking the forward pass only[/] (libtorch runs a GPU's backward on one thread; train with one GPU per rank).");
    var watch = Stopwatch.StartNew();
    var results = Spmd.Run(world, r =>
    {
        using var bound = contexts[r].UseDevice();
        return RankStep(new ShardContext(plan, contexts[r], mode), reference, batch, forwardOnly);
    });
    watch.Stop();

    var table = new Table().Title(forwardOnly ? "Per rank: one forward pass" : "Per rank: one training step (forward, backward, gradient synchronization)")
        .AddColumns("rank", "(data, model)", "parameter MB", "model-axis MB sent", "model-axis ops", "data-axis MB sent", "data-axis ops", "max rel. err logits", "max rel. err grads");
    foreach (var x in results)
        table.AddRow($"{x.Rank}", $"({x.DataIndex}, {x.ModelIndex})", $"{x.Bytes / 1e6:F2}", $"{x.ModelSent / 1e6:F2}", $"{x.ModelOps}",
            $"{x.DataSent / 1e6:F2}", $"{x.DataOps}", $"{x.OutErr:E1}", forwardOnly ? "-" : $"{x.GradErr:E1}");
    AnsiConsole.Write(table);
    long fullBytes = ModelAccounting.ParameterBytes(config, ScalarType.Float32);
    AnsiConsole.MarkupLine($"Unsharded parameters: {fullBytes / 1e6:F2} MB. Sharded step took {watch.Elapsed.TotalSeconds:F2} s (model build, load and check included).");
    // CPU: the same float32 arithmetic in another summation order. GPU: see GpuTolerance.
    double outTol = device == "cpu" ? 1e-5 : GpuTolerance, gradTol = device == "cpu" ? 1e-4 : GpuTolerance;
    bool ok = results.All(x => x.OutErr < outTol && x.GradErr < gradTol);
    AnsiConsole.MarkupLine(ok
        ? "[green]Equality check passed[/]: every rank's logits" + (forwardOnly ? "" : " and gradient shards") + " match the unsharded model."
        : "[red]Equality check FAILED[/]: see the error columns.");
    return ok ? 0 : 2;
}

// One rank's share of the check: build its shard, load the reference weights, run forward (and backward with the
// gradient synchronization), and compare with the unsharded model on the CPU.
static RankResult RankStep(ShardContext s, Reference reference, int batch, bool forwardOnly)
{
    var dev = s.Rank.Device;
    using var shard = ShardedModel.Create(s, ScalarType.Float32);
    ShardedModel.LoadFull(shard, s, reference.State);
    using var scope = torch.NewDisposeScope();
    long per = batch / s.Rank.Mesh.DataSize;
    var images = reference.Images.narrow(0, s.DataIndex * per, per).to(dev);
    var labels = reference.Labels.narrow(0, s.DataIndex * per, per).to(dev);
    Tensor logits;
    double gradErr = 0;
    if (forwardOnly)
    {
        using var noGrad = torch.no_grad();
        logits = shard.call(images);
    }
    else
    {
        logits = shard.call(images);
        ShardedModel.Backward(nn.functional.cross_entropy(logits, labels), s);
        ShardedModel.SynchronizeGradients(shard, s);
        foreach (var (name, p) in shard.named_parameters())
        {
            var expected = ShardingPlan.Slice(reference.Grads[name], s.Plan.Spec(name, reference.Grads[name].shape, s.ModelIndex, s.DataIndex));
            double scale = Math.Max(expected.abs().max().item<float>(), 1e-3);
            gradErr = Math.Max(gradErr, (p.grad!.cpu() - expected).abs().max().item<float>() / scale);
        }
    }
    double outErr = ((logits.detach().cpu() - reference.Logits.narrow(0, s.DataIndex * per, per)).abs().max() / reference.Logits.abs().max()).item<float>();
    var (m, d) = (s.Rank.Model as ThreadedCommunicator, s.Rank.Data as ThreadedCommunicator);
    return new RankResult(s.Rank.Rank, s.DataIndex, s.ModelIndex, ShardedModel.ParameterBytes(shard), m?.BytesSent ?? 0, m?.Operations ?? 0,
        d?.BytesSent ?? 0, d?.Operations ?? 0, outErr, gradErr);
}

enum Backend { Threads, Nccl }

static partial class Program
{
    // Against the CPU reference, GPU ranks see libtorch's default TF32 convolutions (cuDNN; the patch embedding),
    // about 1e-3 relative each; a sharding mistake gives errors of order 1. Chosen before any GPU run.
    const double GpuTolerance = 1e-2;
}

sealed record RankResult(int Rank, int DataIndex, int ModelIndex, long Bytes, long ModelSent, long ModelOps, long DataSent, long DataOps, double OutErr, double GradErr);

/// <summary>The unsharded model's logits and gradients for one batch, on the CPU (every process computes the same).</summary>
sealed record Reference(Dictionary<string, Tensor> State, Tensor Images, Tensor Labels, Tensor Logits, Dictionary<string, Tensor> Grads)
{
    public static Reference Compute(ViTConfig config, int batch)
    {
        torch.manual_seed(0);
        using var full = new VisionTransformer(config, torch.CPU, ScalarType.Float32);
        using (torch.no_grad())
            foreach (var (name, p) in full.named_parameters())
                if (name.StartsWith("head.")) p.normal_(0, 0.02);     // give the zero-initialized classifier some signal
        var state = full.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var images = torch.randn(new long[] { batch, 3, config.ImgSize, config.ImgSize }, generator: new torch.Generator(1));
        var labels = torch.arange(batch, dtype: ScalarType.Int64) % config.NumClasses;
        var logits = full.call(images);
        nn.functional.cross_entropy(logits, labels).backward();
        var grads = full.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone());
        return new Reference(state, images, labels, logits.detach(), grads);
    }
}
