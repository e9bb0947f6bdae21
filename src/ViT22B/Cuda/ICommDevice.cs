using static TorchSharp.torch;

namespace ViT22B.Cuda;

/// <summary>
/// What <see cref="NcclCommunicator"/> needs from the device besides NCCL itself: the torch device of an ordinal, the
/// calling thread's current stream, a communication stream, events, buffer addresses, the release of a buffer once its
/// last device use has finished, and (for sizes nobody passed) a read of device values by the host.
/// <see cref="CudaCommDevice"/> is the GPU; the tests substitute the CPU half of an NCCL stand-in, so the communicator's
/// own logic (ordering, buffer lifetimes, failure handling) runs on a machine without a GPU.
/// </summary>
internal interface ICommDevice
{
    /// <summary>The torch device that holds the buffers of device <paramref name="ordinal"/>.</summary>
    Device TorchDevice(int ordinal);

    /// <summary>Number of devices this process sees.</summary>
    int DeviceCount { get; }

    /// <summary>Makes <paramref name="ordinal"/> the calling thread's current device (NCCL's init reads it).</summary>
    void MakeCurrent(int ordinal);

    /// <summary>The stream the calling thread's tensor operations on <paramref name="ordinal"/> go to.</summary>
    nint CurrentStream(int ordinal);

    /// <summary>Restores the calling thread's current device as it is now when the result is disposed (around code
    /// that selects devices in turn).</summary>
    IDisposable KeepCurrentDevice();

    /// <summary>A non-blocking stream for collectives (never the legacy default stream).</summary>
    nint CreateCommStream(int ordinal, bool highPriority);

    /// <summary>The communicator is done with a stream from <see cref="CreateCommStream"/>.</summary>
    void ReleaseCommStream(int ordinal, nint stream);

    /// <summary>A new event (timing disabled).</summary>
    IDeviceEvent CreateEvent(int ordinal);

    /// <summary>The address of a contiguous buffer of this device (kept alive by the caller).</summary>
    nint DataPointer(Tensor buffer);

    /// <summary>Drops the communicator's handle on <paramref name="buffer"/>: called once nothing can use the buffer
    /// out of order any more (its collective has finished, or the stream it was allocated on has been made to wait for
    /// the collective, so whatever reuses its memory from that stream's pool is queued behind it).</summary>
    void Release(Tensor buffer);

    /// <summary>Reads a small int64 tensor on the host: a host synchronization (it waits for everything queued before
    /// it). Only the exchange of sizes the caller did not pass uses it.</summary>
    long[] ReadToHost(Tensor values);
}
