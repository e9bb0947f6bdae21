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
