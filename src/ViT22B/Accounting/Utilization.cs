using System.Globalization;

namespace ViT22B.Accounting;

/// <summary>
/// The one definition of a utilization figure (MFU, HFU) that everything printing one uses: achieved FLOP/s over a
/// peak FLOP/s that is a ceiling, either a datasheet figure or the best of repeated same-dtype GEMM timings
/// (<see cref="MfuMeter"/>). An achieved rate above the peak means the peak is not a ceiling (a GEMM timing on a busy
/// machine, or a library GEMM slower than the processor allows), so no figure above 100 % is ever produced: the
/// report says so instead. docs/performance.md describes the method.
/// </summary>
public static class Utilization
{
    /// <summary><paramref name="achievedFlopsPerSecond"/> / <paramref name="peakFlopsPerSecond"/>, or null when the
    /// achieved rate exceeds the peak.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A peak that is not positive, or an achieved rate that is negative.</exception>
    public static double? Of(double achievedFlopsPerSecond, double peakFlopsPerSecond)
    {
        if (!(peakFlopsPerSecond > 0) || !double.IsFinite(peakFlopsPerSecond))
            throw new ArgumentOutOfRangeException(nameof(peakFlopsPerSecond), $"The peak FLOP/s must be positive and finite, found {peakFlopsPerSecond}.");
        if (!(achievedFlopsPerSecond >= 0))
            throw new ArgumentOutOfRangeException(nameof(achievedFlopsPerSecond), $"The achieved FLOP/s must not be negative, found {achievedFlopsPerSecond}.");
        return achievedFlopsPerSecond > peakFlopsPerSecond ? null : achievedFlopsPerSecond / peakFlopsPerSecond;
    }

    /// <summary>The figure as printed: "43.1 %", or "n/a (achieved … exceeds the peak …)" when the peak is not a ceiling.</summary>
    public static string Format(double achievedFlopsPerSecond, double peakFlopsPerSecond) =>
        Of(achievedFlopsPerSecond, peakFlopsPerSecond) is { } u
            ? u.ToString("P1", CultureInfo.InvariantCulture)
            : string.Create(CultureInfo.InvariantCulture, $"n/a (achieved {achievedFlopsPerSecond / 1e12:G4} TFLOP/s exceeds the peak {peakFlopsPerSecond / 1e12:G4} TFLOP/s, which is then no ceiling)");
}
