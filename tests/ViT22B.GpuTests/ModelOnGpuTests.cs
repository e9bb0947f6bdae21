using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Tests;
using static TorchSharp.torch;

namespace ViT22B.GpuTests;

public sealed class ModelOnGpuTests
{
    [CudaFact]
    public void Cuda_model_matches_cpu_model()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var cpu = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(cpu, seed: 24);
        using var gpu = new VisionTransformer(c, torch.CUDA, ScalarType.Float64);
        using var scope = torch.NewDisposeScope();
        gpu.load_state_dict(cpu.state_dict());
        var images = TestUtil.RandomImages(c, 2, seed: 25);
        using var noGrad = torch.no_grad();
        Assert.True(TestUtil.MaxAbs(gpu.call(images.cuda()).cpu(), cpu.call(images)) < 1e-10);
    }
}

/// <summary>Block-streamed inference on a GPU: prefetched blocks are staged in host memory and moved to the device on
/// the computing thread's stream (BlockStreaming), so the outputs equal the in-memory model's on the same GPU.</summary>
public sealed class StreamedOnGpuTests
{
    [CudaFact]
    public void Streamed_blocks_with_prefetch_give_the_in_memory_outputs_on_the_gpu()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { Depth = 6 };
        var gpu = torch.device("cuda:0");
        using var weights = new SeededWeights(c, seed: 31);
        using var reference = new VisionTransformer(c, gpu, ScalarType.Float32);
        StreamedVisionTransformer.Load(reference, weights, "");
        using var images = TestUtil.RandomImages(c, 3, seed: 32, ScalarType.Float32).to(gpu);
        using var inference = torch.inference_mode();
        using var expected = reference.call(images).cpu();
        foreach (bool prefetch in new[] { true, false })
        {
            using var streamed = new StreamedVisionTransformer(c, weights, gpu, ScalarType.Float32, prefetch);
            for (int pass = 0; pass < 3; pass++)   // later passes reuse memory the earlier blocks released
            {
                using var actual = streamed.Forward(images).cpu();
                Assert.True(TestUtil.MaxAbs(actual, expected) == 0, $"prefetch {prefetch}, pass {pass}: differs by {TestUtil.MaxAbs(actual, expected):E2}");
            }
        }
    }
}
