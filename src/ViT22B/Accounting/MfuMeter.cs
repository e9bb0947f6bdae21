using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Accounting;

/// <summary>The outcome of an interleaved MFU measurement.</summary>
/// <param name="StepSeconds">Median wall time of one measured step.</param>
/// <param name="PeakSeconds">Median wall time of one reference GEMM.</param>
/// <param name="StepFlops">Model FLOPs of one step (PaLM convention: no rematerialization).</param>
/// <param name="PeakGemmFlops">FLOPs of one reference GEMM (2·n³).</param>
/// <param name="Samples">Number of interleaved (step, GEMM) pairs.</param>
public sealed record MfuMeasurement(double StepSeconds, double PeakSeconds, double StepFlops, double PeakGemmFlops, int Samples)
{
    /// <summary>Achieved model FLOP/s.</summary>
    public double AchievedFlopsPerSecond => StepFlops / StepSeconds;
    /// <summary>Peak FLOP/s of the same machine, same dtype, same run.</summary>
    public double PeakFlopsPerSecond => PeakGemmFlops / PeakSeconds;
    /// <summary>Model FLOPs utilization: achieved over same-run peak.</summary>
    public double Mfu => AchievedFlopsPerSecond / PeakFlopsPerSecond;
}

/// <summary>
/// Measures model-FLOPs utilization against a peak measured in the same process at the same time: a square GEMM
/// (default 2048³) of the same dtype on the same device is timed interleaved with the step, and both medians are
/// used (the machines are shared and drift; a peak taken minutes earlier is worthless). CUDA devices are
/// synchronized before every clock read.
/// </summary>
public sealed class MfuMeter : IDisposable
{
    private readonly Tensor _a, _b;
    private readonly Device _device;

    /// <summary>Prepares the reference GEMM operands.</summary>
    public MfuMeter(Device device, ScalarType dtype, long gemmSize = 2048)
    {
        _device = device;
        GemmSize = gemmSize;
        var g = new torch.Generator(0);
        _a = torch.randn(new[] { gemmSize, gemmSize }, generator: g).to(dtype).to(device).DetachFromDisposeScope();
        _b = torch.randn(new[] { gemmSize, gemmSize }, generator: g).to(dtype).to(device).DetachFromDisposeScope();
    }

    /// <summary>Side of the reference GEMM.</summary>
    public long GemmSize { get; }

    /// <summary>FLOPs of one reference GEMM.</summary>
    public double GemmFlops => 2.0 * GemmSize * GemmSize * GemmSize;

    private void Sync()
    {
        if (_device.type == DeviceType.CUDA) torch.cuda.synchronize(_device);
    }

    /// <summary>Times one reference GEMM.</summary>
    public double TimeGemm()
    {
        using var mode = torch.inference_mode();
        Sync();
        var sw = Stopwatch.StartNew();
        using (var c = _a.matmul(_b)) Sync();
        return sw.Elapsed.TotalSeconds;
    }

    /// <summary>Times one call of <paramref name="step"/> (which must dispose what it creates).</summary>
    public double TimeStep(Action step)
    {
        Sync();
        var sw = Stopwatch.StartNew();
        step();
        Sync();
        return sw.Elapsed.TotalSeconds;
    }

    /// <summary>Runs <paramref name="warmup"/> steps and GEMMs, then <paramref name="samples"/> interleaved
    /// (GEMM, step) pairs, and returns the medians.</summary>
    public MfuMeasurement Measure(Action step, double stepFlops, int samples = 10, int warmup = 2)
    {
        ArgumentNullException.ThrowIfNull(step);
        if (samples < 1) throw new ArgumentOutOfRangeException(nameof(samples));
        for (int i = 0; i < warmup; i++)
        {
            TimeGemm();
            TimeStep(step);
        }
        var steps = new double[samples];
        var gemms = new double[samples];
        for (int i = 0; i < samples; i++)
        {
            gemms[i] = TimeGemm();
            steps[i] = TimeStep(step);
        }
        return new MfuMeasurement(Median(steps), Median(gemms), stepFlops, GemmFlops, samples);
    }

    /// <summary>The median of a sample.</summary>
    public static double Median(IReadOnlyList<double> values)
    {
        var s = values.OrderBy(v => v).ToArray();
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    /// <summary>Releases the GEMM operands.</summary>
    public void Dispose()
    {
        _a.Dispose();
        _b.Dispose();
    }
}
