using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Cuda;

/// <summary>
/// How <see cref="Parallel.ThreadedCommunicator"/> moves GPU tensors between ranks that are threads of one process
/// (simulated ranks sharing a GPU, or one thread per local GPU), so that the copies overlap the ranks' compute:
/// <list type="number">
/// <item>the sender copies its tensor on its current (compute) stream and records a ready event after the copy
/// (<see cref="MarkReady"/>);</item>
/// <item>the receiver's communication stream waits on the senders' ready events, builds the result there (the
/// device-to-device copies, concatenation or sum), copies it into a tensor allocated on the receiver's compute
/// stream, and records a done event that the compute stream waits on (<see cref="Receive"/>); the host never
/// blocks;</item>
/// <item>the senders' copies are freed only after every receiver's done event has passed (checked without blocking
/// by later collectives, then disposed by the communicator), because the caching allocator would otherwise hand
/// their memory to the senders' compute streams while a communication stream still reads it (libtorch has no <c>record_stream</c> here).</item>
/// </list>
/// Every result is allocated on the stream that will use and free it; every cross-stream use is ordered by an event.
/// Written from the CUDA stream semantics and libtorch's caching-allocator rules; not yet run on a GPU.
/// </summary>
internal static class InProcessTransfer
{
    /// <summary>An event recorded on the current stream of <paramref name="copy"/>'s device after its copy was queued.</summary>
    public static CudaEvent MarkReady(Tensor copy)
    {
        int device = CudaDriver.Ordinal(copy.device);
        var ready = new CudaEvent(device);
        ready.Record(CudaStreams.Current(device));
        return ready;
    }

    /// <summary>Builds a receiver's result: <paramref name="build"/> runs on <paramref name="commStream"/> after the
    /// <paramref name="ready"/> events; the returned tensor lives on the compute stream, ordered after the build; the
    /// returned event marks the end of every read of the inputs.</summary>
    public static (Tensor Result, CudaEvent Done) Receive(int device, nint commStream, IEnumerable<CudaEvent?> ready, Func<Tensor> build)
    {
        CudaDriver.MakeCurrent(device);
        nint compute = CudaStreams.Current(device);
        foreach (var e in ready) e?.Wait(commStream);
        Tensor staged;
        using (new StreamScope(commStream, device)) staged = build();
        // The result is allocated on the compute stream (which uses and frees it); its block may still be in use by
        // earlier compute-stream work, so the communication stream waits for that before writing.
        var result = torch.empty_like(staged);
        using (var allocated = new CudaEvent(device))
        {
            allocated.Record(compute);
            allocated.Wait(commStream);
        }
        using (new StreamScope(commStream, device))
        {
            result.copy_(staged);
            staged.Dispose();
        }
        var done = new CudaEvent(device);
        done.Record(commStream);
        done.Wait(compute);
        return (result, done);
    }
}
