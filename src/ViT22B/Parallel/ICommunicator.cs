using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>An operation in flight; <see cref="Wait"/> blocks until its result is available on the calling rank.</summary>
public interface ICommWork
{
    /// <summary>Waits for the operation and returns its result, registered in the caller's current dispose scope.
    /// Call exactly once, on the rank's own thread.</summary>
    /// <exception cref="CommunicatorException">A peer failed, the call did not match the peers' calls, or the
    /// peers did not arrive within the timeout.</exception>
    Tensor Wait();
}

/// <summary>
/// Collectives over one group of ranks (a mesh axis). Every rank of the group calls the same operations in the same
/// order; each call copies its input at call time (the caller may reuse or dispose it afterwards) and returns new
/// tensors on the rank's device. Reductions are sums computed in rank order, so every rank gets bit-identical
/// results. Chunks along dimension 0 may differ in size between ranks (uneven token counts); all other dimensions
/// and the dtype must agree, and a mismatch fails every rank with a message naming the operation and the ranks.
/// Implementations: <see cref="ThreadedCommunicator"/> (ranks are threads of one process); the CUDA/NCCL backend
/// plugs in here.
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
    ICommWork AllGatherAsync(Tensor local);

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
    /// <summary>All-gather along dimension 0.</summary>
    public static Tensor AllGather(this ICommunicator c, Tensor local) => c.AllGatherAsync(local).Wait();

    /// <summary>Reduce-scatter (sum) along dimension 0.</summary>
    public static Tensor ReduceScatter(this ICommunicator c, Tensor full, IReadOnlyList<long> counts) => c.ReduceScatterAsync(full, counts).Wait();

    /// <summary>All-reduce (sum).</summary>
    public static Tensor AllReduce(this ICommunicator c, Tensor tensor) => c.AllReduceAsync(tensor).Wait();

    /// <summary>Broadcast from <paramref name="root"/>.</summary>
    public static Tensor Broadcast(this ICommunicator c, Tensor tensor, int root) => c.BroadcastAsync(tensor, root).Wait();

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
