namespace ViT22B.Interop;

/// <summary>
/// The NCCL C functions the library calls, with nccl.h's signatures (<c>size_t</c> → <c>nuint</c>; communicators,
/// streams and buffers → <c>nint</c>). <see cref="Nccl.Native"/> calls libnccl; the tests substitute an in-process
/// implementation that enforces NCCL's rules on CPU tensors, so the code above this seam (<see cref="NcclComm"/>,
/// <see cref="Cuda.NcclCommunicator"/>) runs unchanged on a machine without a GPU.
/// </summary>
internal unsafe interface INcclApi
{
    /// <summary><c>ncclGetVersion</c>.</summary>
    NcclResult GetVersion(int* version);
    /// <summary><c>ncclGetUniqueId</c>.</summary>
    NcclResult GetUniqueId(NcclUniqueId* id);
    /// <summary><c>ncclCommInitRankConfig</c> (the id by value).</summary>
    NcclResult CommInitRankConfig(nint* comm, int nranks, NcclUniqueId id, int rank, NcclConfig* config);
    /// <summary><c>ncclCommGetAsyncError</c>: the communicator's state (<c>ncclInProgress</c> while a non-blocking
    /// call is still being carried out) or its asynchronous error.</summary>
    NcclResult CommGetAsyncError(nint comm, NcclResult* state);
    /// <summary><c>ncclCommAbort</c>.</summary>
    NcclResult CommAbort(nint comm);
    /// <summary><c>ncclCommDestroy</c>.</summary>
    NcclResult CommDestroy(nint comm);
    /// <summary><c>ncclAllReduce</c>.</summary>
    NcclResult AllReduce(nint send, nint recv, nuint count, NcclDataType type, NcclRedOp op, nint comm, nint stream);
    /// <summary><c>ncclReduceScatter</c> (<paramref name="recvCount"/> elements per rank).</summary>
    NcclResult ReduceScatter(nint send, nint recv, nuint recvCount, NcclDataType type, NcclRedOp op, nint comm, nint stream);
    /// <summary><c>ncclAllGather</c> (<paramref name="sendCount"/> elements per rank).</summary>
    NcclResult AllGather(nint send, nint recv, nuint sendCount, NcclDataType type, nint comm, nint stream);
    /// <summary><c>ncclBroadcast</c>.</summary>
    NcclResult Broadcast(nint send, nint recv, nuint count, NcclDataType type, int root, nint comm, nint stream);
    /// <summary><c>ncclSend</c>.</summary>
    NcclResult Send(nint send, nuint count, NcclDataType type, int peer, nint comm, nint stream);
    /// <summary><c>ncclRecv</c>.</summary>
    NcclResult Recv(nint recv, nuint count, NcclDataType type, int peer, nint comm, nint stream);
    /// <summary><c>ncclGroupStart</c> (the group depth is per thread).</summary>
    NcclResult GroupStart();
    /// <summary><c>ncclGroupEnd</c>: launches the thread's grouped calls when the outermost group ends.</summary>
    NcclResult GroupEnd();
    /// <summary><c>ncclGetErrorString</c>.</summary>
    string ErrorString(NcclResult result);
    /// <summary><c>ncclGetLastError</c>: NCCL's text for the last failure on a communicator (may be empty).</summary>
    string LastError(nint comm);
}
