using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Bucketed gradient reduction — in backward for the block weights' data-axis gradients, after it for the rest —
/// gives the gradients of one collective per gradient (written out in the test) bit for bit, with one collective per
/// bucket, and backward issues its buckets while it runs without waiting for them where they are issued.</summary>
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
        var shapes = plan.FullShapes();
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries, the batches handed to the ranks among them
        var full = TestUtil.RandomState(c, seed: 31, scale: 0.3, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 4, seed: 32, ScalarType.Float32);
        long per = 4 / data;
        var local = Enumerable.Range(0, data).Select(d => LocalGradients(backend, c, model, full, images.narrow(0, d * per, per), "none")).ToArray();
        var blockWeights = shapes.Count(kv => kv.Key.StartsWith("blocks.", StringComparison.Ordinal) && kv.Value.Length == 2);
        var results = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            // The reference, written out with the communicators: each partial gradient summed over the model axis, then
            // each gradient averaged over the data axis, one all-reduce per gradient, and FSDP's shard cut from it.
            var reference = new Dictionary<string, Tensor>();
            using (torch.no_grad())
            {
                foreach (var (name, g0) in local[shard.DataIndex][shard.ModelIndex])
                {
                    var g = g0.clone();
                    if (plan.IsPartialOnModelAxis(name, shapes[name])) g = ctx.Model.AllReduce(g);
                    if (data > 1) g = ctx.Data.AllReduce(g).DivideInPlace(data);
                    if (plan.IsFsdpSharded(name, shapes[name]))
                    {
                        var (counts, dim) = (plan.FsdpCounts(name, shapes[name], shard.ModelIndex), plan.FsdpDim(name, shapes[name]));
                        g = g.narrow(dim, counts.Take(shard.DataIndex).Sum(), counts[shard.DataIndex]);
                    }
                    reference[name] = g;
                }
            }
            (Dictionary<string, Tensor> Grads, GradientSync Sync) Step(long bucketBytes)
            {
                shard.BackwardBucketBytes = bucketBytes;
                foreach (var p in shard.Module.parameters()) p.grad = null;
                using (var scope = torch.NewDisposeScope())
                    shard.Backward(shard.Forward(images.narrow(0, shard.DataIndex * per, per)).Squared().sum());
                var sync = shard.SynchronizeGradients(bucketBytes);
                using var gradScope = torch.NewDisposeScope();
                return (shard.Module.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone().DetachFromDisposeScope()), sync);
            }
            var eachAlone = Step(0);
            var small = Step(4096);
            var standard = Step(ShardedVisionTransformer.DefaultBucketBytes);
            var names = shard.Module.named_parameters().Select(p => p.name).ToList();
            var (modelAxis, dataAxis, fsdpSharded) = (names.Count(n => plan.IsPartialOnModelAxis(n, shapes[n])),
                data > 1 ? names.Count(n => !plan.IsFsdpSharded(n, shapes[n])) : 0, names.Count(n => plan.IsFsdpSharded(n, shapes[n])));
            return (eachAlone, small, standard, modelAxis, dataAxis, fsdpSharded, reference);
        });
        int inBackward = data > 1 && !fsdp ? blockWeights : 0;
        foreach (var r in results)
        {
            foreach (var (key, g) in r.eachAlone.Grads)
            {
                Assert.True(TensorAssert.Same(r.reference[key], g), $"{key}: per-parameter reduction differs from the written-out reference");
                Assert.True(TensorAssert.Same(g, r.small.Grads[key]), $"{key}: 4 KiB buckets differ from per-parameter reduction");
                Assert.True(TensorAssert.Same(g, r.standard.Grads[key]), $"{key}: 25 MiB buckets differ from per-parameter reduction");
            }
            Assert.Equal(r.modelAxis, r.eachAlone.Sync.ModelAxisCollectives);
            Assert.Equal(r.dataAxis, r.eachAlone.Sync.DataAxisCollectives);
            Assert.Equal(inBackward, r.eachAlone.Sync.DataAxisInBackward);
            Assert.Equal(r.fsdpSharded, r.eachAlone.Sync.FsdpReduceScatters);
            // 25 MiB: the whole model fits one bucket per axis and place — the block weights' in backward, the rest after.
            Assert.Equal(r.modelAxis > 0 ? 1 : 0, r.standard.Sync.ModelAxisCollectives);
            Assert.Equal(inBackward > 0 ? 1 : 0, r.standard.Sync.DataAxisInBackward);
            Assert.Equal((r.dataAxis > inBackward ? 1 : 0) + (inBackward > 0 ? 1 : 0), r.standard.Sync.DataAxisCollectives);
            Assert.Equal(r.fsdpSharded > 0 ? 1 : 0, r.standard.Sync.FsdpReduceScatters);
            // 4 KiB buckets: the small gradients share buckets, the weights need several.
            Assert.InRange(r.small.Sync.Collectives, r.standard.Sync.Collectives, r.eachAlone.Sync.Collectives);
            if (r.dataAxis > 0) Assert.InRange(r.small.Sync.DataAxisCollectives, r.standard.Sync.DataAxisCollectives + 1, r.eachAlone.Sync.DataAxisCollectives - 1);
            Assert.Equal(r.eachAlone.Sync.ModelAxisBytes, r.standard.Sync.ModelAxisBytes);
            Assert.Equal(r.eachAlone.Sync.DataAxisBytes, r.small.Sync.DataAxisBytes);
            Assert.Equal(r.eachAlone.Sync.FsdpBytes, r.standard.Sync.FsdpBytes);
            Assert.True(r.dataAxis == 0 || r.eachAlone.Sync.DataAxisBytes > 0);
        }
        Assert.Contains(results, r => r.modelAxis + r.dataAxis > 0);
    }

    /// <summary>A rank's gradients before any reduction, by model index: those of the model-axis-only shard on the
    /// rank's part of the batch (no data axis, so nothing is reduced in backward), with the same recomputation.</summary>
    private static Dictionary<string, Tensor>[] LocalGradients(Backend backend, ViTConfig c, int model, Dictionary<string, Tensor> full, Tensor batch, string recompute) =>
        Backends.Run(backend, new DeviceMesh(1, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(new ShardingPlan(c, model), ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            shard.Module.Checkpointing = ActivationCheckpointing.Parse(recompute);
            using (var scope = torch.NewDisposeScope())
                shard.Backward(shard.Forward(batch).Squared().sum());
            using var gradScope = torch.NewDisposeScope();
            return shard.Module.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone().DetachFromDisposeScope());
        });

    [Theory]
    [OnEveryBackend(BlockKind.Parallel)]
    [OnEveryBackend(BlockKind.Sequential)]
    public void Recomputed_blocks_and_two_passes_give_the_written_out_reduction_bit_for_bit(Backend backend, BlockKind block)
    {
        const int data = 2, model = 2;
        var c = ShardedModelTests.Config(block) with { Depth = 3 };
        var plan = new ShardingPlan(c, model, data);
        var shapes = plan.FullShapes();
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries, the batches handed to the ranks among them
        var full = TestUtil.RandomState(c, seed: 37, scale: 0.3, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 8, seed: 38, ScalarType.Float32);
        Tensor Batch(int pass, int d) => images.narrow(0, 4 * pass + 2 * d, 2);
        // local[pass][d][m]: each rank's unreduced gradients of each pass.
        var local = Enumerable.Range(0, 2).Select(pass => Enumerable.Range(0, data)
            .Select(d => LocalGradients(backend, c, model, full, Batch(pass, d), "all")).ToArray()).ToArray();
        bool InBackward(string key) => key.StartsWith("blocks.", StringComparison.Ordinal) && shapes[key].Length == 2;
        var failures = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            shard.Module.Checkpointing = ActivationCheckpointing.Parse("all");
            shard.BackwardBucketBytes = 4096;
            for (int pass = 0; pass < 2; pass++)
            {
                using var scope = torch.NewDisposeScope();
                shard.Backward(shard.Forward(Batch(pass, shard.DataIndex)).Squared().sum());
            }
            var sync = shard.SynchronizeGradients(4096);
            var wrong = new List<string>();
            using (torch.no_grad())
            {
                foreach (var (name, p) in shard.Module.named_parameters())
                {
                    using var scope = torch.NewDisposeScope();
                    var (g1, g2) = (local[0][shard.DataIndex][shard.ModelIndex][name], local[1][shard.DataIndex][shard.ModelIndex][name]);
                    Tensor expected;
                    if (InBackward(name))       // each pass averaged over the data axis as backward produces it, then summed
                        expected = ctx.Data.AllReduce(g1).DivideInPlace(data).Plus(ctx.Data.AllReduce(g2).DivideInPlace(data));
                    else                        // accumulated over both passes, then summed over the model axis and averaged
                    {
                        var g = g1.Plus(g2);
                        if (plan.IsPartialOnModelAxis(name, shapes[name])) g = ctx.Model.AllReduce(g);
                        expected = ctx.Data.AllReduce(g).DivideInPlace(data);
                    }
                    if (!TensorAssert.Same(expected, p.grad!)) wrong.Add($"rank ({shard.DataIndex}, {shard.ModelIndex}) {name}");
                }
            }
            if (sync.DataAxisInBackward < 2) wrong.Add($"only {sync.DataAxisInBackward} all-reduces in backward");
            return wrong;
        }).SelectMany(w => w).ToList();
        Assert.True(failures.Count == 0, "differ from the written-out reduction: " + string.Join(", ", failures));
    }

    [Theory]
    [OnEveryBackend]
    public void A_recomputation_that_fails_on_one_data_rank_issues_no_further_data_axis_collective_there(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 3 };
        var plan = new ShardingPlan(c, 1, 2);
        var full = TestUtil.RandomState(c, seed: 39, scale: 0.3, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 4, seed: 40, ScalarType.Float32);
        var results = Backends.Run(backend, new DeviceMesh(2, 1), ctx =>
        {
            var log = new List<(string Axis, string Event, int Id)>();
            var rank = new RankContext(ctx.Mesh, ctx.Rank, ctx.Model, new RecordingCommunicator(ctx.Data, "data", log));
            using var shard = new ShardedVisionTransformer(plan, rank, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            shard.Module.Checkpointing = ActivationCheckpointing.Blocks(1);
            shard.BackwardBucketBytes = 0;                     // one all-reduce per weight: the blocks' weights match in shape
            int issuedAtFailure = -1;
            var block = (nn.Module<Tensor, long[], Tensor>)shard.Module.named_modules().Single(m => m.name == "blocks.1").module;
            var hook = block.register_forward_pre_hook((_, x, counts) =>
            {
                if (!torch.is_grad_enabled() || shard.DataIndex != 0) return (x, counts);
                issuedAtFailure = log.Count;
                throw new InvalidOperationException("injected on data rank 0");
            });
            using var scope = torch.NewDisposeScope();
            var loss = shard.Forward(images.narrow(0, 2 * shard.DataIndex, 2)).Squared().sum();
            Exception? thrown = Record.Exception(() => shard.Backward(loss));
            hook.remove();
            return (Thrown: thrown, IssuedAtFailure: issuedAtFailure, Issued: log.Count(e => e.Event != "wait"));
        }, timeout: TimeSpan.FromSeconds(5));
        // The failing rank stops issuing on the data axis where it failed (its remaining buckets would pair with its peer's
        // buckets of other weights); its peer's collectives fail instead of completing.
        Assert.Equal("injected on data rank 0", Assert.IsType<InvalidOperationException>(results[0].Thrown).Message);
        Assert.Equal(results[0].IssuedAtFailure, results[0].Issued);
        Assert.IsType<CommunicatorException>(results[1].Thrown);
    }

    [Theory]
    [OnEveryBackend(false)]
    [OnEveryBackend(true)]
    public void Backward_issues_its_buckets_as_it_goes_and_waits_for_each_only_after_the_next(Backend backend, bool fsdp)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 3 };
        var plan = new ShardingPlan(c, 2, 2, fsdp);
        var full = TestUtil.RandomState(c, seed: 35, scale: 0.3, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 4, seed: 36, ScalarType.Float32);
        var results = Backends.Run(backend, new DeviceMesh(2, 2), ctx =>
        {
            var log = new List<(string Axis, string Event, int Id)>();
            var rank = new RankContext(ctx.Mesh, ctx.Rank, new RecordingCommunicator(ctx.Model, "model", log), new RecordingCommunicator(ctx.Data, "data", log));
            using var shard = new ShardedVisionTransformer(plan, rank, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            shard.BackwardBucketBytes = 1024;                  // several buckets: every weight is 1 KiB or more
            using var scope = torch.NewDisposeScope();
            var loss = shard.Forward(images.narrow(0, shard.DataIndex * 2, 2)).Squared().sum();
            int beforeBackward = log.Count;
            loss.backward();                                   // not Backward(): the log shows what backward itself issued
            int afterBackward = log.Count;
            var sync = shard.SynchronizeGradients();
            return (Log: log.ToArray(), beforeBackward, afterBackward, sync);
        });
        foreach (var (log, beforeBackward, afterBackward, sync) in results)
        {
            var inBackward = log.Take(afterBackward).Skip(beforeBackward).ToList();
            var dataIssues = inBackward.Where(e => e.Axis == "data" && e.Event != "wait").ToList();
            Assert.True(dataIssues.Count >= 3, $"backward issued {dataIssues.Count} data-axis collectives; at least 3 of the {sync.InBackward} buckets should go out during the pass");
            Assert.All(dataIssues, e => Assert.Equal(fsdp ? "reduce-scatter" : "all-reduce", e.Event));
            // Interleaved with the pass's own model-axis traffic: the first bucket goes out before the earlier blocks'
            // rings run, not after backward.
            int firstData = inBackward.FindIndex(e => e.Axis == "data" && e.Event != "wait");
            int lastModel = inBackward.FindLastIndex(e => e.Axis == "model" && e.Event != "wait");
            Assert.True(firstData < lastModel, "the first data-axis bucket was issued after the last model-axis collective of backward");
            // Each bucket is waited for only after the next one was issued, and never more than two are outstanding.
            var data = log.Skip(beforeBackward).Where(e => e.Axis == "data").ToList();
            var issued = data.Where(e => e.Event != "wait").Select(e => e.Id).ToList();
            int outstanding = 0;
            foreach (var e in data)
            {
                outstanding += e.Event == "wait" ? -1 : 1;
                Assert.InRange(outstanding, 0, 2);
            }
            for (int i = 0; i + 1 < sync.InBackward; i++)
            {
                int waited = data.FindIndex(e => e.Event == "wait" && e.Id == issued[i]);
                int next = data.FindIndex(e => e.Event != "wait" && e.Id == issued[i + 1]);
                Assert.True(waited > next, $"bucket {i} was waited for before bucket {i + 1} was issued");
            }
            Assert.Equal(fsdp ? 0 : sync.InBackward, sync.DataAxisInBackward);
        }
    }

    /// <summary>Passes every call on and logs the issue and the wait of each operation, in order, with an id.</summary>
    private sealed class RecordingCommunicator(ICommunicator inner, string axis, List<(string Axis, string Event, int Id)> log) : ICommunicator
    {
        private int _next;

        public int Rank => inner.Rank;
        public int Size => inner.Size;
        public string Name => inner.Name;

        private ICommWork Record(string kind, ICommWork work)
        {
            int id = _next++;
            log.Add((axis, kind, id));
            return new Work(work, () => log.Add((axis, "wait", id)));
        }

        public ICommWork AllGatherAsync(Tensor local, IReadOnlyList<long>? counts = null) => Record("all-gather", inner.AllGatherAsync(local, counts));
        public ICommWork ReduceScatterAsync(Tensor full, IReadOnlyList<long> counts) => Record("reduce-scatter", inner.ReduceScatterAsync(full, counts));
        public ICommWork AllReduceAsync(Tensor tensor) => Record("all-reduce", inner.AllReduceAsync(tensor));
        public ICommWork BroadcastAsync(Tensor tensor, int root) => Record("broadcast", inner.BroadcastAsync(tensor, root));
        public ICommWork PermuteAsync(Tensor send, int shift, long receiveRows = -1) => Record("permute", inner.PermuteAsync(send, shift, receiveRows));
        public void Barrier() => inner.Barrier();
        public void Abort(Exception reason) => inner.Abort(reason);
        public void Synchronize() => inner.Synchronize();

        private sealed class Work(ICommWork inner, Action onWait) : ICommWork
        {
            private bool _waited;

            public Tensor Wait()
            {
                _waited = true;
                onWait();
                return inner.Wait();
            }

            public void Dispose()
            {
                if (!_waited) onWait();
                _waited = true;
                inner.Dispose();
            }
        }
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
                shard.BackwardBucketBytes = bytes;
                foreach (var p in shard.Module.parameters()) p.grad = null;
                using (var scope = torch.NewDisposeScope())
                    shard.Backward(shard.Forward(images.narrow(0, shard.DataIndex * per, per)).Squared().sum());
                var sync = shard.SynchronizeGradients();
                using var gradScope = torch.NewDisposeScope();
                steps.Add((shard.Module.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone().DetachFromDisposeScope()), sync));
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
            Assert.Throws<ArgumentOutOfRangeException>(() => shard.BackwardBucketBytes = -1);
            return 0;
        });
    }
}
