using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>
/// One NCCL communicator (<c>ncclComm_t</c>) and the raw collectives on it, on contiguous CUDA tensors and a raw
/// stream. This is the thin layer under the CUDA backend of <see cref="Parallel.ICommunicator"/>: it checks
/// arguments and result codes, aborts the communicator on fatal codes, and leaves stream ordering, buffer lifetime
/// and uneven chunk sizes to its caller. Use one communicator from one thread only (NCCL's rule).
/// Written from nccl.h and the NCCL user guide; not yet run on a GPU (docs/gpu.md lists what was verified where).
/// </summary>
public sealed unsafe class NcclComm : IDisposable
{
    private nint _comm;

    private NcclComm(nint comm, int rank, int size) => (_comm, Rank, Size) = (comm, rank, size);

    /// <summary>This rank.</summary>
    public int Rank { get; }
    /// <summary>Ranks in the communicator.</summary>
    public int Size { get; }
    /// <summary>Whether the communicator was aborted after a fatal error.</summary>
    public bool IsAborted { get; private set; }

    /// <summary><c>ncclCommInitRank</c>: one rank of a communicator of <paramref name="size"/> ranks (one process or
    /// thread per GPU); every rank passes the same <paramref name="id"/> (made by rank 0 with
    /// <see cref="Nccl.GetUniqueId"/> and handed over with <see cref="Parallel.Rendezvous"/>). The caller's thread
    /// must have the rank's device current.</summary>
    public static NcclComm InitRank(NcclUniqueId id, int rank, int size)
    {
        if (size < 1 || rank < 0 || rank >= size) throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is outside [0, {size}).");
        nint comm;
        Nccl.Check(Nccl.F.CommInitRank(&comm, size, id, rank), "ncclCommInitRank");
        return new NcclComm(comm, rank, size);
    }

    /// <summary><c>ncclCommInitAll</c>: one communicator per listed device, all in this process (then drive each from
    /// its own thread).</summary>
    public static NcclComm[] InitAll(IReadOnlyList<int> devices)
    {
        ArgumentNullException.ThrowIfNull(devices);
        if (devices.Count == 0) throw new ArgumentException("At least one device is needed.", nameof(devices));
        var comms = new nint[devices.Count];
        var list = devices.ToArray();
        fixed (nint* c = comms)
        fixed (int* d = list)
            Nccl.Check(Nccl.F.CommInitAll(c, list.Length, d), "ncclCommInitAll");
        return comms.Select((c, i) => new NcclComm(c, i, comms.Length)).ToArray();
    }

    /// <summary>The communicator's asynchronous error (network failures, a dead peer), polled while waiting.</summary>
    public NcclResult AsyncError()
    {
        NcclResult r;
        Nccl.Check(Nccl.F.CommGetAsyncError(Handle, &r), "ncclCommGetAsyncError");
        return r;
    }

    /// <summary>All-reduce (in place allowed).</summary>
    public void AllReduce(Tensor send, Tensor recv, NcclRedOp op, nint stream)
    {
        Same(send, recv, send.numel(), "ncclAllReduce");
        Call(Nccl.F.AllReduce(Ptr(send), Ptr(recv), (nuint)send.numel(), Nccl.DataType(send.dtype), op, Handle, stream), "ncclAllReduce");
    }

    /// <summary>Reduce-scatter: <paramref name="send"/> holds Size equal blocks; <paramref name="recv"/> one block.</summary>
    public void ReduceScatter(Tensor send, Tensor recv, NcclRedOp op, nint stream)
    {
        Same(recv, send, recv.numel() * Size, "ncclReduceScatter");
        Call(Nccl.F.ReduceScatter(Ptr(send), Ptr(recv), (nuint)recv.numel(), Nccl.DataType(send.dtype), op, Handle, stream), "ncclReduceScatter");
    }

    /// <summary>All-gather: <paramref name="recv"/> holds Size blocks of <paramref name="send"/>'s size, in rank order.</summary>
    public void AllGather(Tensor send, Tensor recv, nint stream)
    {
        Same(send, recv, send.numel() * Size, "ncclAllGather");
        Call(Nccl.F.AllGather(Ptr(send), Ptr(recv), (nuint)send.numel(), Nccl.DataType(send.dtype), Handle, stream), "ncclAllGather");
    }

    /// <summary>Broadcast from <paramref name="root"/>.</summary>
    public void Broadcast(Tensor send, Tensor recv, int root, nint stream)
    {
        if ((uint)root >= (uint)Size) throw new ArgumentOutOfRangeException(nameof(root), $"root {root} is outside [0, {Size}).");
        Same(send, recv, send.numel(), "ncclBroadcast");
        Call(Nccl.F.Broadcast(Ptr(send), Ptr(recv), (nuint)send.numel(), Nccl.DataType(send.dtype), root, Handle, stream), "ncclBroadcast");
    }

    /// <summary>One ring step: send to <paramref name="next"/> and receive from <paramref name="previous"/> in one NCCL
    /// group (separately they would deadlock).</summary>
    public void SendRecv(Tensor send, int next, Tensor recv, int previous, nint stream)
    {
        if (send.dtype != recv.dtype) throw new ArgumentException($"SendRecv: send is {send.dtype}, receive is {recv.dtype}.");
        Call(Nccl.F.GroupStart(), "ncclGroupStart");
        var sendResult = Nccl.F.Send(Ptr(send), (nuint)send.numel(), Nccl.DataType(send.dtype), next, Handle, stream);
        var recvResult = Nccl.F.Recv(Ptr(recv), (nuint)recv.numel(), Nccl.DataType(recv.dtype), previous, Handle, stream);
        Call(Nccl.F.GroupEnd(), "ncclGroupEnd");   // a group's errors surface here
        Call(sendResult, "ncclSend");
        Call(recvResult, "ncclRecv");
    }

    /// <summary><c>ncclCommAbort</c>: stops pending operations, so peers fail instead of hanging.</summary>
    public void Abort()
    {
        if (_comm == 0 || IsAborted) return;
        Nccl.F.CommAbort(_comm);
        IsAborted = true;
    }

    /// <summary>Destroys the communicator (aborted ones are already released).</summary>
    public void Dispose()
    {
        if (_comm == 0) return;
        if (!IsAborted) Nccl.F.CommDestroy(_comm);
        _comm = 0;
    }

    private nint Handle
    {
        get
        {
            ObjectDisposedException.ThrowIf(_comm == 0, this);
            if (IsAborted) throw new InvalidOperationException("The NCCL communicator was aborted after an error; create a new one.");
            return _comm;
        }
    }

    private void Call(NcclResult result, string operation)
    {
        if (result != NcclResult.Success && Nccl.IsFatal(result)) Abort();
        Nccl.Check(result, operation);
    }

    private static nint Ptr(Tensor t)
    {
        if (t.device.type != DeviceType.CUDA) throw new ArgumentException($"NCCL buffers must be CUDA tensors; found one on {t.device}.");
        return TensorPointers.DataPointer(t);
    }

    private static void Same(Tensor a, Tensor b, long expectedOther, string op)
    {
        if (a.dtype != b.dtype) throw new ArgumentException($"{op}: the buffers' dtypes differ ({a.dtype} vs {b.dtype}).");
        if (b.numel() != expectedOther) throw new ArgumentException($"{op}: buffer sizes do not fit ({a.numel()} and {b.numel()} elements; expected {expectedOther}).");
    }
}
