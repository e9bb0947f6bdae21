using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;

using static TorchSharp.torch;

namespace ViT22B.GpuTests;

public sealed class CudaInteropTests
{
    [CudaFact]
    public void Work_on_a_pool_stream_is_ordered_by_an_event()
    {
        using var a = torch.randn(2048, 2048, device: torch.CUDA);
        using var expected = a.matmul(a);
        torch.cuda.synchronize();
        nint side = CudaStreams.FromPool(0);
        Assert.NotEqual(CudaStreams.Current(0), side);
        using var done = new CudaEvent(0);
        Tensor c;
        using (new StreamScope(side, 0))
        {
            Assert.Equal(side, CudaStreams.Current(0));
            c = a.matmul(a);                      // queued on the side stream
            done.Record(side);
        }
        done.Wait(CudaStreams.Current(0));        // the default stream waits for the side stream's matmul
        using (c)
        using (var diff = (c - expected).abs().max())
            Assert.True(diff.item<float>() < 1e-3);
        done.Synchronize();
        Assert.True(done.IsComplete);
    }

    [CudaFact]
    public void Cuda_tensor_pointers_include_the_offset()
    {
        using var x = torch.zeros(10, 10, dtype: ScalarType.BFloat16, device: torch.CUDA);
        using var y = x.narrow(0, 3, 2);
        Assert.Equal(30 * 2, (long)(TensorPointers.DataPointer(y) - TensorPointers.DataPointer(x)));
    }

    [CudaFact]
    public unsafe void Events_leave_the_calling_threads_context_as_it_was()
    {
        // Review defect 9: CudaEvent made the device's primary context current on the calling thread and left it there.
        nint stream = CudaStreams.FromPool(0);
        var contexts = new nint[2];
        var worker = new Thread(() =>
        {
            CudaDriver.Check(CudaDriver.F.CtxSetCurrent(0), "cuCtxSetCurrent");   // no context current
            contexts[0] = CudaDriver.CurrentContext();
            using (var e = new CudaEvent(0))
            {
                e.Record(stream);
                e.Synchronize();
                _ = e.IsComplete;
            }
            contexts[1] = CudaDriver.CurrentContext();
        });
        worker.Start();
        worker.Join();
        Assert.Equal(0, contexts[0]);
        Assert.Equal(0, contexts[1]);
    }

    [CudaFact]
    public void An_unindexed_cuda_device_is_libtorchs_current_device()
    {
        using var x = torch.ones(1, device: new Device(DeviceType.CUDA, -1));
        Assert.Equal(x.device.index, CudaDriver.Ordinal(new Device(DeviceType.CUDA, -1)));
    }

    [CudaFact]
    public void Communication_streams_are_never_the_legacy_default_stream()
    {
        Assert.NotEqual(0, CudaStreams.FromPool(0));
        Assert.NotEqual(0, CudaStreams.FromPool(0, highPriority: true));
        Assert.NotEqual(0, CudaDriver.CreateNonBlockingStream(0, highPriority: true));   // the fallback when the pool is not exported
    }
}
