using System.Runtime.CompilerServices;
using ViT22B.Tests;

namespace ViT22B.GpuTests;

/// <summary>A fact that runs only where CUDA is available, and says so when skipped.</summary>
public sealed class CudaFactAttribute : FactAttribute
{
    public CudaFactAttribute([CallerFilePath] string? sourceFilePath = null, [CallerLineNumber] int sourceLineNumber = -1)
        : base(sourceFilePath, sourceLineNumber) => Skip = GpuAvailability.NoCuda();
}

/// <summary>A test that needs a CUDA device and libnccl.so.2; skipped with the reason otherwise.</summary>
public sealed class NcclFactAttribute : FactAttribute
{
    public NcclFactAttribute([CallerFilePath] string? sourceFilePath = null, [CallerLineNumber] int sourceLineNumber = -1)
        : base(sourceFilePath, sourceLineNumber) => Skip = GpuAvailability.NoNccl();
}
