using static TorchSharp.torch;

namespace ViT22B.Parallel;

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

    /// <summary>Takes this rank out of the group after a failure that left it out of step with its peers (an exception
    /// half-way through a ring, say): the rank can no longer issue the collectives its peers expect, so every later
    /// operation on it throws <see cref="CommunicatorException"/> instead of pairing with the wrong ones. NCCL: the
    /// communicator is aborted and the peers fail at their timeout; in process: the world is poisoned and the peers
    /// fail at once.</summary>
    void Abort(Exception reason);

    /// <summary>Blocks until every collective this rank issued on the group has finished, and throws
    /// <see cref="CommunicatorException"/> if one failed. On NCCL, <see cref="ICommWork.Wait"/> returns before the
    /// collective has run (the device is made to wait, not the host), so a failure found later (a timeout, a dead
    /// peer) is reported here at the latest; in process every collective has finished when its <c>Wait</c> returns.</summary>
    void Synchronize();
}
