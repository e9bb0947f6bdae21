using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Accounting;

/// <summary>The outcome of an interleaved MFU measurement.</summary>
/// <param name="StepSeconds">Median wall time of one measured step.</param>
/// <param name="StepFlops">Model FLOPs of one step (PaLM convention: no rematerialization).</param>
/// <param name="PeakFlopsPerSecond">The peak: the best FLOP/s of the GEMMs timed in the same run
/// (<see cref="MfuMeter.PeakFlopsPerSecond"/>).</param>
/// <param name="Samples">Number of measured rounds.</param>
public sealed record MfuMeasurement(double StepSeconds, double StepFlops, double PeakFlopsPerSecond, int Samples)
{
    /// <summary>The step's time in each measured round, in order (empty when not recorded).</summary>
    public IReadOnlyList<double> StepSamples { get; init; } = Array.Empty<double>();

    /// <summary>Achieved model FLOP/s.</summary>
    public double AchievedFlopsPerSecond => StepFlops / StepSeconds;
    /// <summary>Model FLOPs utilization, achieved over the peak, or null when the step ran faster than the peak
    /// (<see cref="Utilization.Of"/>: the peak is then no ceiling).</summary>
    public double? Mfu => Utilization.Of(AchievedFlopsPerSecond, PeakFlopsPerSecond);
}

/// <summary>
/// Measures the peak FLOP/s that model-FLOPs utilization is taken against, in the same process at the same time as
/// the step: GEMMs of the step's dtype on its device, of several shapes in turn (<see cref="DefaultShapes"/>: square
/// and transformer-projection-like), timed between the steps, and the peak is the <b>best</b> rate of all of them. A
/// shared machine only slows a GEMM down, so the best sample is the most credible ceiling, where a median or a single
/// timing at start-up can fall below what the step itself reaches (the trainer sample once printed an MFU of 141.9 %).
/// CUDA devices are synchronized before every clock read.
/// </summary>
public sealed class MfuMeter : IDisposable
{
    private readonly (Tensor A, Tensor B, double Flops)[] _gemms;
    private readonly Device _device;
    private int _next;

    /// <summary>The GEMM shapes (M, K, N) timed in turn on a CPU: 2048³ and the two projection-like shapes of the same
    /// FLOPs (2048 tokens × 1024 → 4096 and 2048 × 4096 → 1024). On a GPU each side is 4 times as long, so that the
    /// GEMM is large enough to reach the device's rate.</summary>
    public static readonly IReadOnlyList<(long M, long K, long N)> DefaultShapes = new[] { (2048L, 2048L, 2048L), (2048L, 1024L, 4096L), (2048L, 4096L, 1024L) };

    /// <summary>Prepares the GEMM operands (seeded, not from the global generator) for <paramref name="shapes"/>
    /// (default <see cref="DefaultShapes"/>, scaled by 4 on CUDA).</summary>
    public MfuMeter(Device device, ScalarType dtype, IReadOnlyList<(long M, long K, long N)>? shapes = null)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
        shapes ??= device.type == DeviceType.CUDA ? DefaultShapes.Select(s => (s.M * 4, s.K * 4, s.N * 4)).ToArray() : DefaultShapes;
        if (shapes.Count == 0 || shapes.Any(s => s.M < 1 || s.K < 1 || s.N < 1))
            throw new ArgumentException("Give at least one GEMM shape, every side positive.", nameof(shapes));
        Shapes = shapes.ToArray();
        var g = new torch.Generator(0);
        using var scope = torch.NewDisposeScope();   // holds the temporaries through each native call
        _gemms = Shapes.Select(s => (
            torch.randn(new[] { s.M, s.K }, generator: g).to(dtype).to(device).DetachFromDisposeScope(),
            torch.randn(new[] { s.K, s.N }, generator: g).to(dtype).to(device).DetachFromDisposeScope(),
            2.0 * s.M * s.K * s.N)).ToArray();
        g.Dispose();
    }

    /// <summary>The GEMM shapes (M, K, N) timed in turn.</summary>
    public IReadOnlyList<(long M, long K, long N)> Shapes { get; }

    /// <summary>How many times, at least, each shape is timed before there is a peak: one timing (a cold first call, or
    /// one taken while the machine was busy) can read far below the rate the step itself reaches.</summary>
    public const int MinimumRounds = 3;

    /// <summary>The best FLOP/s of all GEMMs timed so far (by <see cref="SamplePeak"/>, <see cref="SampleRound"/> and the
    /// measurements).</summary>
    /// <exception cref="InvalidOperationException">Some shape has been timed fewer than <see cref="MinimumRounds"/>
    /// times.</exception>
    public double PeakFlopsPerSecond => PeakSamples >= MinimumSamples
        ? _best
        : throw new InvalidOperationException($"{PeakSamples} GEMM(s) timed; a peak needs each of the {_gemms.Length} shapes timed {MinimumRounds} times (call SampleRound).");

    private double _best;

    // Every shape MinimumRounds times: SamplePeak takes the shapes in turn.
    private int MinimumSamples => MinimumRounds * _gemms.Length;

    /// <summary>How many GEMMs have been timed.</summary>
    public int PeakSamples { get; private set; }

    private void Sync()
    {
        if (_device.type == DeviceType.CUDA) torch.cuda.synchronize(_device);
    }

    /// <summary>Times one GEMM of the next shape in turn and returns its FLOP/s (the peak keeps the best).</summary>
    public double SamplePeak()
    {
        var (a, b, flops) = _gemms[_next];
        _next = (_next + 1) % _gemms.Length;
        using var mode = torch.inference_mode();
        Sync();
        var sw = Stopwatch.StartNew();
        using (var c = a.matmul(b)) Sync();
        double rate = flops / Math.Max(sw.Elapsed.TotalSeconds, 1e-9);
        _best = Math.Max(_best, rate);
        PeakSamples++;
        return rate;
    }

    /// <summary>Times one GEMM of every shape, then as many more as it takes for each shape to have been timed
    /// <see cref="MinimumRounds"/> times, so that <see cref="PeakFlopsPerSecond"/> can be read.</summary>
    public void SampleRound()
    {
        for (int i = 0; i < _gemms.Length; i++) SamplePeak();
        while (PeakSamples < MinimumSamples) SamplePeak();
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
    /// (GEMM, step) pairs (and more GEMMs if each shape has not been timed <see cref="MinimumRounds"/> times yet), and
    /// returns the step's median against the best GEMM.</summary>
    public MfuMeasurement Measure(Action step, double stepFlops, int samples = 10, int warmup = 2)
    {
        ArgumentNullException.ThrowIfNull(step);
        return MeasureInterleaved(new[] { (step, stepFlops) }, samples, warmup)[0];
    }

    /// <summary>
    /// Compares several steps in one run: <paramref name="warmup"/> untimed rounds, then <paramref name="samples"/>
    /// rounds of (GEMM, step 1, GEMM, step 2, …), so every step meets the same drift of a shared machine. Each result
    /// holds its step's median and its per-round times (<see cref="MfuMeasurement.StepSamples"/>, for
    /// <see cref="MedianRatio"/>); the peak of every result is the best of all the GEMMs this meter has timed.
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
                SamplePeak();
                TimeStep(step);
            }
        var times = steps.Select(_ => new double[samples]).ToArray();
        for (int i = 0; i < samples; i++)
            for (int j = 0; j < steps.Count; j++)
            {
                SamplePeak();
                times[j][i] = TimeStep(steps[j].Step);
            }
        while (PeakSamples < MinimumSamples) SamplePeak();   // few rounds: every shape still timed MinimumRounds times
        double peak = PeakFlopsPerSecond;
        return steps.Select((s, j) => new MfuMeasurement(Median(times[j]), s.Flops, peak, samples) { StepSamples = times[j] }).ToArray();
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
        foreach (var (a, b, _) in _gemms)
        {
            a.Dispose();
            b.Dispose();
        }
    }
}
