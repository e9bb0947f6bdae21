using BenchmarkDotNet.Attributes;
using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>
/// One encoder block's inference forward at ViT-B/16 shapes (197 tokens, batch 8), parallel vs sequential, next to
/// the same-dtype 2048³ GEMM that serves as the machine's peak in the same run. The MFU column and the full suites
/// (forward+backward, whole model, training step) are tracked by the performance issue.
/// </summary>
[MemoryDiagnoser(displayGenColumns: false)]
public class BlockForwardBenchmarks
{
    private nn.Module<Tensor, Tensor> _block = null!;
    private Tensor _x = null!, _a = null!, _b = null!;

    /// <summary>Block kind.</summary>
    [Params(BlockKind.Parallel, BlockKind.Sequential)]
    public BlockKind Block { get; set; }

    /// <summary>Builds the block and inputs.</summary>
    [GlobalSetup]
    public void Setup()
    {
        torch.manual_seed(0);
        var c = ViTConfig.Parse("B/16") with { Block = Block, QkNorm = Block == BlockKind.Parallel, QkvBias = Block == BlockKind.Sequential };
        _block = Block == BlockKind.Parallel ? new ParallelBlock(c, torch.CPU) : new SequentialBlock(c, torch.CPU);
        _block.eval();
        _x = torch.randn(8, c.NumTokens, c.EmbedDim);
        _a = torch.randn(2048, 2048);
        _b = torch.randn(2048, 2048);
    }

    /// <summary>Same-run peak: a 2048×2048×2048 float32 GEMM (17.2 GFLOP).</summary>
    [Benchmark(Baseline = true)]
    public void Gemm2048()
    {
        using var mode = torch.inference_mode();
        using var y = _a.matmul(_b);
    }

    /// <summary>One block forward.</summary>
    [Benchmark]
    public void BlockForward()
    {
        using var mode = torch.inference_mode();
        using var y = _block.call(_x);
    }

    /// <summary>Releases tensors.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        _block.Dispose();
        _x.Dispose();
        _a.Dispose();
        _b.Dispose();
    }
}
