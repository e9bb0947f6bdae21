namespace ViT22B.Tests;

/// <summary>A fact that runs only where CUDA is available, and says so when skipped.</summary>
public sealed class CudaFactAttribute : FactAttribute
{
    public CudaFactAttribute() => Skip = GpuAvailability.NoCuda();
}

/// <summary>A test of what happens on a machine without CUDA; skipped, with the reason, where CUDA is present.</summary>
public sealed class CpuOnlyFactAttribute : FactAttribute
{
    public CpuOnlyFactAttribute() => Skip = GpuAvailability.HasCuda();
}
