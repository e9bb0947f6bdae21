using System.Diagnostics;
using Spectre.Console;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Parallel;
using static TorchSharp.torch;

/// <summary>One process, every rank a thread: the whole mesh on the CPU (or on this machine's GPUs), with per-rank
/// parameter bytes and communication volume of one training step.</summary>
internal static class Threads
{
    public static int Run(MeshArgs a, string device)
    {
        if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
        if (device is not ("cpu" or "cuda")) throw new ArgumentException($"--device must be cpu or cuda, found '{device}'.");
        _ = SampleMain.Device(device);      // cuda: refused, naming what is needed, when TorchSharp sees no GPU
        var config = MeshArgs.Config;
        var plan = a.Plan();
        var reference = Reference.Compute(config, a.Batch);
        var devices = Enumerable.Range(0, a.Data * a.Model).Select(r => device == "cpu" ? torch.CPU : torch.device($"cuda:{r % (int)torch.cuda.device_count()}")).ToArray();
        var mesh = new DeviceMesh(a.Data, a.Model, devices);
        var world = new ThreadedWorld(mesh.WorldSize);
        var contexts = RankContext.CreateThreaded(world, mesh);
        bool forwardOnly = contexts.Any(c => c.SharesGpuInProcess);
        AnsiConsole.MarkupLine($"[bold]ViT22B sharding[/]: {config.Depth} parallel blocks, D={config.EmbedDim}, {config.NumHeads} heads, F={config.MlpDim}, {config.NumTokens} tokens; mesh data={a.Data} × model={a.Model}, {a.Mode}{(a.Fsdp ? ", FSDP" : "")}, recompute {a.Recompute}, {device}");
        if (forwardOnly)
            AnsiConsole.MarkupLine("[yellow]Ranks share a GPU in this process: checking the forward pass only[/] (libtorch runs a GPU's backward on one thread; train with one GPU per rank).");
        var watch = Stopwatch.StartNew();
        var results = Spmd.Run(world, r =>
        {
            using var bound = contexts[r].UseDevice();
            return RankCheck.Step(plan, contexts[r], a.Mode, reference, a.Batch, forwardOnly, a.Recompute);
        });
        watch.Stop();

        var table = new Table().Title(forwardOnly ? "Per rank: one forward pass" : "Per rank: one training step (forward, backward, gradient synchronization)")
            .AddColumns("rank", "(data, model)", "parameter MB", "model-axis MB sent", "model-axis ops", "data-axis MB sent", "data-axis ops", "gradient collectives", "max rel. err logits", "max rel. err grads");
        foreach (var x in results)
            table.AddRow($"{x.Rank}", $"({x.DataIndex}, {x.ModelIndex})", $"{x.Bytes / 1e6:F2}", $"{x.ModelSent / 1e6:F2}", $"{x.ModelOps}",
                $"{x.DataSent / 1e6:F2}", $"{x.DataOps}", forwardOnly ? "-" : $"{x.SyncOps}", $"{x.OutErr:E1}", forwardOnly ? "-" : $"{x.GradErr:E1}");
        AnsiConsole.Write(table);
        long fullBytes = ModelAccounting.ParameterBytes(config, ScalarType.Float32);
        AnsiConsole.MarkupLine($"Unsharded parameters: {fullBytes / 1e6:F2} MB. Sharded step took {watch.Elapsed.TotalSeconds:F2} s (model build, load and check included).");
        // CPU: the same float32 arithmetic in another summation order. GPU: see RankCheck.GpuTolerance.
        double outTol = device == "cpu" ? 1e-5 : RankCheck.GpuTolerance, gradTol = device == "cpu" ? 1e-4 : RankCheck.GpuTolerance;
        bool ok = results.All(x => x.OutErr < outTol && x.GradErr < gradTol);
        AnsiConsole.MarkupLine(ok
            ? "[green]Equality check passed[/]: every rank's logits" + (forwardOnly ? "" : " and gradient shards") + " match the unsharded model."
            : "[red]Equality check FAILED[/]: see the error columns.");
        return ok ? 0 : 2;
    }
}
