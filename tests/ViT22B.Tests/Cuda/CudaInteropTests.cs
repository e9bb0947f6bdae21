using ViT22B.Cuda;
using ViT22B.Interop;

namespace ViT22B.Tests.Cuda;

/// <summary>What the CUDA interop does on a machine without a GPU (the GPU tests are in ViT22B.GpuTests).</summary>
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
}
