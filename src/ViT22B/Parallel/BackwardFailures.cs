using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// Failures of the collectives that run inside <c>backward()</c>. libtorch's autograd engine calls the
/// communication regions' backward functions from native code, and the .NET runtime ends the process when an
/// exception escapes such a callback. So those functions catch every exception, give zero gradients for that
/// node, and record the failure against the communicator;
/// <see cref="ShardedVisionTransformer.Backward"/> and <see cref="ShardedVisionTransformer.SynchronizeGradients"/> throw it. The
/// communicator itself is made unusable after a failure (<see cref="ICommunicator.Abort"/>: the in-process world is
/// poisoned, an NCCL communicator aborted, also when the failure was not the communicator's own, such as an
/// out-of-memory error in a ring's matmul), so any later collective on it fails too: a failed backward cannot pass
/// unnoticed, and the rank never issues collectives out of step with its peers.
/// </summary>
internal static class BackwardFailures
{
    private static readonly ConditionalWeakTable<ICommunicator, StrongBox<ExceptionDispatchInfo?>> Failures = new();

    /// <summary>Runs a backward function body; on an exception records it against <paramref name="comm"/> and returns
    /// <paramref name="zeros"/>() instead: zero gradients of the inputs' shapes (not undefined ones: TorchSharp 0.107
    /// materializes an undefined gradient arriving at the next custom function from a forward-output cache that
    /// the caller's dispose scope has already freed, and the process ends).</summary>
    internal static List<Tensor> Guard(ICommunicator comm, Func<List<Tensor>> backward, Func<List<Tensor>> zeros)
    {
        try
        {
            return backward();
        }
        catch (Exception e)
        {
            Record(comm, e);
            // The ring was left half-way: this rank can no longer issue what its peers expect next.
            if (e is not CommunicatorException) comm.Abort(e);
            return zeros();
        }
    }

    /// <summary>Records a failure inside backward against <paramref name="comm"/> (the first one is kept).</summary>
    internal static void Record(ICommunicator comm, Exception failure)
    {
        var box = Failures.GetOrCreateValue(comm);
        lock (box) box.Value ??= ExceptionDispatchInfo.Capture(failure);
    }

    /// <summary>True when a backward collective on <paramref name="comm"/> failed and was not yet thrown.</summary>
    public static bool HasFailed(ICommunicator comm) =>
        Failures.TryGetValue(comm, out var box) && Volatile.Read(ref box.Value) is not null;

    /// <summary>Throws (and forgets) the first recorded backward failure of any of <paramref name="comms"/>.</summary>
    public static void ThrowIfAny(params ICommunicator[] comms)
    {
        ArgumentNullException.ThrowIfNull(comms);
        foreach (var comm in comms)
        {
            if (!Failures.TryGetValue(comm, out var box)) continue;
            ExceptionDispatchInfo? failure;
            lock (box) (failure, box.Value) = (box.Value, null);
            failure?.Throw();
        }
    }
}
