namespace ViT22B.Interop;

/// <summary><c>ncclResult_t</c> (nccl.h 2.30).</summary>
public enum NcclResult
{
    /// <summary>ncclSuccess.</summary>
    Success = 0,
    /// <summary>ncclUnhandledCudaError (fatal).</summary>
    UnhandledCudaError = 1,
    /// <summary>ncclSystemError (fatal).</summary>
    SystemError = 2,
    /// <summary>ncclInternalError (fatal).</summary>
    InternalError = 3,
    /// <summary>ncclInvalidArgument: the call had no effect.</summary>
    InvalidArgument = 4,
    /// <summary>ncclInvalidUsage (fatal).</summary>
    InvalidUsage = 5,
    /// <summary>ncclRemoteError: a peer failed.</summary>
    RemoteError = 6,
    /// <summary>ncclInProgress: a non-blocking operation has not finished.</summary>
    InProgress = 7,
    /// <summary>ncclTimeout (new in 2.30).</summary>
    Timeout = 8,
}
