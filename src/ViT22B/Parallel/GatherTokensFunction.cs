using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

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
