using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>Forward: all-gather a 2-D parameter's data-axis shards along <c>dim</c> · backward: reduce-scatter the
/// gradient along <c>dim</c> and divide by the data-axis size (ZeRO-3/FSDP; the mean over data-parallel ranks), on its
/// own, or in a bucket with the next ones (<see cref="FsdpGradientBuckets"/>: autograd then gives the parameter zeros
/// and the bucket adds the shard to its gradient).</summary>
internal sealed class FsdpGatherFunction : torch.autograd.SingleTensorFunction<FsdpGatherFunction>
{
    public override string Name => nameof(FsdpGatherFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (shard, comm, counts, dim, buckets) = ((Tensor)vars[0], (ICommunicator)vars[1], (long[])vars[2], (int)vars[3], (FsdpGradientBuckets)vars[4]);
        ctx.save_data("parameter", shard);
        ctx.save_data("buckets", buckets);
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
        var (parameter, buckets) = ((Tensor)ctx.get_data("parameter"), (FsdpGradientBuckets)ctx.get_data("buckets"));
        List<Tensor> Zeros() => new() { torch.zeros(shardShape, dtype: grad.dtype, device: grad.device), null!, null!, null!, null! };
        return BackwardFailures.Guard(comm, () =>
        {
            // Locals keep each transposed view alive through the native copy that reads it.
            using var gradT = dim == 0 ? null : grad.transpose(0, dim);
            var moved = gradT is null ? grad : gradT.contiguous();
            if (buckets.BucketBytes > 0)
            {
                buckets.Add(comm, parameter, (ReferenceEquals(moved, grad) ? grad.detach() : moved).DetachFromDisposeScope(), counts, dim);
                return Zeros();
            }
            var mine = buckets.ReduceOne(comm, moved, counts);
            if (dim == 0) return new List<Tensor> { mine, null!, null!, null!, null! };
            using var mineT = mine.transpose(0, dim);
            return new List<Tensor> { mineT.contiguous(), null!, null!, null!, null! };
        }, Zeros);
    }
}
