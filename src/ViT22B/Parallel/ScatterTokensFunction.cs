using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

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
