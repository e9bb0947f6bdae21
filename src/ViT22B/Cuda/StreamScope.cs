namespace ViT22B.Cuda;

/// <summary>
/// Makes <see cref="Stream"/> the current stream of its device for TorchSharp ops on the calling thread until
/// disposed (libtorch's <c>CUDAStreamGuard</c>). Create and dispose it on the same thread; the current stream is
/// thread-local per device.
/// </summary>
internal sealed unsafe class StreamScope : IDisposable
{
    private nint _guard;
    private readonly int _thread = Environment.CurrentManagedThreadId;

    /// <summary>Makes <paramref name="stream"/> current on <paramref name="device"/>.</summary>
    public StreamScope(nint stream, int device)
    {
        (Stream, Device) = (stream, device);
        nint g;
        CudaStreams.Check(CudaStreams.F.CreateStreamGuard(stream, device, &g), "aoti_torch_create_cuda_stream_guard", device);
        _guard = g;
    }

    /// <summary>The stream made current.</summary>
    public nint Stream { get; }
    /// <summary>The device.</summary>
    public int Device { get; }

    /// <summary>Restores the previous current stream.</summary>
    public void Dispose()
    {
        if (_guard == 0) return;
        if (Environment.CurrentManagedThreadId != _thread)
            throw new InvalidOperationException("A StreamScope must be disposed on the thread that created it (the current stream is thread-local).");
        CudaStreams.Check(CudaStreams.F.DeleteStreamGuard(_guard), "aoti_torch_delete_cuda_stream_guard", Device);
        _guard = 0;
    }
}
