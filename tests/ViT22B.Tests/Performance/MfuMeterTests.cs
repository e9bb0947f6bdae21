using TorchSharp;
using ViT22B.Accounting;
using static TorchSharp.torch;

namespace ViT22B.Tests.Performance;

/// <summary>The mechanics of the same-run MFU measurement (not speed: the timings themselves live in the benchmarks).</summary>
public class MfuMeterTests
{
    [Fact]
    public void Interleaved_steps_run_in_rounds_and_keep_their_round_times()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, gemmSize: 32);
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
        Assert.Equal(results[0].PeakSeconds, results[1].PeakSeconds);             // one peak: the median of all the run's GEMMs
        Assert.Equal(2.0 * 32 * 32 * 32, results[0].PeakGemmFlops);
        Assert.Equal(results[1].StepFlops / results[1].StepSeconds / (results[1].PeakGemmFlops / results[1].PeakSeconds), results[1].Mfu, 12);
    }

    [Fact]
    public void Single_measurement_is_the_one_step_case()
    {
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, gemmSize: 32);
        int calls = 0;
        var m = meter.Measure(() => calls++, 10.0, samples: 4, warmup: 1);
        Assert.Equal(5, calls);
        Assert.Equal(4, m.Samples);
        Assert.Equal(4, m.StepSamples.Count);
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
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32, gemmSize: 32);
        Assert.Throws<ArgumentException>(() => meter.MeasureInterleaved(Array.Empty<(Action, double)>()));
        Assert.Throws<ArgumentOutOfRangeException>(() => meter.MeasureInterleaved(new (Action, double)[] { (() => { }, 1.0) }, samples: 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => meter.MeasureInterleaved(new (Action, double)[] { (() => { }, 1.0) }, warmup: -1));
        var e = Assert.Throws<ArgumentException>(() => MfuMeter.MedianRatio(new[] { 1.0, 2.0 }, new[] { 1.0 }));
        Assert.Contains("2 and 1", e.Message);
    }
}
