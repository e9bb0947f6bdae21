using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>The differentiable communication regions the sharded modules compose.</summary>
internal static class Regions
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

/// <summary>Arguments of the ring autograd functions (kept in the autograd context).</summary>
internal sealed record RingArgs(ICommunicator Comm, long[] Counts, CommMode Mode);

/// <summary>
/// Autograd: forward all-gather + matmul; backward the conjugate ring, matmul + reduce-scatter, for the input
/// gradient, and a local matmul for the weight gradient (docs/model.md#asynchronous-parallel-linear-operations).
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
            // Temporaries in locals: backward runs outside any dispose scope, and a tensor referenced only by a native
            // call's argument could be finalized during that call.
            using var wt = w.t();
            var dx = Rings.MatmulReduceScatter(dy, wt, args.Comm, args.Counts, args.Mode);
            using var dy2 = dy.reshape(-1, dy.shape[^1]);
            using var dyT = dy2.t();
            using var xg2 = xg.reshape(-1, xg.shape[^1]);
            var dw = dyT.matmul(xg2);
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
            using var wt = w.t();   // locals, as in AllGatherMatmulFunction.backward
            var (dh, dOutAll) = Rings.AllGatherMatmul(dOut, wt, args.Comm, args.Counts, args.Mode);
            using var gathered = dOutAll;
            using var g2 = gathered.reshape(-1, gathered.shape[^1]);
            using var gT = g2.t();
            using var h2 = h.reshape(-1, h.shape[^1]);
            var dw = gT.matmul(h2);
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
        using var mine = grad.narrow(0, TokenPartition.Start(args.Counts, args.Comm.Rank), args.Counts[args.Comm.Rank]);   // kept alive through the copy
        return new List<Tensor> { mine.clone(), null! };
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
        return comm.AllGatherAlong(shard, counts, dim);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var (comm, counts, dim) = ((ICommunicator)ctx.get_data("comm"), (long[])ctx.get_data("counts"), (int)ctx.get_data("dim"));
        var shardShape = (long[])ctx.get_data("shape");
        return BackwardFailures.Guard(comm, () =>
        {
            // Locals keep each transposed view alive through the native copy that reads it.
            using var gradT = dim == 0 ? null : grad.transpose(0, dim);
            var moved = gradT is null ? grad : gradT.contiguous();
            var mine = comm.ReduceScatter(moved, counts).div_(comm.Size);
            if (dim == 0) return new List<Tensor> { mine, null!, null!, null! };
            using var mineT = mine.transpose(0, dim);
            return new List<Tensor> { mineT.contiguous(), null!, null!, null! };
        }, () => new List<Tensor> { torch.zeros(shardShape, dtype: grad.dtype, device: grad.device), null!, null!, null! });
    }
}
