using System.Runtime.InteropServices;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Training;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Performance;

/// <summary>The memory planner against bytes actually allocated (glibc's allocator statistics) for small presets.</summary>
[Collection("process-wide counters")]
public class MemoryPlannerTests
{
    [StructLayout(LayoutKind.Sequential)]
    private struct MallInfo2
    {
        public nuint Arena, Ordblks, Smblks, Hblks, Hblkhd, Usmblks, Fsmblks, Uordblks, Fordblks, Keepcost;
    }

    [DllImport("libc", EntryPoint = "mallinfo2")]
    private static extern MallInfo2 NativeMallInfo2();

    [DllImport("libc", EntryPoint = "mallopt")]
    private static extern int MallOpt(int param, int value);

    private const int MmapThreshold = -3;   // glibc's M_MMAP_THRESHOLD

    /// <summary>Bytes currently allocated through malloc (main arena plus mmapped blocks), after a full GC unless
    /// <paramref name="collect"/> is false (then tensors that only a finalizer would free still count).</summary>
    private static long Allocated(bool collect = true)
    {
        if (collect)
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
        }
        var m = NativeMallInfo2();
        return (long)(m.Uordblks + m.Hblkhd);
    }

    private static bool HaveMallInfo2()
    {
        try { NativeMallInfo2(); return OperatingSystem.IsLinux(); }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException) { return false; }
    }

    [Theory]
    [InlineData("Ti/16", BlockKind.Parallel, ScalarType.Float32)]
    [InlineData("Ti/16", BlockKind.Sequential, ScalarType.Float32)]
    [InlineData("S/16", BlockKind.Parallel, ScalarType.BFloat16)]
    [InlineData("S/16", BlockKind.Sequential, ScalarType.Float32)]
    public void Training_memory_matches_measured_allocation(string preset, BlockKind block, ScalarType dtype)
    {
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        // mallinfo2 sees the main arena and every mmapped block; this test thread allocates from another arena, so
        // route every allocation of 4 KiB or more through mmap while measuring (restored to glibc's default after).
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));
        try
        {
            Measure(preset, block, dtype);
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32, 1.15, 1.4)]
    [InlineData(ScalarType.BFloat16, 1.35, 1.7)]
    public void The_planner_underestimates_a_ViT22B_block_s_saved_activations(ScalarType dtype, double low, double high)
    {
        // A known gap, pinned until the planner models it: ViT-22B's block (QK-norm, scale-only RMSNorm computed in
        // float32 for 16-bit inputs, a separate MLP bias whose sum GELU keeps) saves more than the planner's per-block
        // count, which the LayerNorm presets above match. Measured 2026-12-03: 1.26 (float32) and 1.53 (bfloat16) times
        // the planned activations. When the planner is fixed this test fails and its cases join the test above.
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));
        try
        {
            Measure("22B-small", BlockKind.Parallel, dtype, (low, high));
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
        }
    }

    private static void Measure(string preset, BlockKind block, ScalarType dtype, (double Low, double High)? activationRatio = null)
    {
        // "22B-small": ViT-22B's block (QK-norm, scale-only RMSNorm, no QKV bias, a separate MLP bias) at Ti/16's width.
        var c = preset == "22B-small" ? ViTConfig.Parse("22B/14") with { EmbedDim = 192, NumHeads = 3, MlpDim = 768, Depth = 4 }
            : ViTConfig.Parse(preset) with { Block = block };
        const int batch = 4;
        var plan = MemoryPlanner.Plan(c, dtype, batch, training: true);
        // The allocation being measured is deterministic; other threads of the process (the runtime's background
        // compiler, libtorch's pools) now and then allocate or free a few MiB between two readings. So each reading is
        // repeated until three repetitions agree (see Consensus), and the stray ones are left out.
        static (T Kept, long Bytes) Measured<T>(Func<T> make) where T : IDisposable
        {
            T kept = default!;
            bool first = true;
            long bytes = Consensus(() =>
            {
                if (!first) kept.Dispose();
                first = false;
                long before = Allocated();
                kept = make();
                return Allocated() - before;
            });
            return (kept, bytes);
        }
        var (model, weights) = Measured(() => new VisionTransformer(c, torch.CPU, dtype));
        using var modelOwner = model;
        using var images = torch.randn(batch, 3, 224, 224).to(dtype);
        using var labels = ScalarMath.Arange(batch, ScalarType.Int64, torch.CPU);
        // The library's AdamW allocates its moments (and a float32 master copy of 16-bit parameters) here.
        var (optimizer, optimizerState) = Measured(() => new AdamW(Optimizer.WithWeightDecay(model, 0.05, 0.05)));
        using var optimizerOwner = optimizer;
        void Step(Action<long>? afterForward = null)
        {
            using var scope = torch.NewDisposeScope();
            long before = Allocated();
            var loss = nn.functional.cross_entropy(model.call(images).to(ScalarType.Float32), labels);
            afterForward?.Invoke(Allocated() - before);     // what autograd keeps for backward
            loss.backward();
            optimizer.Step(1e-4);
        }
        Step();                                              // gradients and one-time workspaces now exist
        long saved = Consensus(() =>
        {
            long delta = 0;
            Step(d => delta = d);
            return delta;
        });
        long gradients = model.parameters().Sum(p => p.grad!.numel() * p.grad.element_size());

        string ratios = $"weights {(double)weights / plan.Weights:F3}, optimizer {(double)optimizerState / plan.OptimizerState:F3}, " +
                        $"gradients {(double)gradients / plan.Gradients:F3}, saved activations {(double)saved / plan.Activations:F3}";
        Assert.True((double)weights / plan.Weights is > 0.98 and < 1.05, ratios);
        Assert.True((double)optimizerState / plan.OptimizerState is > 0.98 and < 1.05, ratios);
        Assert.Equal(plan.Gradients, gradients);
        // The planned activations add one block's working set to the saved tensors: measured saved ≈ 0.85–1.0 of it.
        var (low, high) = activationRatio ?? (0.85, 1.1);
        Assert.True((double)saved / plan.Activations > low && (double)saved / plan.Activations < high, ratios);
    }

    [Theory]
    [InlineData("Ti/16", BlockKind.Parallel, ScalarType.Float32, "all")]
    [InlineData("Ti/16", BlockKind.Sequential, ScalarType.Float32, "every:3")]
    [InlineData("S/16", BlockKind.Parallel, ScalarType.BFloat16, "every:2")]
    public void Checkpointing_reduces_saved_activations_as_planned(string preset, BlockKind block, ScalarType dtype, string set)
    {
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));      // as in Training_memory_matches_measured_allocation
        try
        {
            var c = ViTConfig.Parse(preset) with { Block = block };
            const int batch = 4;
            var checkpointing = ActivationCheckpointing.Parse(set);
            var kept = MemoryPlanner.Plan(c, dtype, batch, training: true);
            var recomputed = MemoryPlanner.Plan(c, dtype, batch, training: true, checkpointing: checkpointing);
            using var model = new VisionTransformer(c, torch.CPU, dtype);
            using var images = torch.randn(batch, 3, 224, 224).to(dtype);
            using var labels = ScalarMath.Arange(batch, ScalarType.Int64, torch.CPU);
            long Saved()
            {
                using var scope = torch.NewDisposeScope();
                model.zero_grad();
                long before = Allocated();
                var loss = nn.functional.cross_entropy(model.call(images).to(ScalarType.Float32), labels);
                long delta = Allocated() - before;          // what autograd keeps for backward
                loss.backward();
                model.ThrowIfBackwardFailed();
                return delta;
            }
            _ = Saved();                                    // gradients and one-time workspaces now exist
            long measuredKept = Consensus(Saved);
            model.Checkpointing = checkpointing;
            _ = Saved();
            long measuredRecomputed = Consensus(Saved);

            string ratios = $"kept {(double)measuredKept / kept.SavedActivations:F3}, recomputed {(double)measuredRecomputed / recomputed.SavedActivations:F3}, " +
                            $"saving {(double)(measuredKept - measuredRecomputed) / (kept.SavedActivations - recomputed.SavedActivations):F3} " +
                            $"(measured {measuredKept:N0} → {measuredRecomputed:N0} bytes, planned {kept.SavedActivations:N0} → {recomputed.SavedActivations:N0})";
            Assert.True((double)measuredKept / kept.SavedActivations is > 0.9 and < 1.1, ratios);
            Assert.True((double)measuredRecomputed / recomputed.SavedActivations is > 0.9 and < 1.1, ratios);
            Assert.True((double)(measuredKept - measuredRecomputed) / (kept.SavedActivations - recomputed.SavedActivations) is > 0.9 and < 1.1, ratios);
            Assert.True(recomputed.Activations < kept.Activations);
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
        }
    }

    /// <summary>Reads through to another source and records the allocated bytes each time a tensor has just been read
    /// (its staging buffer alive), without collecting garbage.</summary>
    private sealed class SampledSource(ITensorSource inner, long baseline) : ITensorSource
    {
        public long Peak;
        public int Reads, SliceReads;
        public string Path => inner.Path;
        public IReadOnlyList<string> Names => inner.Names;
        public IReadOnlyDictionary<string, string> Metadata => inner.Metadata;
        public bool Contains(string name) => inner.Contains(name);
        public long[] ShapeOf(string name) => inner.ShapeOf(name);

        public Tensor Read(string name)
        {
            Interlocked.Increment(ref Reads);
            return Sampled(inner.Read(name));
        }

        public Tensor ReadSlice(string name, int dim, IReadOnlyList<(long Start, long Length)> segments)
        {
            Interlocked.Increment(ref SliceReads);
            return Sampled(inner.ReadSlice(name, dim, segments));
        }

        private Tensor Sampled(Tensor t)
        {
            long now = Allocated(collect: false) - baseline;
            lock (this) Peak = Math.Max(Peak, now);
            return t;
        }

        public void Dispose() => inner.Dispose();
    }

    [Theory]
    [InlineData(BlockKind.Parallel, true)]
    [InlineData(BlockKind.Sequential, false)]
    [InlineData(BlockKind.Parallel, false)]
    [InlineData(BlockKind.Sequential, true)]
    public void Streamed_inference_stays_within_its_plan_for_a_model_several_times_larger(BlockKind block, bool prefetch)
    {
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));      // as in Training_memory_matches_measured_allocation
        try
        {
            var c = new ViTConfig
            {
                ImgSize = 32, PatchSize = 8, EmbedDim = 512, Depth = 12, NumHeads = 8, MlpDim = 2048, Block = block,
                GlobalPool = GlobalPool.Gap, NumClasses = 0,
            };
            var plan = MemoryPlanner.PlanStreamedInference(c, ScalarType.Float32, batch: 1, prefetch: prefetch);
            long model = ModelAccounting.ParameterBytes(c, ScalarType.Float32);
            Assert.True(model > 3 * plan.Total, $"the model ({model:N0} bytes) must be several times the plan ({plan.Total:N0})");
            using var image = torch.randn(1, 3, 32, 32);
            long baseline = Allocated();
            using var source = new SampledSource(new SeededWeights(c, seed: 3), baseline);
            using (var streamed = new StreamedVisionTransformer(c, source, torch.CPU, ScalarType.Float32, prefetch))
            {
                // Other threads of the process (libtorch's pools on first use, the runtime) now and then allocate a few MB
                // during a pass; a real excess shows in every pass, so the smallest of three peaks is compared.
                var peaks = new List<long>();
                var after = new List<long>();
                for (int pass = 0; pass < 3; pass++)
                {
                    source.Peak = 0;
                    streamed.Forward(image).Dispose();
                    peaks.Add(source.Peak);
                    after.Add(Allocated(collect: false) - baseline);
                }
                long peak = peaks.Min(), highest = peaks.Max();   // how much of the plan a pass reaches depends on thread timing
                string seen = $"peaks while reading {string.Join(", ", peaks.Select(x => x.ToString("N0", System.Globalization.CultureInfo.InvariantCulture)))} bytes, " +
                              $"planned {plan.Total:N0} (weights {plan.Weights:N0}, staging {plan.Staging:N0}, activations {plan.Activations:N0}); model {model:N0}";
                // 1.5: the smallest peak of three passes came to 1.0-1.45 times the plan depending on which tests ran before in
                // the same process (garbage awaiting a collection counts here), so this bound catches a leak of a block per
                // block or of the staging buffer (TorchSharp's zero_() handle: 9 times), not one block too many (0.4-0.9
                // of the plan more, depending on the case): StreamedVisionTransformerTests counts the blocks alive.
                Assert.True(peak <= 1.5 * plan.Total, seen);
                Assert.True(highest >= 0.5 * plan.Total, $"the plan is far above what was measured: {seen}");
                // What stays allocated after a pass (without a garbage collection): the resident parameters and at most
                // libtorch's own reusable buffers, less than one block; a staging buffer or block kept alive per block
                // would add up over the 12 blocks of every pass.
                var p = ModelAccounting.Parameters(c);
                long resident = (p.Total - p.Blocks) * 4, oneBlock = p.Blocks / c.Depth * 4;
                Assert.True(after[0] <= resident + oneBlock, $"after a pass {after[0]:N0} bytes are still allocated; resident parameters {resident:N0}, one block {oneBlock:N0}");
                Assert.True(after[2] - after[0] <= oneBlock, $"two more passes left {after[2] - after[0]:N0} more bytes allocated (one block is {oneBlock:N0})");
            }
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
        }
    }

    [Theory]
    [InlineData(1, 4, false, 1, "file")]
    [InlineData(2, 2, true, 3, "file")]
    [InlineData(2, 4, true, 5, "file")]
    [InlineData(1, 4, false, 1, "2x2 fsdp")]
    [InlineData(2, 4, true, 5, "1x2")]
    [InlineData(2, 2, true, 2, "index")]
    public void A_rank_loads_its_shard_of_a_checkpoint_several_times_its_budget_with_one_slice_of_staging(int data, int modelAxis, bool fsdp, int rank, string source)
    {
        // source: one safetensors file, a Hugging Face index of three shard files ("index"), or a sharded checkpoint
        // written by a mesh of another shape ("1x2", "2x2 fsdp").
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        var c = new ViTConfig
        {
            ImgSize = 32, PatchSize = 8, EmbedDim = 512, Depth = 8, NumHeads = 8, MlpDim = 2048, Block = BlockKind.Parallel,
            GlobalPool = GlobalPool.Gap, NumClasses = 0,
        };
        string dir = Directory.CreateTempSubdirectory("vit22b-load-peak-").FullName;
        var mesh = new ViT22B.Parallel.DeviceMesh(data, modelAxis);
        var world = new ViT22B.Parallel.ThreadedWorld(mesh.WorldSize);
        var ranks = ViT22B.Parallel.RankContext.CreateThreaded(world, mesh);
        var (dataIndex, modelIndex) = mesh.Coordinates(rank);
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));      // as in Training_memory_matches_measured_allocation
        try
        {
            string path = Path.Combine(dir, "model.safetensors"), folder = Path.Combine(dir, "sharded"), index = "";
            using (var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32))
            {
                SafetensorsCheckpoint.Save(model, path);
                if (source == "index") index = ViT22B.Tests.Models.HomeLayouts.SaveSharded(model.state_dict(), folder, shards: 3);
                else if (source != "file")
                {
                    var sourcePlan = new ViT22B.Parallel.ShardingPlan(c, modelSize: source[2] - '0', dataSize: source[0] - '0', source.EndsWith("fsdp", StringComparison.Ordinal));
                    ViT22B.Tests.Parallel.StreamedCheckpointTests.SaveSharded(ViT22B.Tests.Parallel.Backend.Threaded, sourcePlan, model.state_dict(), folder);
                }
            }
            var plan = new ViT22B.Parallel.ShardingPlan(c, modelAxis, data, fsdp);
            // One rank alone: building and loading a shard are local (no collectives).
            using var shard = new ViT22B.Parallel.ShardedVisionTransformer(plan, ranks[rank], ViT22B.Parallel.CommMode.Overlapped, ScalarType.Float32);
            var shapes = plan.FullShapes();
            long largestSlice = shapes.Max(kv => plan.Spec(kv.Key, kv.Value, modelIndex, dataIndex).LocalShape.Aggregate(1L, (a, n) => a * n)) * 4;
            long budget = shard.ParameterBytes + largestSlice;
            long file = new FileInfo(path).Length;
            Assert.True(file > 3 * budget, $"the checkpoint ({file:N0} bytes) must be several times the rank's budget ({budget:N0})");
            // Other threads of the process (the runtime's background compiler, libtorch's pools) now and then allocate, and
            // keep, up to a few MB while a load runs (measured: 1-3 MB in one load of three, in a full test run); a real excess
            // shows in every load. So the shard is loaded five times, each load measured from its own starting point, and
            // the smallest peak and remainder are compared.
            var loads = new List<(long Peak, long After, int Reads, int SliceReads, long BytesRead)>();
            for (int pass = 0; pass < 5; pass++)
            {
                long baseline = Allocated();
                ITensorSource reader = source switch
                {
                    "file" => SafetensorsReader.Open(path),
                    "index" => SafetensorsIndex.Open(index),
                    _ => ViT22B.Parallel.ShardedCheckpoint.Open(folder),
                };
                using var sampled = new SampledSource(reader, baseline);
                shard.LoadFull(sampled);
                long bytesRead = reader switch
                {
                    SafetensorsReader single => single.BytesRead,
                    SafetensorsIndex shards => shards.BytesRead,
                    _ => ((ViT22B.Parallel.ShardedCheckpointSource)reader).BytesRead,
                };
                loads.Add((sampled.Peak, Allocated(collect: false) - baseline, sampled.Reads, sampled.SliceReads, bytesRead));
            }
            long peak = loads.Min(l => l.Peak), after = loads.Min(l => l.After);
            string seen = $"peaks {string.Join(", ", loads.Select(l => l.Peak.ToString("N0", System.Globalization.CultureInfo.InvariantCulture)))} bytes " +
                          $"beyond the shard; one slice is {largestSlice:N0} (the whole checkpoint {file:N0})";
            // One slice of staging at a time; reading the largest tensor whole before cutting it would stage 4 to 8 slices,
            // and a slice copied once more on its way, two.
            Assert.True(peak <= largestSlice + (1 << 19), $"loading staged more than one slice: {seen}");
            Assert.True(peak >= largestSlice / 2, $"the slices were not measured: {seen}");
            Assert.True(after <= 1 << 20,
                $"{after:N0} bytes still allocated after a load (after each: {string.Join(", ", loads.Select(l => l.After.ToString("N0", System.Globalization.CultureInfo.InvariantCulture)))})");
            // The peak is sampled when a read returns; that no read staged a whole tensor before cutting it shows in how
            // the tensors were read: whole only where the rank holds the whole tensor, every split one as a slice.
            int split = shapes.Count(kv => !plan.Spec(kv.Key, kv.Value, modelIndex, dataIndex).IsWhole);
            Assert.All(loads, l => Assert.Equal(split, l.SliceReads));
            Assert.All(loads, l => Assert.Equal(shapes.Count - split, l.Reads));
            Assert.True(split > 0);
            // And the source copied out of its files exactly the shard's bytes: no slice was read whole and then cut.
            Assert.All(loads, l => Assert.Equal(shard.ParameterBytes, l.BytesRead));
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
            foreach (var r in ranks) r.Dispose();
            Directory.Delete(dir, recursive: true);
        }
    }

    // Sixteen 512-wide parallel blocks (about 200 MB in float32, the largest weight 7.3 MB): a model many times its
    // largest weight, for the tests that bound what a whole-model operation holds beside it.
    private static readonly ViTConfig SixteenWideBlocks = new()
    {
        ImgSize = 32, PatchSize = 8, EmbedDim = 512, Depth = 16, NumHeads = 8, MlpDim = 2048, Block = BlockKind.Parallel,
        GlobalPool = GlobalPool.Gap, NumClasses = 0,
    };

    // The peaks as the failure messages list them.
    private static string Peaks(IEnumerable<long> peaks) => string.Join(", ", peaks.Select(x => x.ToString("N0", System.Globalization.CultureInfo.InvariantCulture)));

    [Fact]
    public void Saving_a_sharded_model_as_one_file_holds_one_parameter_at_a_time_never_the_whole_model()
    {
        // SaveFull gathers and writes one parameter before the next: beside the shards, the process should hold only
        // the copies one parameter's gather makes. Two model-axis ranks (threads of this process) save together while a
        // third thread samples what the process has allocated; a save that gathered the model first (Unshard, then
        // write) would hold the whole model, many times the largest parameter.
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        var c = SixteenWideBlocks;
        var plan = new ViT22B.Parallel.ShardingPlan(c, modelSize: 2, dataSize: 1, fsdp: false);
        var shapes = plan.FullShapes();
        long largest = shapes.Values.Max(s => s.Aggregate(1L, (a, n) => a * n)) * 4;
        long whole = shapes.Values.Sum(s => s.Aggregate(1L, (a, n) => a * n)) * 4;
        // Per rank, a gather makes: the in-process backend's copy of the rank's shard (half a parameter) and the gathered
        // parameter; for one split along its second dimension (out_proj) also the shard transposed before and the
        // parameter transposed back after; on the writing rank the parameter reordered into the file's layout too. Both
        // ranks gather at once: eight parameters' worth covers that with room; the whole model is over twenty.
        long bound = 8 * largest;
        Assert.True(whole > 2 * bound, $"the model ({whole:N0} bytes) must be well above the bound ({bound:N0})");
        string dir = Directory.CreateTempSubdirectory("vit22b-save-peak-").FullName;
        var mesh = new ViT22B.Parallel.DeviceMesh(1, 2);
        var world = new ViT22B.Parallel.ThreadedWorld(mesh.WorldSize, TimeSpan.FromSeconds(120));
        var ranks = ViT22B.Parallel.RankContext.CreateThreaded(world, mesh);
        var shards = new List<ViT22B.Parallel.ShardedVisionTransformer>();
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));      // as in Training_memory_matches_measured_allocation
        try
        {
            foreach (var r in ranks) shards.Add(new ViT22B.Parallel.ShardedVisionTransformer(plan, r, ViT22B.Parallel.CommMode.Overlapped, ScalarType.Float32));
            string path = Path.Combine(dir, "model.safetensors");
            // Other threads of the process now and then allocate and keep a few MB (see the loading test above), so the
            // save runs three times and the smallest peak is compared.
            var peaks = new List<long>();
            int samples = 0;
            for (int pass = 0; pass < 3; pass++)
            {
                peaks.Add(PeakDuring(() => ViT22B.Parallel.Spmd.Run(world, r =>
                {
                    shards[r].SaveFull(path);
                    return 0;
                }), ref samples));
            }
            long least = peaks.Min();
            string seen = $"peaks {Peaks(peaks)} bytes " +
                          $"beyond the shards ({samples} samples); the largest parameter is {largest:N0}, the whole model {whole:N0}";
            Assert.True(samples >= 30, $"too few samples to see a save: {seen}");
            Assert.True(least <= bound, $"saving held more than one parameter's copies: {seen}");
            Assert.True(peaks.Max() >= largest, $"the gathers were not seen: {seen}");
            using var reader = SafetensorsReader.Open(path);
            Assert.Equal(shapes.Count, reader.Names.Count);
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
            foreach (var shard in shards) shard.Dispose();
            foreach (var r in ranks) r.Dispose();
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void An_int8_onnx_export_holds_one_weight_s_temporaries_at_a_time()
    {
        // Quantizing a linear weight makes float32 temporaries of its size (|W|, W / scale, rounded, clamped). With the
        // weights going to a data file, the export should hold beside the model only those of the weight being written;
        // temporaries kept until the whole graph is built would be several times the model.
        Assert.True(HaveMallInfo2(), "needs glibc's mallinfo2 (Linux, glibc 2.33+)");
        var c = SixteenWideBlocks;
        string dir = Directory.CreateTempSubdirectory("vit22b-onnx-peak-").FullName;
        Assert.Equal(1, MallOpt(MmapThreshold, 4096));      // as in Training_memory_matches_measured_allocation
        try
        {
            using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
            long largest = model.parameters().Max(p => p.numel()) * 4, whole = model.parameters().Sum(p => p.numel()) * 4;
            // One weight's temporaries and its int8 copy, with room: under a quarter of the model; holding every weight's
            // temporaries would be about four times the model.
            long bound = 6 * largest;
            Assert.True(whole > 4 * bound, $"the model ({whole:N0} bytes) must be well above the bound ({bound:N0})");
            string path = Path.Combine(dir, "model.onnx");
            var options = new ViT22B.Onnx.OnnxExportOptions { Weights = ViT22B.Onnx.OnnxWeights.DynamicInt8, ExternalData = true };
            // As in the saving test above: the smallest of three peaks.
            var peaks = new List<long>();
            int samples = 0;
            for (int pass = 0; pass < 3; pass++) peaks.Add(PeakDuring(() => ViT22B.Onnx.OnnxExport.Save(model, path, options), ref samples));
            long least = peaks.Min();
            string seen = $"peaks {Peaks(peaks)} bytes " +
                          $"beyond the model ({samples} samples); the largest weight is {largest:N0}, the whole model {whole:N0}";
            Assert.True(samples >= 30, $"too few samples to see an export: {seen}");
            Assert.True(least <= bound, $"the export held more than one weight's temporaries: {seen}");
            Assert.True(peaks.Max() >= largest, $"the quantization was not seen: {seen}");
        }
        finally
        {
            _ = MallOpt(MmapThreshold, 128 * 1024);
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>The most the process allocated beyond what it held before <paramref name="action"/>, sampled by another
    /// thread every millisecond while it runs (<paramref name="samples"/> counts the samples).</summary>
    private static long PeakDuring(Action action, ref int samples)
    {
        long baseline = Allocated(), peak = 0;
        int taken = 0;
        using var done = new ManualResetEventSlim();
        var sampler = new Thread(() =>
        {
            do
            {
                peak = Math.Max(peak, Allocated(collect: false) - baseline);
                taken++;
            }
            while (!done.Wait(1));
        }) { IsBackground = true };
        sampler.Start();
        try
        {
            action();
        }
        finally
        {
            done.Set();         // also when the action failed: the sampler stops before its event is disposed
            sampler.Join();
        }
        samples += taken;
        return peak;
    }

    [Fact]
    public void Param_Zero_leaves_no_handle_behind()
    {
        using var t = torch.ones(1000);
        long before = Tensor.TotalCount;
        var alias = t.zero_();                      // TorchSharp 0.107: a new handle onto t's storage
        bool isNewHandle = !ReferenceEquals(alias, t);
        if (isNewHandle) alias.Dispose();
        Assert.Equal(before, Tensor.TotalCount);
        Assert.True(isNewHandle, "TorchSharp's zero_() returns the tensor itself now: Param.Zero's workaround can go");
        ViT22B.Layers.Param.Zero(t);
        Assert.Equal(before, Tensor.TotalCount);
        Assert.Equal(0f, t.abs().max().item<float>());
    }

    /// <summary>Repeats a reading until three of them lie within 0.1% of each other and returns their median; fails,
    /// listing every reading, when nine do not produce such a group.</summary>
    private static long Consensus(Func<long> read)
    {
        var readings = new List<long>();
        for (int i = 0; i < 9; i++)
        {
            readings.Add(read());
            var sorted = readings.Order().ToArray();
            for (int j = 0; j + 2 < sorted.Length; j++)
                if (sorted[j + 2] - sorted[j] <= Math.Abs(sorted[j + 1]) / 1000) return sorted[j + 1];
        }
        throw new Xunit.Sdk.XunitException($"no three of nine allocator readings agree within 0.1%: {string.Join(", ", readings)}");
    }

    [Fact]
    public void Vit22B_bf16_inference_fits_one_80GB_GPU_but_not_a_40GB_one()
    {
        var plan = MemoryPlanner.Plan(ViTConfig.Parse("22B/14"), ScalarType.BFloat16, batch: 1, training: false);
        Assert.Equal(ModelAccounting.Parameters(ViTConfig.Parse("22B/14")).Total * 2, plan.Weights);   // 44.4 GB
        Assert.Equal(0, plan.Gradients);
        Assert.True(plan.FitsIn(80_000_000_000));
        Assert.False(plan.FitsIn(40_000_000_000));
    }

    [Fact]
    public void Sharding_divides_the_block_weights()
    {
        var c = ViTConfig.Parse("22B/14");
        var one = MemoryPlanner.Plan(c, ScalarType.BFloat16, 8, training: true);
        var tp8 = MemoryPlanner.Plan(c, ScalarType.BFloat16, 8, training: true, model: 8);
        var fsdp = MemoryPlanner.Plan(c, ScalarType.BFloat16, 8, training: true, model: 8, data: 4, fsdp: true);
        var p = ModelAccounting.Parameters(c);
        long replicated = p.Total - p.BlockMatmulWeights - c.Depth * (long)c.MlpDim;
        Assert.Equal((replicated + (p.BlockMatmulWeights + c.Depth * (long)c.MlpDim) / 8) * 2, tp8.Weights);
        Assert.True(fsdp.Weights < tp8.Weights / 2);   // the replicated MAP head (0.45 B parameters) stays whole
        Assert.True(tp8.Activations < one.Activations);
        Assert.Contains("must divide", Assert.Throws<ArgumentException>(() => MemoryPlanner.Plan(c, ScalarType.BFloat16, 8, true, model: 5)).Message);
    }
}
