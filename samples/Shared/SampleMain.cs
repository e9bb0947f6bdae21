using System.CommandLine;
using System.Reflection;

/// <summary>
/// The samples' one way of meeting bad input: option values are validated while parsing (System.CommandLine prints
/// the error and exits with 1), and any exception from a sample's action becomes one line on standard error naming the
/// problem, with exit code 1, instead of an unhandled-exception trace. Set <c>VIT22B_TRACE=1</c> to also see the trace.
/// </summary>
internal static class SampleMain
{
    /// <summary>Parses <paramref name="args"/> and runs the chosen command's action.</summary>
    public static int Invoke(RootCommand root, string[] args)
    {
        try
        {
            return root.Parse(args).Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception e)
        {
            var inner = Unwrap(e);
            string kind = IsUserError(inner) ? "" : $"unexpected {inner.GetType().Name}: ";
            Console.Error.WriteLine($"error: {kind}{inner.Message}");
            if (Environment.GetEnvironmentVariable("VIT22B_TRACE") is "1" or "true") Console.Error.WriteLine(e);
            else if (kind.Length > 0) Console.Error.WriteLine("(set VIT22B_TRACE=1 to see where)");
            return 1;
        }
    }

    private static Exception Unwrap(Exception e)
    {
        while (e is AggregateException { InnerExceptions.Count: 1 } or TargetInvocationException or TypeInitializationException && e.InnerException is not null)
            e = e.InnerException;
        return e;
    }

    // The exceptions the library and the samples throw for bad input: arguments, files, formats, checkpoints, memory, a
    // missing native library (libtorch, NCCL), a collective a peer failed or did not join (a rendezvous failure is an
    // IOException, CUDA's and NCCL's errors are InvalidOperationExceptions).
    private static bool IsUserError(Exception e) => e is ArgumentException or FormatException or IOException or InvalidDataException or InvalidOperationException
        or NotSupportedException or UnauthorizedAccessException or KeyNotFoundException or InsufficientMemoryException or OperationCanceledException
        or ViT22B.Interop.NativeLibraryException or ViT22B.Parallel.CommunicatorException;

    /// <summary>Requires a value ≥ <paramref name="min"/>.</summary>
    public static Option<int> AtLeast(this Option<int> option, int min)
    {
        option.Validators.Add(r =>
        {
            int v = r.GetValueOrDefault<int>();
            if (v < min) r.AddError($"{option.Name} must be at least {min}, found {v}.");
        });
        return option;
    }

    /// <summary>Requires a positive, finite value.</summary>
    public static Option<double> Positive(this Option<double> option)
    {
        option.Validators.Add(r =>
        {
            double v = r.GetValueOrDefault<double>();
            if (!(v > 0) || !double.IsFinite(v)) r.AddError($"{option.Name} must be a positive number, found {v}.");
        });
        return option;
    }

    /// <summary>Requires a value in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public static Option<double> Within(this Option<double> option, double min, double max)
    {
        option.Validators.Add(r =>
        {
            double v = r.GetValueOrDefault<double>();
            if (!(v >= min && v <= max)) r.AddError($"{option.Name} must be in [{min}, {max}], found {v}.");
        });
        return option;
    }
}
