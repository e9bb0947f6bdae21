using TorchSharp;
using ViT22B.Layers;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Bucketed gradient synchronization gives the gradients of one all-reduce per gradient (written out in the
/// test) bit for bit, with one collective per bucket.</summary>
public class GradientBucketTests
{
    [Theory]
    [OnEveryBackend(2, 2, false)]
    [OnEveryBackend(2, 2, true)]
    [OnEveryBackend(4, 1, false)]
    [OnEveryBackend(1, 4, false)]
    public void Buckets_give_the_per_parameter_results_bit_for_bit(Backend backend, int data, int model, bool fsdp)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 3 };
        var plan = new ShardingPlan(c, model, data, fsdp);
        var full = TestUtil.RandomState(c, seed: 31, scale: 0.3, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 4, seed: 32, ScalarType.Float32);
        var results = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            long per = 4 / data;
            using (var scope = torch.NewDisposeScope())
                shard.Backward(shard.Forward(images.narrow(0, shard.DataIndex * per, per)).square().sum());
            var parameters = shard.Module.named_parameters().ToList();
            var local = parameters.Select(p => p.parameter.grad!.clone()).ToList();
            (Dictionary<string, Tensor> Grads, GradientSync Sync) Synchronize(long bucketBytes)
            {
                using (torch.no_grad())
                    for (int i = 0; i < parameters.Count; i++) parameters[i].parameter.grad!.copy_(local[i]);
                var sync = shard.SynchronizeGradients(bucketBytes);
                return (parameters.ToDictionary(p => p.name, p => p.parameter.grad!.clone()), sync);
            }
            // The reference, written out with the communicators: each partial gradient summed over the model axis, then
            // each gradient that is not data-sharded averaged over the data axis, one all-reduce per gradient.
            var shapes = plan.FullShapes();
            var reference = new Dictionary<string, Tensor>();
            using (torch.no_grad())
            {
                for (int i = 0; i < parameters.Count; i++)
                {
                    var (name, _) = parameters[i];
                    var g = local[i].clone();
                    if (plan.IsPartialOnModelAxis(name, shapes[name])) g = ctx.Model.AllReduce(g);
                    if (data > 1 && !plan.IsFsdpSharded(name, shapes[name])) g = ctx.Data.AllReduce(g).div_(data);
                    reference[name] = g;
                }
            }
            var eachAlone = Synchronize(0);
            var small = Synchronize(4096);
            var standard = Synchronize(ShardedVisionTransformer.DefaultBucketBytes);
            var (modelAxis, dataAxis) = (parameters.Count(p => plan.IsPartialOnModelAxis(p.name, plan.FullShapes()[p.name])),
                data > 1 ? parameters.Count(p => !plan.IsFsdpSharded(p.name, plan.FullShapes()[p.name])) : 0);
            return (eachAlone, small, standard, modelAxis, dataAxis, Bytes: parameters.Sum(p => p.parameter.numel() * 4), reference);
        });
        foreach (var r in results)
        {
            foreach (var (key, g) in r.eachAlone.Grads)
            {
                Assert.True(TensorAssert.Same(r.reference[key], g), $"{key}: per-parameter synchronization differs from the written-out reference");
                Assert.True(TensorAssert.Same(g, r.small.Grads[key]), $"{key}: 4 KiB buckets differ from per-parameter synchronization");
                Assert.True(TensorAssert.Same(g, r.standard.Grads[key]), $"{key}: 25 MiB buckets differ from per-parameter synchronization");
            }
            Assert.Equal(r.modelAxis, r.eachAlone.Sync.ModelAxisCollectives);
            Assert.Equal(r.dataAxis, r.eachAlone.Sync.DataAxisCollectives);
            Assert.Equal(r.modelAxis > 0 ? 1 : 0, r.standard.Sync.ModelAxisCollectives);    // the whole model fits one 25 MiB bucket
            Assert.Equal(r.dataAxis > 0 ? 1 : 0, r.standard.Sync.DataAxisCollectives);
            // 4 KiB buckets: the small model-axis gradients (norm scales, biases) share buckets, the data axis's weights need
            // several.
            Assert.InRange(r.small.Sync.Collectives, r.standard.Sync.Collectives, r.eachAlone.Sync.Collectives);
            if (r.dataAxis > 0) Assert.InRange(r.small.Sync.DataAxisCollectives, r.standard.Sync.DataAxisCollectives + 1, r.eachAlone.Sync.DataAxisCollectives - 1);
            Assert.Equal(r.eachAlone.Sync.ModelAxisBytes, r.standard.Sync.ModelAxisBytes);
            Assert.Equal(r.eachAlone.Sync.DataAxisBytes, r.small.Sync.DataAxisBytes);
            Assert.True(r.dataAxis == 0 || r.eachAlone.Sync.DataAxisBytes > 0);
        }
        Assert.Contains(results, r => r.modelAxis + r.dataAxis > 0);
    }

    [Theory]
    [OnEveryBackend(2, 1, BlockKind.Parallel, "none")]
    [OnEveryBackend(3, 1, BlockKind.Parallel, "none")]
    [OnEveryBackend(2, 2, BlockKind.Parallel, "none")]
    [OnEveryBackend(2, 2, BlockKind.Sequential, "all")]
    public void Fsdp_buckets_give_the_per_gradient_reduce_scatters_results_bit_for_bit(Backend backend, int data, int model, BlockKind block, string recompute)
    {
        var c = ShardedModelTests.Config(block) with { Depth = 3 };
        var plan = new ShardingPlan(c, model, data, fsdp: true);
        var full = TestUtil.RandomState(c, seed: 33, scale: 0.3, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 4, seed: 34, ScalarType.Float32);
        var results = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            shard.Module.Checkpointing = ActivationCheckpointing.Parse(recompute);
            long per = 4 / data;
            var isSharded = shard.Module.named_parameters().Where(p => plan.IsFsdpSharded(p.name, plan.FullShapes()[p.name])).ToList();
            // The gradients before reduce-scatter (model-axis shards), the same on every data rank: every rank must
            // use the same bucket size (a data rank's own shards differ in size when the rows do not divide evenly).
            var modelOnly = new ShardingPlan(c, model);
            long fsdpBytes = isSharded.Sum(p => modelOnly.Spec(p.name, plan.FullShapes()[p.name], shard.ModelIndex, 0).LocalShape.Aggregate(4L, (a, n) => a * n));
            var steps = new List<(Dictionary<string, Tensor> Grads, GradientSync Sync)>();
            foreach (long bytes in new[] { 0, fsdpBytes / 3, ShardedVisionTransformer.DefaultBucketBytes })
            {
                shard.FsdpBucketBytes = bytes;
                foreach (var p in shard.Module.parameters()) p.grad = null;
                using (var scope = torch.NewDisposeScope())
                    shard.Backward(shard.Forward(images.narrow(0, shard.DataIndex * per, per)).square().sum());
                var sync = shard.SynchronizeGradients();
                steps.Add((shard.Module.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone()), sync));
            }
            return (Steps: steps, Sharded: isSharded.Count);
        });
        foreach (var (steps, sharded) in results)
        {
            var (eachAlone, small, standard) = (steps[0], steps[1], steps[2]);
            foreach (var (key, g) in eachAlone.Grads)
            {
                Assert.True(TensorAssert.Same(g, small.Grads[key]), $"{key}: FSDP buckets of a third of the gradients differ from one reduce-scatter per gradient");
                Assert.True(TensorAssert.Same(g, standard.Grads[key]), $"{key}: 25 MiB FSDP buckets differ from one reduce-scatter per gradient");
            }
            Assert.True(sharded > 1);
            Assert.Equal(sharded, eachAlone.Sync.FsdpReduceScatters);
            Assert.Equal(1, standard.Sync.FsdpReduceScatters);                              // the whole model fits one bucket
            Assert.InRange(small.Sync.FsdpReduceScatters, 2, Math.Min(4, sharded - 1));     // a bucket closes at a third or more
            // A gradient is reduced once, by itself or in a bucket (recomputation does not repeat it).
            Assert.Equal(eachAlone.Sync.FsdpBytes, standard.Sync.FsdpBytes);
            Assert.Equal(eachAlone.Sync.FsdpBytes, small.Sync.FsdpBytes);
        }
    }

    [Theory]
    [OnEveryBackend]
    public void A_negative_bucket_size_is_refused(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        Backends.Run(backend, new DeviceMesh(1, 1), ctx =>
        {
            using var shard = new ShardedVisionTransformer(new ShardingPlan(c, 1), ctx, CommMode.Overlapped, ScalarType.Float32);
            Assert.Throws<ArgumentOutOfRangeException>(() => shard.SynchronizeGradients(-1));
            Assert.Throws<ArgumentOutOfRangeException>(() => shard.FsdpBucketBytes = -1);
            return 0;
        });
    }
}
