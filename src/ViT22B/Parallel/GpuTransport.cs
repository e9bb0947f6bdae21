using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// The device-specific operations the in-process backend (<see cref="ThreadedCommunicator"/>) and
/// <see cref="RankContext.UseDevice"/> need for CUDA tensors. <c>ViT22B.Cuda</c> implements it and registers its
/// implementation when the library loads, so that <c>Parallel</c> depends on this interface only, never on
/// <c>Cuda</c>. CPU tensors never reach it.
/// </summary>
internal interface IGpuTransport
{
    /// <summary>The CUDA ordinal of a CUDA device (an unindexed <c>cuda</c> device is libtorch's current one).</summary>
    int Ordinal(Device device);

    /// <summary>Binds the calling thread to <paramref name="device"/> until disposed, with a stream of its own as the
    /// current stream for TorchSharp ops on this thread.</summary>
    IDisposable BindThread(Device device);

    /// <summary>A stream for a receiver's transfers on <paramref name="device"/> (kept for the process).</summary>
    nint NewCommStream(int device);

    /// <summary>An event recorded on the current stream of <paramref name="copy"/>'s device after its copy was queued.</summary>
    ITransferEvent MarkReady(Tensor copy);

    /// <summary>Builds a receiver's result: <paramref name="build"/> runs on <paramref name="commStream"/> after the
    /// <paramref name="ready"/> events; the result lives on the current (compute) stream, ordered after the build; the
    /// returned event marks the end of every read of the inputs.</summary>
    (Tensor Result, ITransferEvent Done) Receive(int device, nint commStream, IEnumerable<ITransferEvent?> ready, Func<Tensor> build);
}

/// <summary>A device event of <see cref="IGpuTransport"/>: whether (or once) the work it captured has finished.</summary>
internal interface ITransferEvent : IDisposable
{
    /// <summary>Whether the captured work has finished (never blocks).</summary>
    bool IsComplete { get; }

    /// <summary>Blocks until the captured work has finished.</summary>
    void Synchronize();
}

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
