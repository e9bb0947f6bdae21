namespace ViT22B.Cuda;

/// <summary>
/// A CUDA event (timing disabled): record it on a stream after some work, make another stream wait for it, or ask
/// whether the work has finished. Created for one device; every method pushes that device's primary context for the
/// duration of its driver call and pops it again, so the calling thread's own context is left as it was.
/// </summary>
internal sealed unsafe class CudaEvent : IDeviceEvent, Parallel.ITransferEvent
{
    private const uint DisableTiming = 2;   // CU_EVENT_DISABLE_TIMING
    private nint _event;

    /// <summary>Creates an event on device <paramref name="device"/>.</summary>
    public CudaEvent(int device)
    {
        Device = device;
        using var _ = CudaDriver.Use(device);
        nint e;
        CudaDriver.Check(CudaDriver.F.EventCreate(&e, DisableTiming), "cuEventCreate");
        _event = e;
    }

    /// <summary>The device.</summary>
    public int Device { get; }

    /// <summary>Captures the work queued on <paramref name="stream"/> so far (a raw <c>cudaStream_t</c>; 0 = legacy default stream).</summary>
    public void Record(nint stream) => Call(e => CudaDriver.F.EventRecord(e, stream), "cuEventRecord");

    /// <summary>Makes <paramref name="stream"/> wait (on the device, without blocking the host) until this event's work is done.</summary>
    public void Wait(nint stream) => Call(e => CudaDriver.F.StreamWaitEvent(stream, e, 0), "cuStreamWaitEvent");

    /// <summary>Whether the recorded work has finished (never blocks).</summary>
    public bool IsComplete
    {
        get
        {
            CudaResult r = CudaResult.Success;
            Call(e => (r = CudaDriver.F.EventQuery(e)) == CudaResult.NotReady ? CudaResult.Success : r, "cuEventQuery");
            return r == CudaResult.Success;
        }
    }

    /// <summary>Blocks the calling thread until the recorded work has finished.</summary>
    public void Synchronize() => Call(e => CudaDriver.F.EventSynchronize(e), "cuEventSynchronize");

    private void Call(Func<nint, CudaResult> f, string op)
    {
        ObjectDisposedException.ThrowIf(_event == 0, this);
        using var _ = CudaDriver.Use(Device);
        CudaDriver.Check(f(_event), op);
    }

    /// <summary>Destroys the event (the driver releases it once pending work has passed it).</summary>
    public void Dispose()
    {
        if (_event == 0) return;
        using (CudaDriver.Use(Device)) CudaDriver.F.EventDestroy(_event);
        _event = 0;
    }
}
