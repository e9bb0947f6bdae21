using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>An operation in flight; <see cref="Wait"/> blocks until its result is available on the calling rank.
/// Disposing it without waiting (a rank leaving a ring loop on an exception, say) waits for the operation all the
/// same, so that no buffer it uses is freed early, and never throws; a failure found then makes the communicator fail
/// every later call.</summary>
public interface ICommWork : IDisposable
{
    /// <summary>Waits for the operation and returns its result, registered in the caller's current dispose scope.
    /// Call at most once, on the rank's own thread.</summary>
    /// <exception cref="CommunicatorException">A peer failed, the call did not match the peers' calls, or the
    /// peers did not arrive within the timeout.</exception>
    Tensor Wait();
}

/// <summary>
/// Collectives over one group of ranks (a mesh axis). Every rank of the group calls the same operations in the same
/// order. A call may read its input until <see cref="ICommWork.Wait"/> returns (the NCCL backend sends the caller's
/// tensor without copying it): the caller may dispose its handle at once but must not modify the tensor in place
/// before then. Results are new tensors on the rank's device. Reductions are sums: the in-process backend adds in rank
/// order (bit-identical on every rank and every run); NCCL adds in the order of its own algorithms, so results can
/// differ from the in-process backend's by rounding. Chunks along dimension 0 may differ in size between ranks (uneven token counts); all other dimensions
/// and the dtype must agree, and a mismatch fails every rank with a message naming the operation and the ranks.
/// Implementations: <see cref="ThreadedCommunicator"/> (ranks are threads of one process) and
/// <c>ViT22B.Cuda.NcclCommunicator</c> (NCCL, one rank per GPU).
/// </summary>
public interface ICommunicator
{
    /// <summary>This rank's index in the group, 0 ≤ Rank &lt; Size.</summary>
    int Rank { get; }

    /// <summary>Number of ranks in the group.</summary>
    int Size { get; }

    /// <summary>A name for messages, e.g. <c>model[data=1]</c>.</summary>
    string Name { get; }

    /// <summary>Starts an all-gather: the result is the ranks' tensors concatenated along dimension 0 in rank order.</summary>
    /// <param name="local">This rank's tensor.</param>
    /// <param name="counts">Every rank's dimension 0, when the caller knows them (the token partition, FSDP shard
    /// rows), or null to have them exchanged first: on NCCL an extra collective and a host synchronization. Wrong
    /// counts are a <see cref="CommunicatorException"/> on the in-process backend and undefined on NCCL.</param>
    ICommWork AllGatherAsync(Tensor local, IReadOnlyList<long>? counts = null);

    /// <summary>Starts a reduce-scatter: <paramref name="full"/> is split along dimension 0 into
    /// <paramref name="counts"/> (one per rank, identical on every rank); rank i receives the sum over ranks of chunk i.</summary>
    ICommWork ReduceScatterAsync(Tensor full, IReadOnlyList<long> counts);

    /// <summary>Starts an all-reduce (sum).</summary>
    ICommWork AllReduceAsync(Tensor tensor);

    /// <summary>Starts a broadcast of <paramref name="tensor"/> from <paramref name="root"/> (other ranks pass a
    /// tensor of the same shape and dtype, whose values are ignored).</summary>
    ICommWork BroadcastAsync(Tensor tensor, int root);

    /// <summary>Starts a ring permute: every rank sends <paramref name="send"/> to rank (Rank + shift) mod Size and
    /// receives the tensor of rank (Rank − shift) mod Size (whose dimension 0 may differ from its own).</summary>
    /// <param name="send">This rank's tensor.</param>
    /// <param name="shift">Ring offset of the destination.</param>
    /// <param name="receiveRows">Dimension 0 of the tensor this rank receives when the caller knows it (the ring
    /// loops do: the token partition is the same on every rank), or −1 to have it exchanged first. NCCL's
    /// exchange costs a collective and a host synchronization, which stalls the overlap; a wrong value is a
    /// <see cref="CommunicatorException"/> on the in-process backend and undefined on NCCL.</param>
    ICommWork PermuteAsync(Tensor send, int shift, long receiveRows = -1);

    /// <summary>Blocks until every rank of the group has called it.</summary>
    void Barrier();
}

/// <summary>Blocking forms of the <see cref="ICommunicator"/> operations.</summary>
public static class CommunicatorExtensions
{
    /// <summary>All-gather along dimension 0 (<paramref name="counts"/>: every rank's dimension 0, if known).</summary>
    public static Tensor AllGather(this ICommunicator c, Tensor local, IReadOnlyList<long>? counts = null) => c.AllGatherAsync(local, counts).Wait();

    /// <summary>Reduce-scatter (sum) along dimension 0.</summary>
    public static Tensor ReduceScatter(this ICommunicator c, Tensor full, IReadOnlyList<long> counts) => c.ReduceScatterAsync(full, counts).Wait();

    /// <summary>All-reduce (sum).</summary>
    public static Tensor AllReduce(this ICommunicator c, Tensor tensor) => c.AllReduceAsync(tensor).Wait();

    /// <summary>Broadcast from <paramref name="root"/>.</summary>
    public static Tensor Broadcast(this ICommunicator c, Tensor tensor, int root) => c.BroadcastAsync(tensor, root).Wait();

    /// <summary>All-gather along dimension <paramref name="dim"/>: the ranks' tensors concatenated there in rank
    /// order (<paramref name="counts"/>: every rank's size along it); contiguous.</summary>
    internal static Tensor AllGatherAlong(this ICommunicator c, Tensor local, IReadOnlyList<long> counts, int dim)
    {
        if (dim == 0) return c.AllGather(local, counts);
        using var scope = TorchSharp.torch.NewDisposeScope();
        var gathered = c.AllGather(local.transpose(0, dim).contiguous(), counts);
        return gathered.transpose(0, dim).contiguous().MoveToOuterDisposeScope();
    }

    /// <summary>Ring permute by <paramref name="shift"/> (see <see cref="ICommunicator.PermuteAsync"/>).</summary>
    public static Tensor Permute(this ICommunicator c, Tensor send, int shift, long receiveRows = -1) => c.PermuteAsync(send, shift, receiveRows).Wait();
}

/// <summary>A collective failed: a peer raised, the ranks' calls did not match, or a peer did not arrive in time.
/// Every rank of the world sees one.</summary>
public sealed class CommunicatorException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CommunicatorException(string message, Exception? inner = null) : base(message, inner) { }
}
