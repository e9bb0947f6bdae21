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
