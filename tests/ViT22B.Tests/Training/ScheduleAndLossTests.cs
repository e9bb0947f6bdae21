using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Training;
using static TorchSharp.torch;

namespace ViT22B.Tests.Training;

public sealed class ScheduleAndLossTests
{
    [Fact]
    public void Rsqrt_schedule_with_warmup_and_cooldown_matches_big_vision()
    {
        var s = new LearningRateSchedule { PeakLr = 1e-3, TotalSteps = 1000, Decay = DecayKind.Rsqrt, WarmupSteps = 100, CooldownSteps = 200, Timescale = 50 }.Validate();
        Assert.Equal(0, s.At(0));
        Assert.Equal(0.5e-3, s.At(50), 15);                                   // warmup: 1e-3 · 50/100
        Assert.Equal(1e-3, s.At(100), 15);                                    // peak (rsqrt starts after the warmup)
        Assert.Equal(1e-3 / Math.Sqrt((300 + 50 - 100) / 50.0), s.At(300), 15);
        Assert.Equal(1e-3 / Math.Sqrt((900 + 50 - 100) / 50.0) * (100 / 200.0), s.At(900), 15);   // cooldown halfway
        Assert.Equal(0, s.At(1000), 15);
    }

    [Fact]
    public void Cosine_and_linear_schedules()
    {
        var c = new LearningRateSchedule { PeakLr = 2.0, TotalSteps = 110, Decay = DecayKind.Cosine, WarmupSteps = 10, MinLr = 0.5 }.Validate();
        Assert.Equal(1.0, c.At(5), 15);
        Assert.Equal(2.0, c.At(10), 15);
        Assert.Equal(0.5 + 1.5 * 0.5 * (1 + Math.Cos(Math.PI * 0.25)), c.At(35), 15);
        Assert.Equal(0.5, c.At(110), 15);
        var l = new LearningRateSchedule { PeakLr = 1.0, TotalSteps = 100, Decay = DecayKind.Linear }.Validate();
        Assert.Equal(0.75, l.At(25), 15);
        Assert.Equal(0.3, new LearningRateSchedule { PeakLr = 0.3, TotalSteps = 10, Decay = DecayKind.Constant }.At(7));
        Assert.Throws<ArgumentOutOfRangeException>(() => new LearningRateSchedule { PeakLr = 1, TotalSteps = 10, WarmupSteps = 11 }.Validate());
        Assert.Throws<ArgumentOutOfRangeException>(() => new LearningRateSchedule { PeakLr = -1, TotalSteps = 10 }.Validate());
    }

    [Theory]
    [InlineData(DecayKind.Cosine)]
    [InlineData(DecayKind.Linear)]
    [InlineData(DecayKind.Rsqrt)]
    public void A_run_that_is_all_warmup_ramps_to_the_peak(DecayKind decay)
    {
        // No step is past the warmup, so no decay applies (big_vision's progress clip((s − W)/(T − W), 0, 1) is 0 for s ≤ W).
        // Rsqrt never used the progress: it is the control, which passed before the fix too.
        var s = new LearningRateSchedule { PeakLr = 1.0, TotalSteps = 10, WarmupSteps = 10, Decay = decay }.Validate();
        Assert.Equal(0.5, s.At(5), 15);
        Assert.Equal(0.9, s.At(9), 15);
        Assert.Equal(1.0, s.At(10), 15);
    }

    [Fact]
    public void Softmax_and_sigmoid_cross_entropy_match_their_formulas()
    {
        double[] z = { 1.0, -0.5, 2.0, 0.3, 0.0, -1.0 };
        long[] y = { 2, 0 };
        using var scope = torch.NewDisposeScope();
        using var logits = torch.tensor(z, dtype: ScalarType.Float64).reshape(2, 3);
        using var labels = torch.tensor(y);
        double softmax = 0, sigmoid = 0, smooth = 0, s = 0.1;
        for (int r = 0; r < 2; r++)
        {
            var row = z.Skip(3 * r).Take(3).ToArray();
            double lse = Math.Log(row.Sum(Math.Exp));
            softmax += lse - row[y[r]];
            smooth += (1 - s) * (lse - row[y[r]]) + s / 3 * row.Sum(v => lse - v);
            for (int c = 0; c < 3; c++)
            {
                double t = c == y[r] ? 1 : 0, p = 1 / (1 + Math.Exp(-row[c]));
                sigmoid += -(t * Math.Log(p) + (1 - t) * Math.Log(1 - p));
            }
        }
        Assert.Equal(softmax / 2, Losses.Compute(logits, labels, LossKind.Softmax).item<double>(), 12);
        Assert.Equal(smooth / 2, Losses.Compute(logits, labels, LossKind.Softmax, 0.1).item<double>(), 12);
        Assert.Equal(sigmoid / 2, Losses.Compute(logits, labels, LossKind.Sigmoid).item<double>(), 12);
        using var bf = logits.to(ScalarType.BFloat16);
        Assert.Equal(ScalarType.Float32, Losses.Compute(bf, labels, LossKind.Softmax).dtype);   // loss in float32
        Assert.Equal(new long[] { 1, 2 }, Losses.TopKCorrect(logits, torch.tensor(new long[] { 2, 1 }), 1, 2));
    }

    [Fact]
    public void Clipping_scales_gradients_to_the_global_norm()
    {
        using var a = new Parameter(torch.zeros(2, dtype: ScalarType.Float64));
        using var b = new Parameter(torch.zeros(1, dtype: ScalarType.Float64));
        using var scope = torch.NewDisposeScope();
        a.grad = torch.tensor(new[] { 3.0, 0.0 });
        b.grad = torch.tensor(new[] { 4.0 });
        Assert.Equal(5.0, Losses.ClipGradNorm(new Tensor[] { a, b }, 1.0), 12);
        double coef = 1.0 / (5.0 + 1e-6);
        Assert.Equal(3 * coef, a.grad!.data<double>()[0], 12);
        Assert.Equal(4 * coef, b.grad!.data<double>()[0], 12);
        Assert.Equal(1.0, Losses.ClipGradNorm(new Tensor[] { a, b }, 10.0), 5);          // under the cap: unchanged
        Assert.Equal(3 * coef, a.grad!.data<double>()[0], 12);
    }
}
