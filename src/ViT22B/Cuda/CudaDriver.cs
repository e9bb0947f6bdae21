using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using ViT22B.Interop;

namespace ViT22B.Cuda;

/// <summary>
/// The CUDA driver API (<c>libcuda.so.1</c>, installed with the NVIDIA driver) for what TorchSharp lacks: events
/// and the per-thread current context. Loaded on first use only; every symbol is resolved by name when the function
/// table is built, so an old driver fails with the missing symbol's name. The driver API avoids loading a second
/// CUDA runtime next to libtorch's hash-renamed one (docs/torchsharp-notes.md#the-cuda-runtime-next-to-libtorch).
/// </summary>
internal static unsafe class CudaDriver
{
    /// <summary>The driver library (loaded on first use).</summary>
    public static readonly LazyNativeLibrary Library = new("libcuda.so.1", new[] { "libcuda.so.1", "libcuda.so" },
        "It is installed with the NVIDIA driver; CUDA features need an NVIDIA GPU and its driver.");

    private static readonly Lazy<Functions> Api = new(() =>
    {
        var f = new Functions(Library);
        Check(f.Init(0), "cuInit");
        return f;
    }, LazyThreadSafetyMode.ExecutionAndPublication);

    private static readonly ConcurrentDictionary<int, nint> PrimaryContexts = new();

    internal static Functions F => Api.Value;

    /// <summary>Throws <see cref="CudaException"/> with the driver's error text unless <paramref name="result"/> is success.</summary>
    public static void Check(CudaResult result, string operation)
    {
        if (result == CudaResult.Success) return;
        string detail = "";
        if (Api.IsValueCreated)
        {
            nint s;
            if (Api.Value.GetErrorString(result, &s) == CudaResult.Success) detail = Marshal.PtrToStringUTF8(s) ?? "";
        }
        throw new CudaException(operation, result, detail);
    }

    /// <summary>The CUDA ordinal of a device. A device without an index (<c>"cuda"</c>) means libtorch's current
    /// device, which libtorch resolves when it allocates there; that is asked here, not assumed to be 0.</summary>
    internal static int Ordinal(TorchSharp.torch.Device device)
    {
        if (device.type != TorchSharp.DeviceType.CUDA) throw new ArgumentException($"{device} is not a CUDA device.", nameof(device));
        if (device.index >= 0) return device.index;
        using var probe = TorchSharp.torch.empty(0, device: device);
        return probe.device.index;
    }

    /// <summary>Makes device <paramref name="device"/>'s primary context (the one libtorch uses) current on the calling
    /// thread and leaves it there: a rank's thread binds itself to its GPU this way before NCCL's initialization, which
    /// reads the current device. Code that only needs the context for one call uses <see cref="Use"/> instead.</summary>
    public static void MakeCurrent(int device) => Check(F.CtxSetCurrent(PrimaryContext(device)), "cuCtxSetCurrent");

    /// <summary>Pushes device <paramref name="device"/>'s primary context onto the calling thread's context stack until
    /// the returned scope is disposed, which pops it and so restores whatever context the thread had.</summary>
    internal static ContextScope Use(int device)
    {
        Check(F.CtxPushCurrent(PrimaryContext(device)), "cuCtxPushCurrent");
        return new ContextScope();
    }

    /// <summary>The calling thread's current context (0 = none).</summary>
    internal static nint CurrentContext()
    {
        nint c;
        Check(F.CtxGetCurrent(&c), "cuCtxGetCurrent");
        return c;
    }

    /// <summary>Pops the context <see cref="Use"/> pushed.</summary>
    internal readonly struct ContextScope : IDisposable
    {
        public void Dispose()
        {
            nint popped;
            Check(F.CtxPopCurrent(&popped), "cuCtxPopCurrent");
        }
    }

    private static nint PrimaryContext(int device)
    {
        if (device < 0) throw new ArgumentOutOfRangeException(nameof(device), $"device must be ≥ 0, found {device}.");
        return PrimaryContexts.GetOrAdd(device, d =>
        {
            int handle;
            Check(F.DeviceGet(&handle, d), "cuDeviceGet");
            nint c;
            Check(F.DevicePrimaryCtxRetain(&c, handle), "cuDevicePrimaryCtxRetain");
            return c;
        });
    }

    /// <summary>A stream created by the driver with <c>CU_STREAM_NON_BLOCKING</c> (it does not synchronize with the
    /// legacy default stream), at the device's highest or default priority. Used where libtorch's stream pool is not
    /// exported; <see cref="DestroyStream"/> gives it back.</summary>
    internal static nint CreateNonBlockingStream(int device, bool highPriority)
    {
        using var _ = Use(device);
        int least, greatest;
        Check(F.CtxGetStreamPriorityRange(&least, &greatest), "cuCtxGetStreamPriorityRange");
        nint stream;
        Check(F.StreamCreateWithPriority(&stream, NonBlockingStream, highPriority ? greatest : least), "cuStreamCreateWithPriority");
        return stream;
    }

    private const uint NonBlockingStream = 1;   // CU_STREAM_NON_BLOCKING

    /// <summary>Destroys a stream <see cref="CreateNonBlockingStream"/> made (work already queued still completes).</summary>
    internal static void DestroyStream(int device, nint stream)
    {
        using var _ = Use(device);
        Check(F.StreamDestroy(stream), "cuStreamDestroy");
    }

    internal sealed class Functions
    {
        public readonly delegate* unmanaged<uint, CudaResult> Init;
        public readonly delegate* unmanaged<int*, int, CudaResult> DeviceGet;
        public readonly delegate* unmanaged<nint*, int, CudaResult> DevicePrimaryCtxRetain;
        public readonly delegate* unmanaged<nint, CudaResult> CtxSetCurrent;
        public readonly delegate* unmanaged<nint*, CudaResult> CtxGetCurrent;
        public readonly delegate* unmanaged<nint, CudaResult> CtxPushCurrent;
        public readonly delegate* unmanaged<nint*, CudaResult> CtxPopCurrent;
        public readonly delegate* unmanaged<int*, int*, CudaResult> CtxGetStreamPriorityRange;
        public readonly delegate* unmanaged<nint*, uint, int, CudaResult> StreamCreateWithPriority;
        public readonly delegate* unmanaged<nint, CudaResult> StreamDestroy;
        public readonly delegate* unmanaged<nint*, uint, CudaResult> EventCreate;
        public readonly delegate* unmanaged<nint, nint, CudaResult> EventRecord;
        public readonly delegate* unmanaged<nint, CudaResult> EventQuery;
        public readonly delegate* unmanaged<nint, CudaResult> EventSynchronize;
        public readonly delegate* unmanaged<nint, CudaResult> EventDestroy;
        public readonly delegate* unmanaged<nint, nint, uint, CudaResult> StreamWaitEvent;
        public readonly delegate* unmanaged<CudaResult, nint*, CudaResult> GetErrorString;

        public Functions(LazyNativeLibrary lib)
        {
            Init = (delegate* unmanaged<uint, CudaResult>)lib.GetExport("cuInit");
            DeviceGet = (delegate* unmanaged<int*, int, CudaResult>)lib.GetExport("cuDeviceGet");
            DevicePrimaryCtxRetain = (delegate* unmanaged<nint*, int, CudaResult>)lib.GetExport("cuDevicePrimaryCtxRetain");
            CtxSetCurrent = (delegate* unmanaged<nint, CudaResult>)lib.GetExport("cuCtxSetCurrent");
            CtxGetCurrent = (delegate* unmanaged<nint*, CudaResult>)lib.GetExport("cuCtxGetCurrent");
            CtxPushCurrent = (delegate* unmanaged<nint, CudaResult>)lib.GetExport("cuCtxPushCurrent_v2");
            CtxPopCurrent = (delegate* unmanaged<nint*, CudaResult>)lib.GetExport("cuCtxPopCurrent_v2");
            CtxGetStreamPriorityRange = (delegate* unmanaged<int*, int*, CudaResult>)lib.GetExport("cuCtxGetStreamPriorityRange");
            StreamCreateWithPriority = (delegate* unmanaged<nint*, uint, int, CudaResult>)lib.GetExport("cuStreamCreateWithPriority");
            StreamDestroy = (delegate* unmanaged<nint, CudaResult>)lib.GetExport("cuStreamDestroy_v2");
            EventCreate = (delegate* unmanaged<nint*, uint, CudaResult>)lib.GetExport("cuEventCreate");
            EventRecord = (delegate* unmanaged<nint, nint, CudaResult>)lib.GetExport("cuEventRecord");
            EventQuery = (delegate* unmanaged<nint, CudaResult>)lib.GetExport("cuEventQuery");
            EventSynchronize = (delegate* unmanaged<nint, CudaResult>)lib.GetExport("cuEventSynchronize");
            EventDestroy = (delegate* unmanaged<nint, CudaResult>)lib.GetExport("cuEventDestroy_v2");
            StreamWaitEvent = (delegate* unmanaged<nint, nint, uint, CudaResult>)lib.GetExport("cuStreamWaitEvent");
            GetErrorString = (delegate* unmanaged<CudaResult, nint*, CudaResult>)lib.GetExport("cuGetErrorString");
        }
    }
}
