using static TorchSharp.torch;

namespace ViT22B.Accounting;

/// <summary>A snapshot of the process's memory: resident set size and TorchSharp's live tensor count.</summary>
/// <param name="ResidentBytes">Resident set size (RSS) of the process.</param>
/// <param name="LiveTensors">TorchSharp tensor handles not yet disposed or finalized.</param>
public readonly record struct ProcessMemory(long ResidentBytes, long LiveTensors)
{
    /// <summary>Takes a snapshot (after a full GC, so finalizable garbage does not count as live).</summary>
    public static ProcessMemory Sample()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        return new ProcessMemory(ReadRss(), Tensor.TotalCount);
    }

    /// <summary>The peak resident set size since the process started or since <see cref="ResetPeak"/> (Linux
    /// <c>VmHWM</c>); null where the system does not report it.</summary>
    public static long? PeakResidentBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return long.Parse(line.AsSpan(6).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture) * 1024;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
        }
        return null;
    }

    /// <summary>Starts a new peak: <see cref="PeakResidentBytes"/> then counts from the current resident size (Linux:
    /// writes 5 to <c>/proc/self/clear_refs</c>). False where that is not possible.</summary>
    public static bool ResetPeak()
    {
        try
        {
            File.WriteAllText("/proc/self/clear_refs", "5");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static long ReadRss()
    {
        // /proc/self/statm: size resident shared … in pages. Fall back to .NET's working set elsewhere.
        try
        {
            var fields = File.ReadAllText("/proc/self/statm").Split(' ');
            return long.Parse(fields[1], System.Globalization.CultureInfo.InvariantCulture) * Environment.SystemPageSize;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException or IndexOutOfRangeException)
        {
            return Environment.WorkingSet;
        }
    }
}
