using static TorchSharp.torch;

namespace ViT22B.Parallel;

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

    /// <summary>Waits for <paramref name="work"/> and returns its result, then (also when the wait throws) releases
    /// the work and <paramref name="input"/>, the buffer it read: a collective's input may be freed only once its
    /// <c>Wait</c> has returned.</summary>
    internal static Tensor WaitThenRelease(this ICommWork work, Tensor input)
    {
        try
        {
            return work.Wait();
        }
        finally
        {
            work.Dispose();
            input.Dispose();
        }
    }

    /// <summary>Ring permute by <paramref name="shift"/> (see <see cref="ICommunicator.PermuteAsync"/>).</summary>
    public static Tensor Permute(this ICommunicator c, Tensor send, int shift, long receiveRows = -1) => c.PermuteAsync(send, shift, receiveRows).Wait();
}
