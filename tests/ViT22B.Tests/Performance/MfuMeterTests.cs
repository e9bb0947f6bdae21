using TorchSharp;
using ViT22B.Accounting;
using static TorchSharp.torch;

namespace ViT22B.Tests.Performance;

/// <summary>The mechanics of the same-run MFU measurement (not speed: the timings themselves live in the benchmarks).</summary>
public class MfuMeterTests
{
    private static readonly (long, long, long)[] Small = { (32, 32, 32), (16, 64, 32) };

    [Fact]
    public void Interleaved_steps_run_in_rounds_and_keep_their_round_times()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, Small);
        var calls = new List<string>();
        var results = meter.MeasureInterleaved(new (Action, double)[]
        {
            (() => calls.Add("a"), 100.0),
            (() => { calls.Add("b"); Thread.Sleep(20); }, 300.0),
        }, samples: 3, warmup: 2);

        Assert.Equal(string.Concat(Enumerable.Repeat("ab", 5)), string.Concat(calls));   // 2 warm-up + 3 measured rounds
        Assert.Equal(2, results.Length);
        Assert.All(results, r => Assert.Equal(3, r.StepSamples.Count));
        Assert.All(results[1].StepSamples, t => Assert.True(t >= 0.020, $"a 20 ms step recorded as {t * 1e3:F2} ms"));
        Assert.Equal(MfuMeter.Median(results[1].StepSamples), results[1].StepSeconds);
        Assert.Equal(new[] { 100.0, 300.0 }, results.Select(r => r.StepFlops));
        Assert.Equal(10, meter.PeakSamples);                                        // one GEMM before every step, warm-up included
        Assert.Equal(results[0].PeakFlopsPerSecond, results[1].PeakFlopsPerSecond); // one peak: the best of the run's GEMMs
        Assert.Equal(meter.PeakFlopsPerSecond, results[0].PeakFlopsPerSecond);
        Assert.Equal(Utilization.Of(results[1].StepFlops / results[1].StepSeconds, results[1].PeakFlopsPerSecond), results[1].Mfu);
    }

    [Fact]
    public void One_round_without_warm_up_still_times_every_shape_the_minimum_number_of_times()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, Small);
        var m = meter.Measure(() => { }, 10.0, samples: 1, warmup: 0);
        Assert.Equal(MfuMeter.MinimumRounds * Small.Length, meter.PeakSamples);
        Assert.Equal(meter.PeakFlopsPerSecond, m.PeakFlopsPerSecond);

        using var rounds = new MfuMeter(torch.CPU, ScalarType.Float32, Small);
        rounds.SampleRound();   // the first round tops up to the minimum, later ones time each shape once
        Assert.Equal(MfuMeter.MinimumRounds * Small.Length, rounds.PeakSamples);
        rounds.SampleRound();
        Assert.Equal((MfuMeter.MinimumRounds + 1) * Small.Length, rounds.PeakSamples);
    }

    [Fact]
    public void Single_measurement_is_the_one_step_case()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, Small);
        int calls = 0;
        var m = meter.Measure(() => calls++, 10.0, samples: 4, warmup: 1);
        Assert.Equal(5, calls);
        Assert.Equal(4, m.Samples);
        Assert.Equal(4, m.StepSamples.Count);
    }

    [Fact]
    public void The_peak_is_the_best_gemm_of_all_shapes_in_turn()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, Small);
        Assert.Throws<InvalidOperationException>(() => meter.PeakFlopsPerSecond);
        var rates = Enumerable.Range(0, 5).Select(_ => meter.SamplePeak()).ToList();
        // Never one timing: each of the two shapes MinimumRounds (3) times before there is a peak.
        Assert.Contains("each of the 2 shapes timed 3 times", Assert.Throws<InvalidOperationException>(() => meter.PeakFlopsPerSecond).Message, StringComparison.Ordinal);
        rates.Add(meter.SamplePeak());
        Assert.Equal(rates.Max(), meter.PeakFlopsPerSecond);
        Assert.Equal(6, meter.PeakSamples);
        Assert.Equal(Small, meter.Shapes);
        Assert.Throws<ArgumentException>(() => new MfuMeter(torch.CPU, ScalarType.Float32, new (long, long, long)[] { (0, 4, 4) }));
    }

    [Fact]
    public void A_utilization_above_the_peak_is_never_a_number()
    {
        Assert.Equal(0.5, Utilization.Of(50, 100));
        Assert.Equal(1.0, Utilization.Of(100, 100));
        Assert.Null(Utilization.Of(141.9, 100));
        Assert.Equal("43.2 %", Utilization.Format(43.2e12, 100e12));
        string over = Utilization.Format(141.9e12, 100e12);
        Assert.StartsWith("n/a", over, StringComparison.Ordinal);
        Assert.Contains("141.9 TFLOP/s exceeds the peak 100 TFLOP/s", over, StringComparison.Ordinal);
        Assert.DoesNotContain("%", over, StringComparison.Ordinal);
        Assert.Throws<ArgumentOutOfRangeException>(() => Utilization.Of(1, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => Utilization.Of(1, double.NaN));
        Assert.Throws<ArgumentOutOfRangeException>(() => Utilization.Of(-1, 1));
        Assert.Null(ModelAccounting.Mfu(2, 100, 100));   // 200 FLOP/s on a 100 FLOP/s peak
    }

    [Fact]
    public void Median_ratio_is_taken_round_by_round()
    {
        // Rounds 2/1, 4/2, 9/3 → ratios 2, 2, 3 → median 2.
        Assert.Equal(2.0, MfuMeter.MedianRatio(new[] { 2.0, 4.0, 9.0 }, new[] { 1.0, 2.0, 3.0 }));
        // A slow round that hits one step (30 vs 2) moves one ratio only: ratios 1.5, 15, 1.5, 1.5 → median 1.5,
        // where the ratio of the medians would say 4.5 / 2 = 2.25.
        Assert.Equal(1.5, MfuMeter.MedianRatio(new[] { 3.0, 30.0, 3.0, 6.0 }, new[] { 2.0, 2.0, 2.0, 4.0 }));
    }

    [Fact]
    public void Bad_arguments_are_refused()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, Small);
        Assert.Throws<ArgumentException>(() => meter.MeasureInterleaved(Array.Empty<(Action, double)>()));
        Assert.Throws<ArgumentOutOfRangeException>(() => meter.MeasureInterleaved(new (Action, double)[] { (() => { }, 1.0) }, samples: 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => meter.MeasureInterleaved(new (Action, double)[] { (() => { }, 1.0) }, warmup: -1));
        var e = Assert.Throws<ArgumentException>(() => MfuMeter.MedianRatio(new[] { 1.0, 2.0 }, new[] { 1.0 }));
        Assert.Contains("2 and 1", e.Message);
    }
}
