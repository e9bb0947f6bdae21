using ViT22B.Parallel;

namespace ViT22B.Tests.Parallel;

public sealed class RendezvousTests
{
    private static LaunchEnvironment Env(int port, int rank, int world) => new("127.0.0.1", port, rank, world, rank);

    [Fact]
    public async Task Rank_zero_hands_its_payload_to_every_rank()
    {
        int port = LocalLauncher.FreePort();
        var payload = Enumerable.Range(0, 128).Select(i => (byte)(255 - i)).ToArray();
        // Other ranks start first and retry until rank 0 listens.
        var others = Enumerable.Range(1, 3).Select(r => Task.Run(() => Rendezvous.Broadcast(Env(port, r, 4), null, TimeSpan.FromSeconds(20)))).ToArray();
        await Task.Delay(200);
        var mine = await Task.Run(() => Rendezvous.Broadcast(Env(port, 0, 4), payload, TimeSpan.FromSeconds(20)));
        Assert.Equal(payload, mine);
        foreach (var t in others) Assert.Equal(payload, await t);
    }

    [Fact]
    public async Task A_missing_rank_times_out_naming_it()
    {
        int port = LocalLauncher.FreePort();
        // Rank 1 on a thread of its own and rank 0 waiting 5 s: a thread-pool task could start too late on a busy
        // 2-core machine (seen once in a CI run on a machine busy with other test runs) and look missing too.
        var one = Task.Factory.StartNew(() => Rendezvous.Broadcast(Env(port, 1, 3), null, TimeSpan.FromSeconds(10)),
            CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        var e = Assert.Throws<RendezvousException>(() => Rendezvous.Broadcast(Env(port, 0, 3), new byte[] { 1 }, TimeSpan.FromSeconds(5)));
        Assert.Contains("ranks 2 of 3 did not arrive", e.Message);
        await Assert.ThrowsAsync<RendezvousException>(() => one);
    }

    [Fact]
    public void Rank_zero_absent_is_a_timeout_not_a_hang()
    {
        int port = LocalLauncher.FreePort();
        var e = Assert.Throws<RendezvousException>(() => Rendezvous.Broadcast(Env(port, 2, 4), null, TimeSpan.FromSeconds(1)));
        Assert.Contains($"127.0.0.1:{port} did not answer", e.Message);
    }

    [Fact]
    public async Task A_peer_with_another_world_size_is_refused_on_both_sides()
    {
        int port = LocalLauncher.FreePort();
        var wrong = Task.Run(() => Rendezvous.Broadcast(Env(port, 1, 3), null, TimeSpan.FromSeconds(10)));
        var e = Assert.Throws<RendezvousException>(() => Rendezvous.Broadcast(Env(port, 0, 2), new byte[] { 7 }, TimeSpan.FromSeconds(10)));
        Assert.Contains("WORLD_SIZE = 3, rank 0 has 2", e.Message);
        var peer = await Assert.ThrowsAsync<RendezvousException>(() => wrong);
        Assert.Contains("refused", peer.Message);
    }

    [Fact]
    public void Torchrun_variables_are_read_and_checked()
    {
        var vars = new Dictionary<string, string> { ["MASTER_ADDR"] = "node0", ["MASTER_PORT"] = "29500", ["RANK"] = "3", ["WORLD_SIZE"] = "8", ["LOCAL_RANK"] = "3" };
        Assert.Equal(new LaunchEnvironment("node0", 29500, 3, 8, 3), LaunchEnvironment.FromEnvironment(k => vars.GetValueOrDefault(k)));
        vars["RANK"] = "8";
        Assert.Contains("RANK = '8' is not an integer in [0, 7]", Assert.Throws<InvalidOperationException>(() => LaunchEnvironment.FromEnvironment(k => vars.GetValueOrDefault(k))).Message);
        vars.Remove("MASTER_ADDR");
        Assert.Contains("MASTER_ADDR is not set", Assert.Throws<InvalidOperationException>(() => LaunchEnvironment.FromEnvironment(k => vars.GetValueOrDefault(k))).Message);
    }
}
