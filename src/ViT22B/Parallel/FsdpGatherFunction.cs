using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>Arguments of <see cref="FsdpGatherFunction"/> (kept in the autograd context as one object: TorchSharp
/// prints a warning for every tensor saved with <c>save_data</c>). <paramref name="Shard"/> is the data-sharded
/// parameter itself, whose gradient the buckets add to; <paramref name="Counts"/> every data rank's size along
/// <paramref name="Dim"/>.</summary>
internal sealed record FsdpGatherArgs(Tensor Shard, ICommunicator Comm, long[] Counts, int Dim, DataGradientBuckets Buckets);

/// <summary>Forward: all-gather a 2-D parameter's data-axis shards along <c>dim</c> · backward: the gradient joins the
/// rank's reduce-scatter buckets (<see cref="DataGradientBuckets"/>), which reduce-scatter it along <c>dim</c> over the
/// data axis while backward goes on, divide by the data-axis size (ZeRO-3/FSDP; the mean over data-parallel ranks) and
/// add the shard to the parameter's gradient; autograd gives the parameter zeros.</summary>
internal sealed class FsdpGatherFunction : torch.autograd.SingleTensorFunction<FsdpGatherFunction>
{
    public override string Name => nameof(FsdpGatherFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var args = (FsdpGatherArgs)vars[1];
        ctx.save_data("args", args);
        return args.Comm.AllGatherAlong(args.Shard, args.Counts, args.Dim);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var args = (FsdpGatherArgs)ctx.get_data("args");
        var (shardShape, dtype, device) = (args.Shard.shape, grad.dtype, grad.device);
        List<Tensor> Zeros() => new() { DataGradientBuckets.ZeroGradient(shardShape, dtype, device), null! };
        return BackwardFailures.Guard(args.Comm, () =>
        {
            // The incoming handle is taken out of the dispose scope TorchSharp registered it in and released as soon as
            // the buckets own the gradient (or its transposed copy), not when that scope ends (see DataReplicaFunction).
            var owned = grad.DetachFromDisposeScope();
            Tensor rows = owned;
            if (args.Dim != 0)
            {
                using (owned)
                using (var transposed = owned.transpose(0, args.Dim))   // a local: kept alive through the native copy
                    rows = transposed.contiguous().DetachFromDisposeScope();
            }
            args.Buckets.AddShard(args.Comm, args.Shard, rows, args.Counts, args.Dim);
            return Zeros();
        }, Zeros);
    }
}
