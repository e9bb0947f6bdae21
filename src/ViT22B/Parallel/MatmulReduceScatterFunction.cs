using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

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
