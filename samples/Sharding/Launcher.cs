using Spectre.Console;
using ViT22B.Parallel;

/// <summary>Starts N local processes of this program with the torchrun variables (<see cref="LocalLauncher"/>) and
/// reports each one's outcome. Workers run <c>rendezvous-check</c> (all must receive rank 0's 128-byte id over TCP: on
/// GPUs the same exchange carries NCCL's id) or, with <c>--nccl</c>, their rank of the sharded step.</summary>
internal static class Launcher
{
    public static int Run(int n, MeshArgs? nccl)
    {
        if (n < 1) throw new ArgumentException($"launch needs at least 1 process, found {n}.");
        var workerArgs = nccl is null
            ? new List<string> { "rendezvous-check" }
            : new List<string> { "nccl", "--data", $"{nccl.Data}", "--model", $"{nccl.Model}", "--mode", $"{nccl.Mode}", "--batch-size", $"{nccl.Batch}", "--checkpointing", $"{nccl.Recompute}" };
        if (nccl is { Fsdp: true }) workerArgs.Add("--fsdp");
        string self = Environment.ProcessPath ?? throw new InvalidOperationException("Cannot tell this program's path.");
        var args = new List<string>();
        if (Path.GetFileNameWithoutExtension(self) == "dotnet") args.Add(System.Reflection.Assembly.GetEntryAssembly()!.Location);   // started as `dotnet Sharding.dll`
        args.AddRange(workerArgs);
        bool sharded = nccl is not null;
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

    public static int RendezvousWorker()
    {
        var env = LaunchEnvironment.FromEnvironment();
        byte[]? id = env.Rank == 0 ? System.Security.Cryptography.RandomNumberGenerator.GetBytes(128) : null;
        var received = Rendezvous.Broadcast(env, id, TimeSpan.FromSeconds(30));
        Console.WriteLine($"rank {env.Rank}/{env.WorldSize} (local {env.LocalRank}) checksum {Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(received))[..16]}");
        return 0;
    }
}
