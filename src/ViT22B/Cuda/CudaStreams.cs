using TorchSharp;
using ViT22B.Interop;

namespace ViT22B.Cuda;

/// <summary>
/// CUDA streams through the C functions libtorch 2.10 exports from <c>libtorch_cuda.so</c>: the current stream, the
/// stream guard behind <see cref="StreamScope"/> (both from libtorch's AOTI shim), and streams from c10's pool
/// (non-blocking, handed out round-robin, so not exclusive; <c>torch_get_cuda_stream_from_pool</c> of the stable C
/// shim, marked as new in 2.10). If a libtorch build lacks the pool function, <see cref="FromPool"/> falls back to a
/// non-blocking stream created by the driver; which one is used is decided once, at run time
/// (<see cref="UsesLibtorchPool"/>). The library is resolved only after TorchSharp has loaded libtorch, so the name
/// finds the copy TorchSharp loaded rather than whatever else is on the search path; a CPU build of libtorch fails
/// with a message naming the library.
/// </summary>
internal static unsafe class CudaStreams
{
    /// <summary>libtorch's CUDA library (loaded on first use).</summary>
    public static readonly LazyNativeLibrary Library = new("libtorch_cuda.so",
        new[] { "libtorch_cuda.so", Path.Combine(AppContext.BaseDirectory, "libtorch_cuda.so"), Path.Combine(AppContext.BaseDirectory, "cuda-12.8", "libtorch_cuda.so") },
        "CUDA streams need a CUDA build of libtorch 2.10 (the libtorch-cuda-12.8-linux-x64 packages), not libtorch-cpu.");

    private static readonly Lazy<Functions> Api = new(() =>
    {
        // TorchSharp's static constructor loads libtorch (and tries its CUDA part) the first time torch is touched.
        _ = torch.CPU;
        return new Functions(Library);
    }, LazyThreadSafetyMode.ExecutionAndPublication);

    internal static Functions F => Api.Value;

    /// <summary>Whether streams come from libtorch's pool (true) or from the driver (the fallback).</summary>
    public static bool UsesLibtorchPool => F.GetStreamFromPool != null;

    /// <summary>A non-blocking stream for <paramref name="device"/> (NCCL and copies on it do not serialize with the
    /// legacy default stream): from libtorch's pool where it is exported, else created by the driver.</summary>
    public static nint FromPool(int device, bool highPriority = false)
    {
        if (!UsesLibtorchPool)
        {
            nint created = CudaDriver.CreateNonBlockingStream(device, highPriority);
            DriverCreated.TryAdd(created, device);
            return created;
        }
        nint s;
        Check(F.GetStreamFromPool(highPriority ? (byte)1 : (byte)0, device, &s), "torch_get_cuda_stream_from_pool", device);
        return s;
    }

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<nint, int> DriverCreated = new();

    /// <summary>Gives back a stream from <see cref="FromPool"/>: a driver-created one is destroyed (the driver lets
    /// queued work finish first); one of libtorch's pool stays with libtorch.</summary>
    public static void Release(nint stream)
    {
        if (DriverCreated.TryRemove(stream, out int device)) CudaDriver.DestroyStream(device, stream);
    }

    /// <summary>The stream TorchSharp ops on <paramref name="device"/> currently go to on this thread.</summary>
    public static nint Current(int device)
    {
        nint s;
        Check(F.GetCurrentStream(device, &s), "aoti_torch_get_current_cuda_stream", device);
        return s;
    }

    internal static void Check(int error, string operation, int device)
    {
        if (error != 0) throw new InvalidOperationException($"{operation} failed for cuda:{device} (AOTI error {error}); libtorch's last error message is in torch's log.");
    }

    internal sealed class Functions
    {
        public readonly delegate* unmanaged<byte, int, nint*, int> GetStreamFromPool;   // null where not exported
        public readonly delegate* unmanaged<int, nint*, int> GetCurrentStream;
        public readonly delegate* unmanaged<nint, int, nint*, int> CreateStreamGuard;
        public readonly delegate* unmanaged<nint, int> DeleteStreamGuard;

        public Functions(LazyNativeLibrary lib)
        {
            if (System.Runtime.InteropServices.NativeLibrary.TryGetExport(lib.Handle, "torch_get_cuda_stream_from_pool", out var pool))
                GetStreamFromPool = (delegate* unmanaged<byte, int, nint*, int>)pool;
            GetCurrentStream = (delegate* unmanaged<int, nint*, int>)lib.GetExport("aoti_torch_get_current_cuda_stream");
            CreateStreamGuard = (delegate* unmanaged<nint, int, nint*, int>)lib.GetExport("aoti_torch_create_cuda_stream_guard");
            DeleteStreamGuard = (delegate* unmanaged<nint, int>)lib.GetExport("aoti_torch_delete_cuda_stream_guard");
        }
    }
}
