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
    /// <summary>The step's time in each measured round, in order (empty when not recorded).</summary>
    public IReadOnlyList<double> StepSamples { get; init; } = Array.Empty<double>();

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
        using var scope = torch.NewDisposeScope();   // holds the temporaries through each native call
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
        return MeasureInterleaved(new[] { (step, stepFlops) }, samples, warmup)[0];
    }

    /// <summary>
    /// Compares several steps in one run: <paramref name="warmup"/> untimed rounds, then <paramref name="samples"/>
    /// rounds of (GEMM, step 1, GEMM, step 2, …), so every step meets the same drift of a shared machine. Each result
    /// holds its step's median and its per-round times (<see cref="MfuMeasurement.StepSamples"/>, for
    /// <see cref="MedianRatio"/>); the peak of every result is the median of all the run's GEMMs.
    /// </summary>
    public MfuMeasurement[] MeasureInterleaved(IReadOnlyList<(Action Step, double Flops)> steps, int samples = 10, int warmup = 2)
    {
        ArgumentNullException.ThrowIfNull(steps);
        if (steps.Count == 0) throw new ArgumentException("No step to measure.", nameof(steps));
        if (steps.Any(s => s.Step is null)) throw new ArgumentException("A step is null.", nameof(steps));
        if (samples < 1) throw new ArgumentOutOfRangeException(nameof(samples), $"samples must be at least 1, found {samples}.");
        if (warmup < 0) throw new ArgumentOutOfRangeException(nameof(warmup), $"warmup must not be negative, found {warmup}.");
        for (int i = 0; i < warmup; i++)
            foreach (var (step, _) in steps)
            {
                TimeGemm();
                TimeStep(step);
            }
        var times = steps.Select(_ => new double[samples]).ToArray();
        var gemms = new List<double>(samples * steps.Count);
        for (int i = 0; i < samples; i++)
            for (int j = 0; j < steps.Count; j++)
            {
                gemms.Add(TimeGemm());
                times[j][i] = TimeStep(steps[j].Step);
            }
        double peak = Median(gemms);
        return steps.Select((s, j) => new MfuMeasurement(Median(times[j]), peak, s.Flops, GemmFlops, samples) { StepSamples = times[j] }).ToArray();
    }

    /// <summary>The median over rounds of <c>numerator[i] / denominator[i]</c>: how many times longer the first step
    /// took than the second, round by round (robust to drift that a ratio of medians from different moments is not).</summary>
    public static double MedianRatio(IReadOnlyList<double> numerator, IReadOnlyList<double> denominator)
    {
        ArgumentNullException.ThrowIfNull(numerator);
        ArgumentNullException.ThrowIfNull(denominator);
        if (numerator.Count != denominator.Count || numerator.Count == 0)
            throw new ArgumentException($"Expected two equally long, non-empty series of round times, found {numerator.Count} and {denominator.Count}.");
        return Median(numerator.Select((n, i) => n / denominator[i]).ToArray());
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
