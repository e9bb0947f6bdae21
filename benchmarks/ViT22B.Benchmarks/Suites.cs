using BenchmarkDotNet.Attributes;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>Shared pieces of the suites.</summary>
internal static class Bench
{
    public static readonly Device Device = Environment.GetEnvironmentVariable("VIT22B_BENCH_DEVICE") is { Length: > 0 } d ? new Device(d) : torch.CPU;

    /// <summary>Waits for the device's queued work, so that a benchmark's clock measures the kernels, not their
    /// launch (CUDA runs asynchronously to the host; nothing to wait for on the CPU).</summary>
    public static void Sync()
    {
        if (Device.type == DeviceType.CUDA) torch.cuda.synchronize(Device);
    }

    /// <summary>"with" or "without" biases on every layer and norm (QKV, MLP, out-projection, norms).</summary>
    public static ViTConfig WithBiases(ViTConfig c, bool biases) => c with { QkvBias = biases, MlpBias = biases, ProjBias = biases, NormBias = biases };

    /// <summary>A tensor made by a chain of calls, in a dispose scope that keeps the chain's temporaries reachable until the
    /// native calls reading them have returned (docs/torchsharp-notes.md); the result belongs to no scope.</summary>
    public static Tensor Built(Func<Tensor> make)
    {
        using var scope = torch.NewDisposeScope();
        return make().DetachFromDisposeScope();
    }
}

/// <summary>
/// (a) one block forward and (b) one block forward+backward at ViT-B/16 shapes (batch 8, 197 tokens): parallel
/// (fused or separate out-projection) vs sequential, with vs without biases, float32 vs bfloat16.
/// </summary>
[Config(typeof(MfuConfig))]
public class BlockBenchmarks : MfuBenchmark
{
    private nn.Module<Tensor, Tensor> _block = null!;
    private Tensor _x = null!, _probe = null!;

    /// <summary>Parameter dtype.</summary>
    [Params(ScalarType.Float32, ScalarType.BFloat16)] public ScalarType DType { get; set; }
    /// <summary>Block variant.</summary>
    [Params("parallel-fused", "parallel-separate", "sequential")] public string Block { get; set; } = "";
    /// <summary>Biases on every projection and norm.</summary>
    [Params(true, false)] public bool Biases { get; set; }
    /// <summary>Forward only (inference mode) or forward+backward.</summary>
    [Params("forward", "forward+backward")] public string Pass { get; set; } = "";

    /// <summary>Builds the block.</summary>
    [GlobalSetup]
    public void Setup()
    {
        torch.manual_seed(0);
        bool parallel = Block.StartsWith("parallel", StringComparison.Ordinal);
        var c = Bench.WithBiases(ViTConfig.Parse("B/16") with
        {
            Block = parallel ? BlockKind.Parallel : BlockKind.Sequential, FuseOutProj = Block != "parallel-separate", QkNorm = false,
        }, Biases);
        _block = parallel ? new ParallelBlock(c.BlockOptions, Bench.Device, DType) : new SequentialBlock(c.BlockOptions, Bench.Device, DType);
        const long batch = 8;
        _x = Bench.Built(() => torch.randn(new long[] { batch, c.NumTokens, c.EmbedDim }, generator: new torch.Generator(1)).to(DType).to(Bench.Device));
        _probe = Bench.Built(() => torch.randn(new long[] { batch, c.NumTokens, c.EmbedDim }, generator: new torch.Generator(2)).to(DType).to(Bench.Device));
        double forward = batch * (2.0 * c.NumTokens * (4.0 * c.EmbedDim * c.EmbedDim + 2.0 * c.EmbedDim * c.MlpDim) + 4.0 * c.NumTokens * c.NumTokens * c.EmbedDim);
        FlopsPerInvocation = Pass == "forward" ? forward : 3 * forward;
        StartPeakSampling(DType, Bench.Device);
    }

    /// <summary>One pass.</summary>
    [Benchmark]
    public void Run()
    {
        if (Pass == "forward")
        {
            using var mode = torch.inference_mode();
            using var scope = torch.NewDisposeScope();
            _block.call(_x);
        }
        else
        {
            using var scope = torch.NewDisposeScope();
            _block.zero_grad();
            (_block.call(_x) * _probe).sum().backward();
        }
        Bench.Sync();
    }

    /// <summary>Samples the peak after each iteration.</summary>
    [IterationCleanup] public void Peak() => SamplePeak();

    /// <summary>Writes the samples and releases tensors.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        WriteSamples();
        _block.Dispose();
        _x.Dispose();
        _probe.Dispose();
    }
}

/// <summary>
/// (c) a full model inference batch and (d) a full training step (forward, backward, the library's AdamW step) with stem and head,
/// batch 8 at 224 px: presets S/16 and B/16 (timm-style: biases, LayerNorm, class token, 1000 classes) with their
/// classic block or the parallel block, float32 vs bfloat16.
/// </summary>
[Config(typeof(MfuConfig))]
public class ModelBenchmarks : MfuBenchmark
{
    private VisionTransformer _model = null!;
    private AdamW? _optimizer;
    private Tensor _images = null!, _labels = null!;

    /// <summary>Preset.</summary>
    [Params("S/16", "B/16")] public string Preset { get; set; } = "";
    /// <summary>Parameter and activation dtype.</summary>
    [Params(ScalarType.Float32, ScalarType.BFloat16)] public ScalarType DType { get; set; }
    /// <summary>Block kind.</summary>
    [Params(BlockKind.Parallel, BlockKind.Sequential)] public BlockKind Block { get; set; }
    /// <summary>inference or training.</summary>
    [Params("inference", "training")] public string Mode { get; set; } = "";

    /// <summary>Builds the model and the batch.</summary>
    [GlobalSetup]
    public void Setup()
    {
        torch.manual_seed(0);
        var c = ViTConfig.Parse(Preset) with { Block = Block };
        _model = new VisionTransformer(c, Bench.Device, DType);
        const long batch = 8;
        _images = Bench.Built(() => torch.randn(new long[] { batch, 3, c.ImageShape.Height, c.ImageShape.Width }, generator: new torch.Generator(1)).to(DType).to(Bench.Device));
        _labels = Bench.Built(() => torch.tensor(Enumerable.Range(0, (int)batch).Select(i => (long)(i % c.NumClasses)).ToArray()).to(Bench.Device));
        var f = ModelAccounting.Flops(c);
        if (Mode == "training")
        {
            _model.train();
            // The library's AdamW, as Trainer runs it: float32 master weights and state for 16-bit parameters.
            _optimizer = new AdamW(Optimizer.WithWeightDecay(_model, weightDecay: 1e-4, headWeightDecay: 1e-4));
            FlopsPerInvocation = batch * f.Training;
        }
        else
        {
            _model.eval();
            FlopsPerInvocation = batch * f.Forward;
        }
        StartPeakSampling(DType, Bench.Device);
    }

    /// <summary>One inference batch or one training step.</summary>
    [Benchmark]
    public void Run()
    {
        using var scope = torch.NewDisposeScope();
        if (_optimizer is null)
        {
            using var mode = torch.inference_mode();
            _model.call(_images);
        }
        else
        {
            _optimizer.ZeroGrad();
            nn.functional.cross_entropy(_model.call(_images).to(ScalarType.Float32), _labels).backward();
            _optimizer.Step(1e-4);
        }
        Bench.Sync();
    }

    /// <summary>Samples the peak after each iteration.</summary>
    [IterationCleanup] public void Peak() => SamplePeak();

    /// <summary>Writes the samples and releases everything.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        WriteSamples();
        _optimizer?.Dispose();
        _model.Dispose();
        _images.Dispose();
        _labels.Dispose();
    }
}

/// <summary>A 2048×2048×2048 GEMM per dtype against the best of the GEMMs sampled beside it (its MFU column is at most
/// 100 %: the mean of its iterations over the best sample).</summary>
[Config(typeof(MfuConfig))]
public class GemmPeakBenchmarks : MfuBenchmark
{
    private Tensor _a = null!, _b = null!;

    /// <summary>dtype.</summary>
    [Params(ScalarType.Float32, ScalarType.BFloat16)] public ScalarType DType { get; set; }

    /// <summary>Creates the operands.</summary>
    [GlobalSetup]
    public void Setup()
    {
        _a = Bench.Built(() => torch.randn(2048, 2048).to(DType).to(Bench.Device));
        _b = Bench.Built(() => torch.randn(2048, 2048).to(DType).to(Bench.Device));
        FlopsPerInvocation = 2.0 * 2048 * 2048 * 2048;
        StartPeakSampling(DType, Bench.Device);
    }

    /// <summary>One GEMM.</summary>
    [Benchmark]
    public void Gemm2048()
    {
        using var mode = torch.inference_mode();
        using var c = _a.matmul(_b);
        Bench.Sync();
    }

    /// <summary>Samples the peak after each iteration.</summary>
    [IterationCleanup] public void Peak() => SamplePeak();

    /// <summary>Writes the samples.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        WriteSamples();
        _a.Dispose();
        _b.Dispose();
    }
}
