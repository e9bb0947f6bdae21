namespace ViT22B.Cuda;

/// <summary>The <c>CUresult</c> codes the library distinguishes (cuda.h); others are reported by number.</summary>
public enum CudaResult
{
    /// <summary>CUDA_SUCCESS.</summary>
    Success = 0,
    /// <summary>CUDA_ERROR_INVALID_VALUE.</summary>
    InvalidValue = 1,
    /// <summary>CUDA_ERROR_OUT_OF_MEMORY.</summary>
    OutOfMemory = 2,
    /// <summary>CUDA_ERROR_NOT_INITIALIZED.</summary>
    NotInitialized = 3,
    /// <summary>CUDA_ERROR_DEINITIALIZED.</summary>
    Deinitialized = 4,
    /// <summary>CUDA_ERROR_NO_DEVICE.</summary>
    NoDevice = 100,
    /// <summary>CUDA_ERROR_INVALID_DEVICE.</summary>
    InvalidDevice = 101,
    /// <summary>CUDA_ERROR_INVALID_CONTEXT.</summary>
    InvalidContext = 201,
    /// <summary>CUDA_ERROR_INVALID_HANDLE.</summary>
    InvalidHandle = 400,
    /// <summary>CUDA_ERROR_NOT_READY: the event or stream has pending work (not an error for queries).</summary>
    NotReady = 600,
    /// <summary>CUDA_ERROR_ILLEGAL_ADDRESS.</summary>
    IllegalAddress = 700,
    /// <summary>CUDA_ERROR_LAUNCH_FAILED.</summary>
    LaunchFailed = 719,
    /// <summary>CUDA_ERROR_UNKNOWN.</summary>
    Unknown = 999,
}
