using ViT22B.Parallel;

namespace ViT22B.Tests.Parallel;

public sealed class LocalLauncherTests
{
    [Fact]
    public void Every_rank_gets_the_torchrun_variables()
    {
        var results = LocalLauncher.Run("/bin/sh", new[] { "-c", "echo $RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT" }, 3, TimeSpan.FromSeconds(30));
        Assert.Equal(3, results.Count);
        var ports = new HashSet<string>();
        foreach (var r in results)
        {
            Assert.Equal(0, r.ExitCode);
            var f = r.Output.Trim().Split(' ');
            Assert.Equal(new[] { $"{r.Rank}", $"{r.Rank}", "3", "127.0.0.1" }, f.Take(4));
            ports.Add(f[4]);
        }
        Assert.Single(ports);   // one rendezvous port for all ranks
    }

    [Fact]
    public void A_failing_rank_stops_the_others()
    {
        // Rank 1 fails at once; the others would sleep for a minute.
        var started = DateTime.UtcNow;
        var results = LocalLauncher.Run("/bin/sh", new[] { "-c", "if [ \"$RANK\" = 1 ]; then echo boom; exit 3; fi; sleep 60" }, 3, TimeSpan.FromSeconds(50));
        Assert.True(DateTime.UtcNow - started < TimeSpan.FromSeconds(30), "the launcher waited for the sleeping ranks");
        Assert.Equal(3, results[1].ExitCode);
        Assert.Contains("boom", results[1].Output);
        Assert.Equal(-1, results[0].ExitCode);
        Assert.Equal(-1, results[2].ExitCode);
    }
}
