using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace ViT22B.Parallel;

/// <summary>One finished worker process of <see cref="LocalLauncher"/>.</summary>
/// <param name="Rank">Its <c>RANK</c>.</param>
/// <param name="ExitCode">Its exit code (−1 when it was killed at the deadline).</param>
/// <param name="Output">Its standard output and error, interleaved by line.</param>
public sealed record WorkerResult(int Rank, int ExitCode, string Output);

/// <summary>
/// Starts N copies of a program on this machine with the torchrun variables set (<c>MASTER_ADDR</c> = 127.0.0.1, a
/// free <c>MASTER_PORT</c>, <c>RANK</c> = <c>LOCAL_RANK</c> = i, <c>WORLD_SIZE</c> = <c>LOCAL_WORLD_SIZE</c> = N), and
/// waits for all of them. Each rank's GPU is its local rank modulo the GPUs it sees, so N may exceed the GPUs where
/// NCCL allows ranks to share one. When one fails or the deadline passes, the others are killed, so a crashed rank never leaves the rest
/// hanging in a collective. For several machines, start one launcher per machine by hand with the variables of
/// <see cref="LaunchEnvironment"/> instead (see docs/gpu.md).
/// </summary>
public static class LocalLauncher
{
    /// <summary>Runs <paramref name="fileName"/> <paramref name="arguments"/> as <paramref name="worldSize"/> ranks.</summary>
    public static IReadOnlyList<WorkerResult> Run(string fileName, IReadOnlyList<string> arguments, int worldSize, TimeSpan timeout,
        IReadOnlyDictionary<string, string>? environment = null)
    {
        ArgumentNullException.ThrowIfNull(fileName);
        ArgumentNullException.ThrowIfNull(arguments);
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), $"worldSize must be ≥ 1, found {worldSize}.");
        int port = FreePort();
        var processes = new List<(Process P, System.Text.StringBuilder Out)>();
        try
        {
            for (int rank = 0; rank < worldSize; rank++)
            {
                var psi = new ProcessStartInfo(fileName) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
                foreach (var a in arguments) psi.ArgumentList.Add(a);
                if (environment is not null) foreach (var (k, v) in environment) psi.Environment[k] = v;
                psi.Environment["MASTER_ADDR"] = "127.0.0.1";
                psi.Environment["MASTER_PORT"] = port.ToString(System.Globalization.CultureInfo.InvariantCulture);
                psi.Environment["RANK"] = psi.Environment["LOCAL_RANK"] = rank.ToString(System.Globalization.CultureInfo.InvariantCulture);
                psi.Environment["WORLD_SIZE"] = psi.Environment["LOCAL_WORLD_SIZE"] = worldSize.ToString(System.Globalization.CultureInfo.InvariantCulture);
                var output = new System.Text.StringBuilder();
                var p = new Process { StartInfo = psi };
                p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
                p.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
                if (!p.Start()) throw new InvalidOperationException($"Could not start '{fileName}' for rank {rank}.");
                p.BeginOutputReadLine();
                p.BeginErrorReadLine();
                processes.Add((p, output));
            }
            var deadline = DateTime.UtcNow + timeout;
            var killed = new HashSet<int>();
            while (processes.Any(x => !x.P.HasExited))
            {
                bool failed = processes.Any(x => x.P.HasExited && x.P.ExitCode != 0);
                if (failed || DateTime.UtcNow > deadline)
                {
                    for (int r = 0; r < processes.Count; r++)
                        if (!processes[r].P.HasExited) { processes[r].P.Kill(entireProcessTree: true); killed.Add(r); }
                    break;
                }
                Thread.Sleep(20);
            }
            var results = new List<WorkerResult>();
            for (int r = 0; r < processes.Count; r++)
            {
                var (p, output) = processes[r];
                p.WaitForExit();
                lock (output) results.Add(new WorkerResult(r, killed.Contains(r) ? -1 : p.ExitCode, output.ToString()));
            }
            return results;
        }
        finally
        {
            foreach (var (p, _) in processes)
            {
                try { if (!p.HasExited) p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
                p.Dispose();
            }
        }
    }

    /// <summary>A TCP port that was free on loopback a moment ago.</summary>
    internal static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }
}
