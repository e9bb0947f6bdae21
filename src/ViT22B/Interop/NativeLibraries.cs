using System.Runtime.InteropServices;

namespace ViT22B.Interop;

/// <summary>A native library or one of its symbols could not be found; the message names which.</summary>
public sealed class NativeLibraryException : DllNotFoundException
{
    /// <summary>Creates the exception.</summary>
    public NativeLibraryException(string message, Exception? inner = null) : base(message, inner) { }
}

/// <summary>
/// A native library resolved at run time, on first use only (so nothing CUDA-related loads on a CPU-only machine
/// until a GPU feature is asked for): the first candidate that <see cref="NativeLibrary.TryLoad(string, out nint)"/>
/// opens wins; symbols come from <see cref="NativeLibrary.TryGetExport"/>.
/// </summary>
internal sealed class LazyNativeLibrary
{
    private readonly Lazy<nint> _handle;

    /// <summary>Describes the library: a display name (<c>libnccl.so.2</c>), the file names or paths to try in order,
    /// and a hint printed when none loads (how to install it, which environment variable points at it).</summary>
    public LazyNativeLibrary(string name, IReadOnlyList<string> candidates, string hint)
    {
        Name = name ?? throw new ArgumentNullException(nameof(name));
        ArgumentNullException.ThrowIfNull(candidates);
        Candidates = candidates;
        _handle = new Lazy<nint>(() =>
        {
            foreach (var c in candidates)
                if (NativeLibrary.TryLoad(c, out var h)) return h;
            throw new NativeLibraryException($"Native library {name} could not be loaded (tried {string.Join(", ", candidates.Select(c => $"'{c}'"))}). {hint}");
        }, LazyThreadSafetyMode.ExecutionAndPublication);
    }

    /// <summary>The library's display name.</summary>
    public string Name { get; }

    /// <summary>The names or paths tried, in order.</summary>
    public IReadOnlyList<string> Candidates { get; }

    /// <summary>Whether the library has been loaded by this object.</summary>
    public bool IsLoaded => _handle.IsValueCreated;

    /// <summary>The library handle, loading it on first use.</summary>
    /// <exception cref="NativeLibraryException">No candidate could be loaded.</exception>
    public nint Handle => _handle.Value;

    /// <summary>The address of <paramref name="symbol"/>.</summary>
    /// <exception cref="NativeLibraryException">The library or the symbol is missing (both named; an old library
    /// version is the usual cause).</exception>
    public nint GetExport(string symbol)
    {
        if (NativeLibrary.TryGetExport(Handle, symbol, out var address)) return address;
        throw new NativeLibraryException($"Native library {Name} has no symbol '{symbol}'; the installed version is probably too old.");
    }
}
