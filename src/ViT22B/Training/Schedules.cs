using System.Globalization;

namespace ViT22B.Training;

/// <summary>A learning rate as a function of the (0-based) step.</summary>
public interface ILearningRateSchedule
{
    /// <summary>The learning rate of update number <paramref name="step"/>.</summary>
    double At(long step);

    /// <summary>Kind and parameters, as written into checkpoints.</summary>
    string Describe();
}

/// <summary>Decay after the warmup.</summary>
public enum DecayKind
{
    /// <summary>Constant.</summary>
    Constant,
    /// <summary>Reciprocal square root with a timescale (ViT-22B, big_vision <c>rsqrt</c>).</summary>
    Rsqrt,
    /// <summary>Half cosine from the peak to <see cref="LearningRateSchedule.MinLr"/> over the steps after the warmup.</summary>
    Cosine,
    /// <summary>Linear from the peak to <see cref="LearningRateSchedule.MinLr"/>.</summary>
    Linear,
}

/// <summary>
/// big_vision's <c>create_learning_rate_schedule</c>, which the ViT-22B family trains with: a decay of the peak
/// <see cref="PeakLr"/>, multiplied by a linear warmup min(1, step / warmup) and a linear cooldown
/// min(1, (total − step) / cooldown). For <see cref="DecayKind.Rsqrt"/>:
/// lr = peak / √((step + timescale − warmup) / timescale) once step &gt; warmup (docs/model.md#learning-rate-schedule: ViT-g uses warmup
/// 10k, timescale 10k, cooldown 50k). For cosine and linear the progress p = clip((step − warmup) / (total − warmup), 0, 1).
/// </summary>
public sealed record LearningRateSchedule : ILearningRateSchedule
{
    /// <summary>Peak learning rate.</summary>
    public required double PeakLr { get; init; }
    /// <summary>Total steps of the run (the cosine/linear horizon and the cooldown's end).</summary>
    public required long TotalSteps { get; init; }
    /// <summary>Decay kind.</summary>
    public DecayKind Decay { get; init; } = DecayKind.Rsqrt;
    /// <summary>Linear warmup steps from 0.</summary>
    public long WarmupSteps { get; init; }
    /// <summary>Linear cooldown steps to 0 at the end of the run.</summary>
    public long CooldownSteps { get; init; }
    /// <summary>Timescale of the rsqrt decay.</summary>
    public long Timescale { get; init; } = 10_000;
    /// <summary>End value of the cosine and linear decays.</summary>
    public double MinLr { get; init; }

    /// <summary>Checks the values; returns this.</summary>
    public LearningRateSchedule Validate()
    {
        if (!(PeakLr >= 0) || !double.IsFinite(PeakLr)) throw new ArgumentOutOfRangeException(nameof(PeakLr), $"PeakLr must be finite and ≥ 0, found {PeakLr}.");
        if (TotalSteps <= 0) throw new ArgumentOutOfRangeException(nameof(TotalSteps), $"TotalSteps must be positive, found {TotalSteps}.");
        if (WarmupSteps < 0 || WarmupSteps > TotalSteps) throw new ArgumentOutOfRangeException(nameof(WarmupSteps), $"WarmupSteps must be in [0, TotalSteps = {TotalSteps}], found {WarmupSteps}.");
        if (CooldownSteps < 0 || CooldownSteps > TotalSteps) throw new ArgumentOutOfRangeException(nameof(CooldownSteps), $"CooldownSteps must be in [0, TotalSteps = {TotalSteps}], found {CooldownSteps}.");
        if (Timescale <= 0) throw new ArgumentOutOfRangeException(nameof(Timescale), $"Timescale must be positive, found {Timescale}.");
        if (MinLr < 0 || MinLr > PeakLr) throw new ArgumentOutOfRangeException(nameof(MinLr), $"MinLr must be in [0, PeakLr], found {MinLr}.");
        return this;
    }

    /// <inheritdoc />
    public double At(long step)
    {
        double lr = PeakLr, s = step;
        // A run that is all warmup never reaches the decay (progress 0 throughout, as the clip gives every step ≤ W).
        double progress = TotalSteps == WarmupSteps ? 0 : Math.Clamp((s - WarmupSteps) / (TotalSteps - WarmupSteps), 0, 1);
        switch (Decay)
        {
            case DecayKind.Rsqrt:
                if (step > WarmupSteps) lr /= Math.Sqrt((s + Timescale - WarmupSteps) / Timescale);
                break;
            case DecayKind.Cosine:
                lr = MinLr + (PeakLr - MinLr) * 0.5 * (1 + Math.Cos(Math.PI * progress));
                break;
            case DecayKind.Linear:
                lr = MinLr + (PeakLr - MinLr) * (1 - progress);
                break;
        }
        if (WarmupSteps > 0) lr *= Math.Min(1, s / WarmupSteps);
        if (CooldownSteps > 0) lr *= Math.Min(1, (TotalSteps - s) / CooldownSteps);
        return Math.Max(0, lr);
    }

    /// <inheritdoc />
    public string Describe() => string.Create(CultureInfo.InvariantCulture,
        $"{Decay.ToString().ToLowerInvariant()}(peak={PeakLr:R}, total={TotalSteps}, warmup={WarmupSteps}, cooldown={CooldownSteps}, timescale={Timescale}, min={MinLr:R})");
}
