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
            // An aggregate's Message repeats every inner message; the first rank's failure (in failure order) says it.
            string message = inner is AggregateException { InnerExceptions: [var first, ..] } all ? $"{all.InnerExceptions.Count} ranks failed; first: {first.Message}" : inner.Message;
            Console.Error.WriteLine($"error: {kind}{message}");
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
    // IOException, the library's CUDA and NCCL errors are InvalidOperationExceptions); and ranks of an SPMD run
    // (Spmd.Run: an AggregateException of RankFailedExceptions) that each failed for one of these reasons.
    private static bool IsUserError(Exception e) => e switch
    {
        AggregateException a => a.InnerExceptions.Count > 0 && a.InnerExceptions.All(IsUserError),
        ViT22B.Parallel.RankFailedException { InnerException: { } cause } => IsUserError(Unwrap(cause)),
        _ => e is ArgumentException or FormatException or IOException or InvalidDataException or InvalidOperationException
            or NotSupportedException or UnauthorizedAccessException or KeyNotFoundException or InsufficientMemoryException or OperationCanceledException
            or ViT22B.Interop.NativeLibraryException or ViT22B.Parallel.CommunicatorException,
    };

    /// <summary>The samples' <c>--device</c>: cpu, or cuda[:N] (checked while parsing; <see cref="Device"/> checks
    /// that TorchSharp sees the GPU).</summary>
    public static Option<string> DeviceOption() => new Option<string>("--device") { Description = "cpu or cuda[:N].", DefaultValueFactory = _ => "cpu" }.Validated();

    private static Option<string> Validated(this Option<string> option)
    {
        option.Validators.Add(r =>
        {
            string v = r.GetValueOrDefault<string>() ?? "";
            if (!System.Text.RegularExpressions.Regex.IsMatch(v, @"^(cpu|cuda(:\d{1,3})?)$"))
                r.AddError($"{option.Name} must be cpu, cuda or cuda:N, found '{v}'.");
        });
        return option;
    }

    /// <summary>The device a validated <c>--device</c> names, once TorchSharp is known to see it.</summary>
    public static TorchSharp.torch.Device Device(string value)
    {
        if (value == "cpu") return TorchSharp.torch.CPU;
        if (!TorchSharp.torch.cuda.is_available())
            throw new ArgumentException($"--device {value}: TorchSharp sees no CUDA device (a CUDA build of libtorch 2.10 and an NVIDIA driver are needed; docs/gpu.md).");
        int index = value.Length > 5 ? int.Parse(value[5..], System.Globalization.CultureInfo.InvariantCulture) : 0;
        int count = (int)TorchSharp.torch.cuda.device_count();
        if (index >= count) throw new ArgumentException($"--device {value}: TorchSharp sees {count} CUDA device(s), numbered from 0.");
        return TorchSharp.torch.device($"cuda:{index}");
    }

    /// <summary>Checks, before any work, that <paramref name="file"/> (the value of <paramref name="option"/>, if given)
    /// can be written: its folder exists, and it is none of <paramref name="inputs"/> (which the run reads).</summary>
    public static void CheckOutput(FileInfo? file, string option, params string?[] inputs)
    {
        if (file is null) return;
        if (file.Directory is { Exists: false } folder)
            throw new DirectoryNotFoundException($"{option} {file.FullName}: the folder '{folder.FullName}' does not exist.");
        foreach (var input in inputs)
            if (input is not null && string.Equals(Path.GetFullPath(input), file.FullName, StringComparison.Ordinal))
                throw new ArgumentException($"{option} {file.FullName} is also an input of this run; write to another file.");
    }

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
