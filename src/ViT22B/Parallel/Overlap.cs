using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>How a tensor-parallel linear layer communicates.</summary>
public enum CommMode
{
    /// <summary>The paper's asynchronous parallel linear operations: the collective is decomposed into a ring of
    /// k − 1 permutes, and the matmul of the chunk in hand runs while the next chunk travels.</summary>
    Overlapped,
    /// <summary>The plain collective, then the matmul (all-gather → matmul; matmul → reduce-scatter): the baseline.</summary>
    Plain,
}

/// <summary>Splits a token count into one contiguous chunk per rank (the first <c>T mod k</c> ranks get one more).</summary>
public static class TokenPartition
{
    /// <summary>Chunk sizes of <paramref name="tokens"/> over <paramref name="ranks"/> ranks.</summary>
    public static long[] Counts(long tokens, int ranks)
    {
        if (ranks < 1) throw new ArgumentOutOfRangeException(nameof(ranks));
        if (tokens < 0) throw new ArgumentOutOfRangeException(nameof(tokens));
        return Enumerable.Range(0, ranks).Select(r => tokens / ranks + (r < tokens % ranks ? 1 : 0)).ToArray();
    }

    /// <summary>Start of chunk <paramref name="rank"/>.</summary>
    public static long Start(long[] counts, int rank) => counts.Take(rank).Sum();
}

/// <summary>
/// The two communication-overlapped linear operations of the ViT-22B paper (SPEC.md §10, PARALLEL.md §7), on
/// token-major activations <c>[T, …, D]</c> whose token chunk <c>r</c> (sizes from <see cref="TokenPartition"/>) lives
/// on rank <c>r</c> of <c>comm</c>. Every loop is deterministic: the same rank order for every sum on every run.
/// </summary>
public static class Rings
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
    /// is disposed (waited for) before its buffers can go.
    /// </summary>
    public static (Tensor Y, Tensor X) AllGatherMatmul(Tensor xLocal, Tensor w, ICommunicator comm, long[] counts, CommMode mode)
    {
        int k = comm.Size, r = comm.Rank;
        CheckCounts(xLocal, counts, comm);
        using var scope = torch.NewDisposeScope();
        if (mode == CommMode.Plain || k == 1)
        {
            var xg = k == 1 ? xLocal.alias() : comm.AllGather(xLocal, counts);
            return (nn.functional.linear(xg, w).MoveToOuterDisposeScope(), xg.MoveToOuterDisposeScope());
        }
        var ys = new Tensor[k];
        var xs = new Tensor[k];
        var cur = xLocal;
        int c = r;
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
    /// is disposed (waited for) if an exception leaves the loop.
    /// </summary>
    public static Tensor MatmulReduceScatter(Tensor h, Tensor w, ICommunicator comm, long[] counts, CommMode mode)
    {
        int k = comm.Size, r = comm.Rank;
        if (counts.Length != k || counts.Sum() != h.shape[0])
            throw new ArgumentException($"Token counts [{string.Join(", ", counts)}] do not split the {h.shape[0]} tokens of the input over {k} ranks.");
        using var scope = torch.NewDisposeScope();
        if (k == 1) return nn.functional.linear(h, w).MoveToOuterDisposeScope();
        if (mode == CommMode.Plain)
            return comm.ReduceScatter(nn.functional.linear(h, w), counts).MoveToOuterDisposeScope();
        var partial = nn.functional.linear(Chunk(h, counts, (r + 1) % k), w);
        Tensor? acc = null;
        for (int s = 1; s < k; s++)
        {
            using var inFlight = comm.PermuteAsync(acc is null ? partial : acc + partial, -1, receiveRows: counts[(r + 1 + s) % k]);
            partial = nn.functional.linear(Chunk(h, counts, (r + 1 + s) % k), w);
            acc = inFlight.Wait();
        }
        return (acc! + partial).MoveToOuterDisposeScope();
    }

    private static void CheckCounts(Tensor xLocal, long[] counts, ICommunicator comm)
    {
        if (counts.Length != comm.Size)
            throw new ArgumentException($"{counts.Length} token counts for a group of {comm.Size} ranks.");
        if (xLocal.shape[0] != counts[comm.Rank])
            throw new ArgumentException($"Rank {comm.Rank} of '{comm.Name}' holds {xLocal.shape[0]} tokens but the partition gives it {counts[comm.Rank]}.");
    }
}

/// <summary>Arguments of the ring autograd functions (kept in the autograd context).</summary>
internal sealed record RingArgs(ICommunicator Comm, long[] Counts, CommMode Mode);

/// <summary>New tensors shaped like another but for dimension 0 (token chunks; padded collective buffers).</summary>
internal static class Rows
{
    /// <summary>Zeros with <paramref name="rows"/> rows and <paramref name="like"/>'s other dimensions, dtype and device.</summary>
    public static Tensor Zeros(long rows, Tensor like) => torch.zeros(Shape(rows, like), dtype: like.dtype, device: like.device);

    /// <summary>Uninitialized, otherwise as <see cref="Zeros"/>.</summary>
    public static Tensor Empty(long rows, Tensor like) => torch.empty(Shape(rows, like), dtype: like.dtype, device: like.device);

    private static long[] Shape(long rows, Tensor like) => new[] { rows }.Concat(like.shape.Skip(1)).ToArray();
}

/// <summary>
/// Autograd: forward all-gather + matmul; backward the conjugate ring, matmul + reduce-scatter, for the input
/// gradient, and a local matmul for the weight gradient (PARALLEL.md §7).
/// </summary>
internal sealed class AllGatherMatmulFunction : torch.autograd.SingleTensorFunction<AllGatherMatmulFunction>
{
    public override string Name => nameof(AllGatherMatmulFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, w, args) = ((Tensor)vars[0], (Tensor)vars[1], (RingArgs)vars[2]);
        var (y, xg) = Rings.AllGatherMatmul(x, w, args.Comm, args.Counts, args.Mode);
        ctx.save_for_backward(new List<Tensor> { xg, w });
        ctx.save_data("args", args);
        return y;
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor dy)
    {
        var saved = ctx.get_saved_variables();
        var (xg, w) = (saved[0], saved[1]);
        var args = (RingArgs)ctx.get_data("args");
        return BackwardFailures.Guard(args.Comm, () =>
        {
            var dx = Rings.MatmulReduceScatter(dy, w.t(), args.Comm, args.Counts, args.Mode);
            var dw = dy.reshape(-1, dy.shape[^1]).t().matmul(xg.reshape(-1, xg.shape[^1]));
            return new List<Tensor> { dx, dw, null! };
        }, () => new List<Tensor> { Rows.Zeros(args.Counts[args.Comm.Rank], xg), torch.zeros_like(w), null! });
    }
}

/// <summary>
/// Autograd: forward matmul + reduce-scatter; backward the conjugate ring, all-gather + matmul, whose gathered
/// output gradient also gives the weight gradient.
/// </summary>
internal sealed class MatmulReduceScatterFunction : torch.autograd.SingleTensorFunction<MatmulReduceScatterFunction>
{
    public override string Name => nameof(MatmulReduceScatterFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (h, w, args) = ((Tensor)vars[0], (Tensor)vars[1], (RingArgs)vars[2]);
        ctx.save_for_backward(new List<Tensor> { h, w });
        ctx.save_data("args", args);
        return Rings.MatmulReduceScatter(h, w, args.Comm, args.Counts, args.Mode);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor dOut)
    {
        var saved = ctx.get_saved_variables();
        var (h, w) = (saved[0], saved[1]);
        var args = (RingArgs)ctx.get_data("args");
        return BackwardFailures.Guard(args.Comm, () =>
        {
            var (dh, dOutAll) = Rings.AllGatherMatmul(dOut, w.t(), args.Comm, args.Counts, args.Mode);
            var dw = dOutAll.reshape(-1, dOutAll.shape[^1]).t().matmul(h.reshape(-1, h.shape[^1]));
            return new List<Tensor> { dh, dw, null! };
        }, () => new List<Tensor> { torch.zeros_like(h), torch.zeros_like(w), null! });
    }
}

/// <summary>Forward: keep this rank's token chunk · backward: all-gather the chunks' gradients (the input was
/// computed identically on every rank, so each needs the full gradient).</summary>
internal sealed class ScatterTokensFunction : torch.autograd.SingleTensorFunction<ScatterTokensFunction>
{
    public override string Name => nameof(ScatterTokensFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, args) = ((Tensor)vars[0], (RingArgs)vars[1]);
        ctx.save_data("args", args);
        return x.narrow(0, TokenPartition.Start(args.Counts, args.Comm.Rank), args.Counts[args.Comm.Rank]).clone();
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var args = (RingArgs)ctx.get_data("args");
        return BackwardFailures.Guard(args.Comm, () => new List<Tensor> { args.Comm.AllGather(grad, args.Counts), null! },
            () => new List<Tensor> { Rows.Zeros(args.Counts.Sum(), grad), null! });
    }
}

/// <summary>Forward: all-gather the token chunks · backward: keep this rank's chunk of the gradient (what follows is
/// computed identically on every rank, so every rank already holds the full gradient; Megatron's
/// <c>_GatherFromSequenceParallelRegion</c> with <c>tensor_parallel_output_grad=False</c>).</summary>
internal sealed class GatherTokensFunction : torch.autograd.SingleTensorFunction<GatherTokensFunction>
{
    public override string Name => nameof(GatherTokensFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, args) = ((Tensor)vars[0], (RingArgs)vars[1]);
        ctx.save_data("args", args);
        return args.Comm.AllGather(x, args.Counts);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var args = (RingArgs)ctx.get_data("args");
        return new List<Tensor> { grad.narrow(0, TokenPartition.Start(args.Counts, args.Comm.Rank), args.Counts[args.Comm.Rank]).clone(), null! };
    }
}

/// <summary>Forward: all-gather a 2-D parameter's data-axis shards along <c>dim</c> · backward: reduce-scatter the
/// gradient along <c>dim</c> and divide by the data-axis size (ZeRO-3/FSDP; the mean over data-parallel ranks).</summary>
internal sealed class FsdpGatherFunction : torch.autograd.SingleTensorFunction<FsdpGatherFunction>
{
    public override string Name => nameof(FsdpGatherFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (shard, comm, counts, dim) = ((Tensor)vars[0], (ICommunicator)vars[1], (long[])vars[2], (int)vars[3]);
        ctx.save_data("comm", comm);
        ctx.save_data("counts", counts);
        ctx.save_data("dim", dim);
        ctx.save_data("shape", shard.shape);
        using var scope = torch.NewDisposeScope();
        var moved = dim == 0 ? shard : shard.transpose(0, dim).contiguous();
        var full = comm.AllGather(moved, counts);
        return (dim == 0 ? full : full.transpose(0, dim).contiguous()).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var (comm, counts, dim) = ((ICommunicator)ctx.get_data("comm"), (long[])ctx.get_data("counts"), (int)ctx.get_data("dim"));
        var shardShape = (long[])ctx.get_data("shape");
        return BackwardFailures.Guard(comm, () =>
        {
            var moved = dim == 0 ? grad : grad.transpose(0, dim).contiguous();
            var mine = comm.ReduceScatter(moved, counts).div_(comm.Size);
            return new List<Tensor> { dim == 0 ? mine : mine.transpose(0, dim).contiguous(), null!, null!, null! };
        }, () => new List<Tensor> { torch.zeros(shardShape, dtype: grad.dtype, device: grad.device), null!, null!, null! });
    }
}

/// <summary>The differentiable communication regions the sharded modules compose.</summary>
public static class Regions
{
    /// <summary>All-gather + matmul over the group (forward), matmul + reduce-scatter (backward).</summary>
    public static Tensor AllGatherMatmul(Tensor xLocal, Tensor w, ICommunicator comm, long[] counts, CommMode mode) =>
        AllGatherMatmulFunction.apply(xLocal, w, new RingArgs(comm, counts, mode));

    /// <summary>Matmul + reduce-scatter over the group (forward), all-gather + matmul (backward).</summary>
    public static Tensor MatmulReduceScatter(Tensor h, Tensor w, ICommunicator comm, long[] counts, CommMode mode) =>
        MatmulReduceScatterFunction.apply(h, w, new RingArgs(comm, counts, mode));

    /// <summary>Keep the own token chunk (forward), all-gather gradients (backward).</summary>
    public static Tensor ScatterTokens(Tensor x, ICommunicator comm, long[] counts) =>
        comm.Size == 1 ? x : ScatterTokensFunction.apply(x, new RingArgs(comm, counts, CommMode.Plain));

    /// <summary>All-gather token chunks (forward), keep the own chunk of the gradient (backward).</summary>
    public static Tensor GatherTokens(Tensor x, ICommunicator comm, long[] counts) =>
        comm.Size == 1 ? x : GatherTokensFunction.apply(x, new RingArgs(comm, counts, CommMode.Plain));

    /// <summary>All-gather a data-sharded parameter along <paramref name="dim"/> (forward), reduce-scatter and average
    /// its gradient (backward).</summary>
    public static Tensor FsdpGather(Tensor shard, ICommunicator dataComm, long[] counts, int dim) =>
        dataComm.Size == 1 ? shard : FsdpGatherFunction.apply(shard, dataComm, counts, dim);
}
