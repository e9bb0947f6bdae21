using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using ViT22B.Tests.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Loading a rank's slices straight from a full checkpoint (one file or a Hugging Face index) gives the
/// whole-state-dict load bit for bit on every mesh; saving one full file streamed from the shards gives the model back.</summary>
public sealed class StreamedCheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-streamed-ckpt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Dictionary<string, Tensor> Reference(ViTConfig c, ScalarType dtype) => TestUtil.RandomState(c, seed: 41, scale: 0.3, dtype);

    /// <summary>Writes <paramref name="full"/> as a per-rank checkpoint of <paramref name="plan"/>'s mesh (float32).</summary>
    internal static void SaveSharded(Backend backend, ShardingPlan plan, IReadOnlyDictionary<string, Tensor> full, string folder) =>
        Backends.Run(backend, new DeviceMesh(plan.DataSize, plan.ModelSize), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            ShardedCheckpoint.Save(shard, folder);
            return 0;
        });

    [Theory]
    [OnEveryBackend(BlockKind.Parallel, 1, 2, false, false)]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, false, true)]
    [OnEveryBackend(BlockKind.Sequential, 1, 4, false, false)]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true, false)]
    [OnEveryBackend(BlockKind.Sequential, 2, 2, true, true)]
    [OnEveryBackend(BlockKind.Parallel, 4, 1, false, false)]
    [OnEveryBackend(BlockKind.Sequential, 2, 2, false, false)]
    [OnEveryBackend(BlockKind.Parallel, 3, 1, true, true)]
    [OnEveryBackend(BlockKind.Parallel, 2, 4, true, false)]
    public void Slices_read_from_the_file_equal_slices_cut_from_the_state_dict(Backend backend, BlockKind block, int data, int model, bool fsdp, bool index)
    {
        var c = ShardedModelTests.Config(block, fused: block == BlockKind.Parallel && !index) with { Depth = 2 };
        var full = Reference(c, ScalarType.Float32);
        string path = index ? HomeLayouts.SaveSharded(full, Path.Combine(_dir, "hf"), shards: 3) : Path.Combine(_dir, "model.safetensors");
        if (!index) Safetensors.Save(full, path);
        var plan = new ShardingPlan(c, model, data, fsdp);
        var mismatches = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.LoadFull(full);
            var fromDict = shard.Module.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
            TestUtil.Randomize(shard.Module, seed: 42);          // nothing of the first load may survive unnoticed
            using (var source = TensorSources.Open(path)) shard.LoadFull(source);
            return shard.Module.state_dict().Where(kv => !TensorAssert.Same(kv.Value, fromDict[kv.Key])).Select(kv => kv.Key).ToList();
        });
        Assert.All(mismatches, Assert.Empty);
    }

    [Theory]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, false)]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true)]
    [OnEveryBackend(BlockKind.Sequential, 2, 1, true)]
    [OnEveryBackend(BlockKind.Sequential, 1, 2, false)]
    public void A_sharded_checkpoint_opened_as_one_gives_every_tensor_and_every_slice_any_mesh_reads(Backend backend, BlockKind block, int data, int model, bool fsdp)
    {
        var c = ShardedModelTests.Config(block) with { Depth = 2 };
        var full = Reference(c, ScalarType.Float32);
        string folder = Path.Combine(_dir, "sharded");
        SaveSharded(backend, new ShardingPlan(c, model, data, fsdp), full, folder);
        using var source = ShardedCheckpoint.Open(folder);
        Assert.Equal(full.Keys.Order(), source.Names.Order());
        Assert.Equal(ViTConfigJson.ToJson(c), source.Metadata["config"]);
        foreach (var (key, value) in full)
        {
            Assert.Equal(value.shape, source.ShapeOf(key));
            using var whole = source.Read(key);
            Assert.True(TensorAssert.Same(value, whole), $"{key} read whole differs");
        }
        int slices = 0;
        foreach (var (td, tm, tf) in new[] { (1, 2, false), (1, 4, false), (2, 2, true), (2, 1, true), (4, 1, false), (2, 4, true) })
        {
            var target = new ShardingPlan(c, tm, td, tf);
            for (int di = 0; di < td; di++)
                for (int mi = 0; mi < tm; mi++)
                    foreach (var (key, value) in full)
                    {
                        var spec = target.Spec(key, value.shape, mi, di);
                        if (spec.IsWhole) continue;
                        using var got = source.ReadSlice(key, spec.Dim, spec.Segments);
                        using var want = ShardingPlan.Slice(value, spec);
                        Assert.True(TensorAssert.Same(want, got), $"{key}: the slice of model rank {mi}, data rank {di} of a {td}×{tm}{(tf ? " FSDP" : "")} mesh differs");
                        slices++;
                    }
        }
        Assert.True(slices > 50, $"only {slices} slices compared");
        // A rank of another mesh that loads from the folder copies out of the rank files exactly the bytes it holds:
        // its slices only (replicated tensors once), never a whole parameter it then cuts.
        foreach (var (td, tm, tf, rank) in new[] { (1, 4, false, 1), (2, 2, true, 3), (2, 1, true, 0) })
        {
            var target = new ShardingPlan(c, tm, td, tf);
            // One rank alone (loading is local: no collectives, so no backend is involved).
            var contexts = RankContext.CreateThreaded(new ThreadedWorld(td * tm), new DeviceMesh(td, tm));
            try
            {
                using var shard = new ShardedVisionTransformer(target, contexts[rank], CommMode.Overlapped, ScalarType.Float32);
                using var reader = (ShardedCheckpointSource)ShardedCheckpoint.Open(folder);
                shard.LoadFull(reader);
                Assert.Equal(shard.ParameterBytes, reader.BytesRead);
                foreach (var (key, p) in shard.Module.state_dict())
                {
                    using var want = ShardingPlan.Slice(full[key], target.Spec(key, full[key].shape, shard.ModelIndex, shard.DataIndex));
                    Assert.True(TensorAssert.Same(want, p), $"{key} of rank {rank} of a {td}×{tm} mesh differs after loading");
                }
            }
            finally
            {
                foreach (var r in contexts) r.Dispose();
            }
        }
        Assert.Contains("'no.such.key'", Assert.Throws<KeyNotFoundException>(() => source.ShapeOf("no.such.key")).Message);
    }

    [Theory]
    [OnEveryBackend(2, 2, true)]
    [OnEveryBackend(1, 4, false)]
    [OnEveryBackend(2, 2, false)]
    public void A_full_file_saved_from_the_shards_loads_into_one_device(Backend backend, int data, int model, bool fsdp)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 2 };
        var full = Reference(c, ScalarType.BFloat16);
        var plan = new ShardingPlan(c, model, data, fsdp);
        string path = Path.Combine(_dir, "saved.safetensors");
        Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.BFloat16);
            shard.LoadFull(full);
            shard.SaveFull(path);
            return 0;
        });
        using var single = new VisionTransformer(c, torch.CPU, ScalarType.BFloat16);
        var report = SafetensorsCheckpoint.Load(single, path);
        Assert.True(report.IsExact);
        foreach (var (key, value) in single.state_dict())
            Assert.True(TensorAssert.Same(full[key], value), $"{key} differs after the round trip");
        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(ViTConfigJson.ToJson(c), reader.Metadata["config"]);
        Assert.Empty(Directory.GetFiles(_dir, ".*.tmp"));
    }

    [Theory]
    [OnEveryBackend]
    public void A_checkpoint_with_a_missing_or_misshapen_key_is_refused_before_anything_is_copied(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 2 };
        var full = Reference(c, ScalarType.Float32);
        string missing = Path.Combine(_dir, "missing.safetensors");
        Safetensors.Save(full.Where(kv => kv.Key != "blocks.1.out_proj.weight"), missing);
        string wrong = Path.Combine(_dir, "wrong.safetensors");
        using var odd = torch.zeros(3, 3);
        Safetensors.Save(new Dictionary<string, Tensor>(full) { ["blocks.0.in_proj.weight"] = odd }, wrong);
        Backends.Run(backend, new DeviceMesh(1, 2), ctx =>
        {
            using var shard = new ShardedVisionTransformer(new ShardingPlan(c, 2), ctx, CommMode.Overlapped, ScalarType.Float32);
            var before = shard.Module.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
            using (var s = TensorSources.Open(missing))
                Assert.Contains("'blocks.1.out_proj.weight'", Assert.Throws<KeyNotFoundException>(() => shard.LoadFull(s)).Message);
            using (var s = TensorSources.Open(wrong))
                Assert.Contains("'blocks.0.in_proj.weight' is [3, 3]", Assert.Throws<ArgumentException>(() => shard.LoadFull(s)).Message);
            foreach (var (key, value) in shard.Module.state_dict()) Assert.True(TensorAssert.Same(before[key], value), key);
            return 0;
        });
    }

    [Theory]
    [OnEveryBackend]
    public void A_rank_file_that_disagrees_with_the_index_is_refused_when_the_checkpoint_is_opened(Backend backend)
    {
        var c = ShardedModelTests.Config(BlockKind.Parallel) with { Depth = 2 };
        var full = Reference(c, ScalarType.Float32);
        string folder = Path.Combine(_dir, "sharded");
        SaveSharded(backend, new ShardingPlan(c, 2, 2, fsdp: true), full, folder);
        // Rank 3's file: a replicated tensor (the final norm) of the wrong shape, then without it. Rank 0 holds the
        // same replica, so only a check of every file finds it.
        string file = Directory.GetFiles(folder, "rank-00003-*").Single();
        Dictionary<string, Tensor> stored;
        using (var reader = SafetensorsReader.Open(file)) stored = reader.Names.ToDictionary(n => n, n => reader.Read(n));
        using var odd = torch.zeros(3);
        Safetensors.Save(new Dictionary<string, Tensor>(stored) { ["norm.weight"] = odd }, file);
        var e = Assert.Throws<ArgumentException>(() => ShardedCheckpoint.Open(folder));
        Assert.Contains(Path.GetFileName(file), e.Message);
        Assert.Contains("'norm.weight' is [3]", e.Message);
        Safetensors.Save(stored.Where(kv => kv.Key != "norm.weight"), file);
        var missing = Assert.Throws<KeyNotFoundException>(() => ShardedCheckpoint.Open(folder));
        Assert.Contains("norm.weight", missing.Message);
        Assert.Contains(Path.GetFileName(file), missing.Message);
    }
}
