using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>Arguments of <see cref="DataReplicaFunction"/> (kept in the autograd context as one object: TorchSharp
/// prints a warning for every tensor saved with <c>save_data</c>): the parameter itself, whose gradient the buckets
/// add to, and its state-dict key.</summary>
internal sealed record DataReplicaArgs(Tensor Parameter, string Key, ICommunicator Comm, DataGradientBuckets Buckets);

/// <summary>Forward: a data-replicated parameter as it is (an alias) · backward: its gradient joins the rank's
/// all-reduce buckets (<see cref="DataGradientBuckets"/>), which average it over the data axis while backward goes on
/// and add the result to the parameter's gradient; autograd gives the parameter zeros. This is the gradient-ready hook
/// that TorchSharp does not offer on tensors: the node runs once this pass's gradient of the parameter is complete.</summary>
internal sealed class DataReplicaFunction : torch.autograd.SingleTensorFunction<DataReplicaFunction>
{
    public override string Name => nameof(DataReplicaFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var args = (DataReplicaArgs)vars[1];
        ctx.save_data("args", args);
        return args.Parameter.alias();
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var args = (DataReplicaArgs)ctx.get_data("args");
        var (shape, dtype, device) = (args.Parameter.shape, grad.dtype, grad.device);
        List<Tensor> Zeros() => new() { DataGradientBuckets.ZeroGradient(shape, dtype, device), null! };
        return BackwardFailures.Guard(args.Comm, () =>
        {
            // The buckets take this handle over, out of the dispose scope TorchSharp registered it in, so the gradient
            // is freed once its bucket has been flattened rather than when that scope ends (on a GPU's autograd thread
            // there is none, and only the garbage collector would free it).
            args.Buckets.AddReplica(args.Comm, args.Key, args.Parameter, grad.DetachFromDisposeScope());
            return Zeros();
        }, Zeros);
    }
}
