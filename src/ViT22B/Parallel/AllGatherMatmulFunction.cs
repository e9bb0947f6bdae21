using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

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
