using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// The two communication-overlapped linear operations of the ViT-22B paper (docs/model.md#asynchronous-parallel-linear-operations), on
/// token-major activations <c>[T, …, D]</c> whose token chunk <c>r</c> (sizes from <see cref="TokenPartition"/>) lives
/// on rank <c>r</c> of <c>comm</c>. Every loop is deterministic: the same rank order for every sum on every run.
/// <para>Operands are made contiguous first: libtorch 2.10's CPU <c>linear</c> on a strided 3-D input (a transposed
/// batch-major tensor) took 32 s instead of 15 ms for a [256, 1, 1536] × [10752, 1536]ᵀ bfloat16 product and 7×
/// as long in float32 (measured on the 2-core AMD EPYC, docs/scale.md).</para>
/// </summary>
internal static class Rings
{
    private static Tensor Chunk(Tensor full, long[] counts, int c) => full.narrow(0, TokenPartition.Start(counts, c), counts[c]);

    /// <summary>
    /// All-gather + matmul: <c>Y = AllGather(x) · Wᵀ</c> for a weight shard W [Dout_r, Din]. Returns Y [T, …, Dout_r]
    /// (all tokens, this rank's output features) and the gathered input [T, …, Din].
    /// <code>
    /// cur = x_r; c = r
    /// for s in 0 .. k−1:
    ///     if s &lt; k−1: post permute(cur → r+1, next ← r−1)     # in flight (receiving chunk c−1, whose size is known) …
    ///     Y[chunk c] = cur · Wᵀ                                  # … while this matmul runs
    ///     if s &lt; k−1: cur = wait(); c = c − 1 mod k
    /// </code>
    /// The size of every chunk a rank receives comes from <paramref name="counts"/>, so no step exchanges sizes or
    /// waits on the host before its matmul is queued. A permute still in flight when the loop is left by an exception
    /// is disposed (waited for) before its buffers can go, and the communicator is aborted
    /// (<see cref="ICommunicator.Abort"/>): this rank will not issue the rest of the ring its peers expect.
    /// </summary>
    public static (Tensor Y, Tensor X) AllGatherMatmul(Tensor xLocal, Tensor w, ICommunicator comm, long[] counts, CommMode mode)
    {
        int k = comm.Size, r = comm.Rank;
        CheckCounts(xLocal, counts, comm);
        using var scope = torch.NewDisposeScope();
        if (mode == CommMode.Plain || k == 1)
        {
            var xg = k == 1 ? xLocal.contiguous().alias() : comm.AllGather(xLocal.contiguous(), counts);
            return (nn.functional.linear(xg, w).MoveToOuterDisposeScope(), xg.MoveToOuterDisposeScope());
        }
        var ys = new Tensor[k];
        var xs = new Tensor[k];
        var cur = xLocal.contiguous();
        int c = r;
        try
        {
            for (int s = 0; s < k; s++)
            {
                using var inFlight = s < k - 1 ? comm.PermuteAsync(cur, +1, receiveRows: counts[(c - 1 + k) % k]) : null;
                ys[c] = nn.functional.linear(cur, w);
                xs[c] = cur;
                if (inFlight is not null)
                {
                    cur = inFlight.Wait();
                    c = (c - 1 + k) % k;
                }
            }
        }
        catch (Exception e) when (e is not CommunicatorException)
        {
            comm.Abort(e);   // the ring was left half-way: the peers' next permutes would pair with this rank's next calls
            throw;
        }
        return (torch.cat(ys, 0).MoveToOuterDisposeScope(), torch.cat(xs, 0).MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Matmul + reduce-scatter: <c>out_r = Σ_ranks (h · Wᵀ)[chunk r]</c> for an input-feature shard W [Dout, Din_r] and
    /// h [T, …, Din_r]. Returns this rank's token chunk [T_r, …, Dout].
    /// <code>
    /// partial = h[chunk r+1] · Wᵀ; acc = none
    /// for s in 1 .. k−1:
    ///     post permute(acc + partial → r−1, acc ← r+1)            # running sum travels backwards (chunk r+1+s) …
    ///     partial = h[chunk r+1+s] · Wᵀ                           # … while the next partial is computed
    ///     acc = wait()
    /// out_r = acc + partial                                       # chunk r, reduced over all ranks after k−1 hops
    /// </code>
    /// As in <see cref="AllGatherMatmul"/>, received sizes come from <paramref name="counts"/> and a permute in flight
    /// is disposed (waited for) and the communicator aborted if an exception leaves the loop.
    /// </summary>
    public static Tensor MatmulReduceScatter(Tensor h, Tensor w, ICommunicator comm, long[] counts, CommMode mode)
    {
        int k = comm.Size, r = comm.Rank;
        if (counts.Length != k || counts.Sum() != h.shape[0])
            throw new ArgumentException($"Token counts [{string.Join(", ", counts)}] do not split the {h.shape[0]} tokens of the input over {k} ranks.");
        using var scope = torch.NewDisposeScope();
        h = h.contiguous();
        if (k == 1) return nn.functional.linear(h, w).MoveToOuterDisposeScope();
        if (mode == CommMode.Plain)
            return comm.ReduceScatter(nn.functional.linear(h, w), counts).MoveToOuterDisposeScope();
        var partial = nn.functional.linear(Chunk(h, counts, (r + 1) % k), w);
        Tensor? acc = null;
        try
        {
            for (int s = 1; s < k; s++)
            {
                using var inFlight = comm.PermuteAsync(acc is null ? partial : acc.Plus(partial), -1, receiveRows: counts[(r + 1 + s) % k]);
                partial = nn.functional.linear(Chunk(h, counts, (r + 1 + s) % k), w);
                acc = inFlight.Wait();
            }
        }
        catch (Exception e) when (e is not CommunicatorException)
        {
            comm.Abort(e);   // as in AllGatherMatmul
            throw;
        }
        return acc!.Plus(partial).MoveToOuterDisposeScope();
    }

    private static void CheckCounts(Tensor xLocal, long[] counts, ICommunicator comm)
    {
        if (counts.Length != comm.Size)
            throw new ArgumentException($"{counts.Length} token counts for a group of {comm.Size} ranks.");
        if (xLocal.shape[0] != counts[comm.Rank])
            throw new ArgumentException($"Rank {comm.Rank} of '{comm.Name}' holds {xLocal.shape[0]} tokens but the partition gives it {counts[comm.Rank]}.");
    }
}
