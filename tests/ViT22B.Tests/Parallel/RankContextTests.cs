using System.Globalization;
using TorchSharp;
using ViT22B.Layers;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

public sealed class RankContextTests
{
    // torch.device("cuda:0") initializes CUDA and fails on a CPU-only build; a Device value does not.
    private static Device Parse(string d) => d == "cpu" ? torch.CPU
        : new Device(DeviceType.CUDA, d.Contains(':') ? int.Parse(d[(d.IndexOf(':') + 1)..], CultureInfo.InvariantCulture) : -1);

    private static RankContext[] Contexts(int data, int model, params string[] devices)
    {
        var mesh = new DeviceMesh(data, model, devices.Select(Parse).ToArray());
        return RankContext.CreateThreaded(new ThreadedWorld(mesh.WorldSize), mesh);
    }

    [Fact]
    public void Ranks_sharing_a_gpu_in_process_are_recognized()
    {
        Assert.All(Contexts(1, 2, "cuda:0"), c => Assert.True(c.SharesGpuInProcess));
        Assert.All(Contexts(1, 2, "cuda"), c => Assert.True(c.SharesGpuInProcess));            // both on libtorch's current GPU
        Assert.All(Contexts(1, 2, "cuda:0", "cuda:1"), c => Assert.False(c.SharesGpuInProcess));
        Assert.All(Contexts(2, 2, "cpu"), c => Assert.False(c.SharesGpuInProcess));
        var mixed = Contexts(1, 3, "cuda:0", "cuda:1", "cuda:1");
        Assert.Equal(new[] { false, true, true }, mixed.Select(c => c.SharesGpuInProcess));
    }

    [Fact]
    public void Training_through_ranks_sharing_a_gpu_is_refused_before_any_collective()
    {
        // The mesh says both ranks live on cuda:0; the blocks are built on the CPU so the check runs on this machine.
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        var contexts = Contexts(1, 2, "cuda:0");
        var s = new ShardContext(new ShardingPlan(c, 2, 1), contexts[0], CommMode.Overlapped);
        using var encoder = new ShardedEncoder(c.Block, c.Depth, c.BlockOptions, s, torch.CPU, ScalarType.Float32);
        using var x = torch.randn(2, c.NumTokens, c.EmbedDim);
        var e = Assert.Throws<NotSupportedException>(() => encoder.forward(x));
        Assert.Contains("shares cuda:0", e.Message);
        Assert.Contains("torch.no_grad()", e.Message);
        Assert.Equal(0, ((ThreadedCommunicator)contexts[0].Model).Operations);
    }

    [Fact]
    public void UseDevice_on_the_cpu_changes_nothing()
    {
        var contexts = Contexts(1, 2, "cpu");
        using (contexts[0].UseDevice())
        using (var x = torch.ones(3))
            Assert.Equal(DeviceType.CPU, x.device.type);
    }
}
