using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// Sharded checkpoints: a folder with one safetensors file per rank (<c>rank-00003-of-00008.safetensors</c>, the
/// rank's shard state dict under the full model's keys) and <c>index.json</c> (format, config, mesh shape, FSDP flag,
/// file list). The index is written last, after every rank has written its file, so its presence means the
/// checkpoint is complete; every file is written atomically. A checkpoint written with one mesh loads into any
/// other mesh (resharding) or into an unsharded model: each parameter is reassembled from the source shards, one
/// parameter at a time, and cut again with the target plan.
/// </summary>
public static class ShardedCheckpoint
{
    /// <summary>Name of the index file.</summary>
    public const string IndexFileName = "index.json";
    private const string Format = "vit22b-sharded";

    private static string RankFile(int rank, int world) => $"rank-{rank:D5}-of-{world:D5}.safetensors";

    /// <summary>Saves this rank's shard; every rank of the mesh must call it (it synchronizes the mesh).</summary>
    public static void Save(ShardedVisionTransformer model, string folder)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(folder);
        var s = model;
        var mesh = s.Rank.Mesh;
        Directory.CreateDirectory(folder);
        Safetensors.Save(model.Module.state_dict(), Path.Combine(folder, RankFile(s.Rank.Rank, mesh.WorldSize)));
        s.Rank.Model.Barrier();
        s.Rank.Data.Barrier();
        if (s.Rank.Rank == 0)
        {
            var index = new JsonObject
            {
                ["format"] = Format,
                ["version"] = 1,
                ["config"] = JsonNode.Parse(ViTConfigJson.ToJson(s.Plan.Config)),
                ["mesh"] = new JsonObject { ["data"] = mesh.DataSize, ["model"] = mesh.ModelSize },
                ["fsdp"] = s.Plan.Fsdp,
                ["files"] = new JsonArray(Enumerable.Range(0, mesh.WorldSize).Select(r => (JsonNode)RankFile(r, mesh.WorldSize)).ToArray()),
            };
            var bytes = Encoding.UTF8.GetBytes(index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            AtomicFile.Write(Path.Combine(folder, IndexFileName), st => st.Write(bytes, 0, bytes.Length));
        }
        s.Rank.Model.Barrier();
        s.Rank.Data.Barrier();
    }

    /// <summary>Reads a checkpoint's index: the config and the plan it was written with.</summary>
    /// <exception cref="FileNotFoundException">No index (missing or incomplete checkpoint).</exception>
    /// <exception cref="FormatException">The index is not a ViT22B sharded-checkpoint index.</exception>
    public static (ShardingPlan Plan, IReadOnlyList<string> Files) ReadIndex(string folder)
    {
        string path = Path.Combine(folder, IndexFileName);
        if (!File.Exists(path))
            throw new FileNotFoundException($"'{folder}' has no {IndexFileName}: not a sharded checkpoint, or one whose writing did not finish.", path);
        try
        {
            var root = JsonNode.Parse(File.ReadAllText(path)) ?? throw new FormatException("empty index");
            if ((string?)root["format"] != Format) throw new FormatException($"format is '{root["format"]}', expected '{Format}'");
            var config = ViTConfigJson.FromJson(root["config"]!.ToJsonString(), path);
            int data = (int)root["mesh"]!["data"]!, model = (int)root["mesh"]!["model"]!;
            var plan = new ShardingPlan(config, model, data, (bool)root["fsdp"]!);
            var files = root["files"]!.AsArray().Select(f => Path.Combine(folder, (string)f!)).ToList();
            if (files.Count != data * model) throw new FormatException($"{files.Count} files listed for a {data}×{model} mesh");
            foreach (var f in files)
                if (!File.Exists(f)) throw new FileNotFoundException($"Sharded checkpoint '{folder}' lists '{Path.GetFileName(f)}', which is missing.", f);
            return (plan, files);
        }
        catch (Exception e) when (e is JsonException or FormatException or NullReferenceException or InvalidOperationException or ArgumentException)
        {
            throw new FormatException($"'{path}' is not a valid sharded-checkpoint index: {e.Message}", e);
        }
    }

    /// <summary>Reassembles one full parameter (CPU) from the source shard files, reading each distinct part once.</summary>
    private static Tensor Reassemble(string key, long[] fullShape, ShardingPlan plan, SafetensorsReader[] readers)
    {
        for (int rank = 0; rank < readers.Length; rank++)
            _ = readers[rank][key];                    // every file must hold the key (names file and key if not)
        using var scope = torch.NewDisposeScope();     // the parts read from the files
        return plan.Reassemble(key, fullShape, rank => readers[rank].Read(key)).MoveToOuterDisposeScope();
    }

    /// <summary>Loads a checkpoint written with any mesh into this rank's shard (a different mesh reshards). Every
    /// rank may call it independently; it reads only.</summary>
    /// <exception cref="ArgumentException">The checkpoint's config differs from the model's.</exception>
    public static void Load(ShardedVisionTransformer model, string folder)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(folder);
        var s = model;
        var (source, files) = ReadIndex(folder);
        if (source.Config with { DType = s.Plan.Config.DType } != s.Plan.Config with { DType = s.Plan.Config.DType })
            throw new ArgumentException($"Sharded checkpoint '{folder}' holds a different model: {ViTConfigJson.ToJson(source.Config)}");
        var readers = files.Select(SafetensorsReader.Open).ToArray();
        try
        {
            var shapes = s.Plan.FullShapes();
            using var noGrad = torch.no_grad();
            foreach (var (key, p) in model.Module.state_dict())
            {
                using var full = Reassemble(key, shapes[key], source, readers);
                using var slice = ShardingPlan.Slice(full, s.Plan.Spec(key, shapes[key], s.ModelIndex, s.DataIndex));
                p.copy_(slice);
            }
        }
        finally
        {
            foreach (var r in readers) r.Dispose();
        }
    }

    /// <summary>Reassembles the full (unsharded) state dict on the CPU, e.g. to load into a single-device
    /// <see cref="VisionTransformer"/> or to export one safetensors file.</summary>
    public static Dictionary<string, Tensor> LoadFull(string folder)
    {
        var (plan, files) = ReadIndex(folder);
        var readers = files.Select(SafetensorsReader.Open).ToArray();
        try
        {
            return plan.FullShapes().ToDictionary(kv => kv.Key, kv => Reassemble(kv.Key, kv.Value, plan, readers));
        }
        finally
        {
            foreach (var r in readers) r.Dispose();
        }
    }
}
