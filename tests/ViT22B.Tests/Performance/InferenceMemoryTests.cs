using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Performance;

/// <summary>Tests that read process-wide counters run alone.</summary>
[CollectionDefinition("process-wide counters", DisableParallelization = true)]
public sealed class ProcessWideCounters { }

/// <summary>The guard for the 10,000-iteration memory benchmark: a short inference loop leaks no tensors and does not
/// grow the resident set after warm-up.</summary>
[Collection("process-wide counters")]
public class InferenceMemoryTests
{
    [Theory]
    [InlineData(BlockKind.Parallel)]
    [InlineData(BlockKind.Sequential)]
    public void Inference_loop_keeps_tensor_count_and_memory_flat(BlockKind block)
    {
        var c = ViTConfig.Parse("22B/14") with { EmbedDim = 64, Depth = 2, NumHeads = 2, MlpDim = 128, ImgSize = 56, Block = block, NumClasses = 10 };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        model.eval();
        using var images = torch.randn(2, 3, 56, 56);
        void Step()
        {
            using var inference = torch.inference_mode();
            using var scope = torch.NewDisposeScope();
            model.call(images);
        }
        for (int i = 0; i < 500; i++) Step();   // the .NET GC's gen0 budget grows the resident set during the first iterations
        var before = ProcessMemory.Sample();
        long maxLive = 0;
        for (int i = 0; i < 400; i++)
        {
            Step();
            maxLive = Math.Max(maxLive, Tensor.TotalCount);
        }
        var after = ProcessMemory.Sample();
        Assert.Equal(before.LiveTensors, after.LiveTensors);
        Assert.True(maxLive - before.LiveTensors == 0, $"{maxLive - before.LiveTensors} tensors outlived their iteration");
        long growth = after.ResidentBytes - before.ResidentBytes;
        Assert.True(growth < 32L << 20, $"resident memory grew by {growth / (1 << 20)} MiB over 400 iterations");
    }

    [Fact]
    public void Training_steps_keep_tensor_count_flat()
    {
        var c = ViTConfig.Parse("22B/14") with { EmbedDim = 64, Depth = 2, NumHeads = 2, MlpDim = 128, ImgSize = 56, NumClasses = 10 };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        using var optimizer = torch.optim.AdamW(model.parameters(), lr: 1e-3);
        using var images = torch.randn(2, 3, 56, 56);
        using var labels = torch.tensor(new long[] { 1, 2 });
        void Step()
        {
            using var scope = torch.NewDisposeScope();
            optimizer.zero_grad();
            nn.functional.cross_entropy(model.call(images), labels).backward();
            optimizer.step();
        }
        for (int i = 0; i < 5; i++) Step();
        var before = ProcessMemory.Sample();
        for (int i = 0; i < 500; i++) Step();   // the .NET GC's gen0 budget grows the resident set during the first iterations
        Assert.Equal(before.LiveTensors, ProcessMemory.Sample().LiveTensors);
    }
}
