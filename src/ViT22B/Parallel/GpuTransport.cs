namespace ViT22B.Parallel;

/// <summary>Where <c>Parallel</c> finds the registered <see cref="IGpuTransport"/>.</summary>
internal static class GpuTransport
{
    private static IGpuTransport? _current;

    /// <summary>The registered transport.</summary>
    /// <exception cref="NotSupportedException">None registered (only possible if the registering module initializer
    /// was removed).</exception>
    public static IGpuTransport Current => Volatile.Read(ref _current)
        ?? throw new NotSupportedException("No GPU transport is registered, so CUDA tensors cannot be moved between in-process ranks.");

    /// <summary>Registers the implementation (called once, by <c>ViT22B.Cuda</c> when the library loads).</summary>
    public static void Register(IGpuTransport transport) => Volatile.Write(ref _current, transport);
}
