using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using static TorchSharp.torch;

namespace ViT22B.Tests.Cuda;

public sealed class CudaInteropTests
{
    [Fact]
    public void Driver_result_codes_match_cuda_h()
    {
        Assert.Equal(0, (int)CudaResult.Success);
        Assert.Equal(2, (int)CudaResult.OutOfMemory);
        Assert.Equal(100, (int)CudaResult.NoDevice);
        Assert.Equal(400, (int)CudaResult.InvalidHandle);
        Assert.Equal(600, (int)CudaResult.NotReady);
        Assert.Equal(700, (int)CudaResult.IllegalAddress);
        var e = Assert.Throws<CudaException>(() => CudaDriver.Check(CudaResult.IllegalAddress, "cuEventSynchronize"));
        Assert.Contains("cuEventSynchronize failed: IllegalAddress (700)", e.Message);
    }

    [CpuOnlyFact]
    public void Without_cuda_the_missing_library_is_named()
    {
        // This machine has no CUDA build of libtorch; a driver may or may not be installed.
        var s = Assert.Throws<NativeLibraryException>(() => CudaStreams.FromPool(0));
        Assert.Contains("libtorch_cuda.so", s.Message);
        Assert.Contains("CUDA build of libtorch", s.Message);
        if (!System.Runtime.InteropServices.NativeLibrary.TryLoad("libcuda.so.1", out _))
        {
            var d = Assert.Throws<NativeLibraryException>(() => new CudaEvent(0));
            Assert.Contains("libcuda.so.1", d.Message);
            Assert.Contains("NVIDIA driver", d.Message);
        }
    }

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
}
