using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using ViT22B.Interop;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// Sharded checkpoints: a folder with one safetensors file per rank (<c>rank-00003-of-00008.safetensors</c>, the
/// rank's shard state dict under the full model's keys) and <c>index.json</c> (format, config, mesh shape, FSDP flag,
/// file list). The index is written last, after every rank has written its file, so its presence means the
/// checkpoint is complete; every file is written atomically. A checkpoint written with one mesh loads into any
/// other mesh (resharding), each rank reading only the parts of the rank files it holds, or into an unsharded model.
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

    /// <summary>
    /// Opens a checkpoint folder as one checkpoint of full tensors: the full model's keys and shapes, each tensor
    /// reassembled from the rank files on <c>Read</c>, and on <c>ReadSlice</c> only the parts of the memory-mapped rank
    /// files that the slice covers (what a rank of another mesh holds), so loading never stages a whole parameter the
    /// rank does not keep. Its metadata holds the config.
    /// </summary>
    /// <exception cref="FileNotFoundException">No index, or a rank file it lists is missing.</exception>
    /// <exception cref="FormatException">The index is not a ViT22B sharded-checkpoint index.</exception>
    public static ITensorSource Open(string folder)
    {
        ArgumentNullException.ThrowIfNull(folder);
        return new ShardedCheckpointSource(folder);
    }

    /// <summary>Loads a checkpoint written with any mesh into this rank's shard (a different mesh reshards), reading
    /// only the parts of the rank files that this rank holds (<see cref="Open"/>). Every rank may call it
    /// independently; it reads only.</summary>
    /// <exception cref="ArgumentException">The checkpoint's config differs from the model's.</exception>
    public static void Load(ShardedVisionTransformer model, string folder)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(folder);
        var config = model.Plan.Config;
        using var source = new ShardedCheckpointSource(folder);
        if (source.Plan.Config with { DType = config.DType } != config)
            throw new ArgumentException($"Sharded checkpoint '{folder}' holds a different model: {ViTConfigJson.ToJson(source.Plan.Config)}");
        model.LoadFull(source);
    }

    /// <summary>Reassembles the full (unsharded) state dict on the CPU, e.g. to load into a single-device
    /// <see cref="VisionTransformer"/> or to export one safetensors file.</summary>
    public static Dictionary<string, Tensor> LoadFull(string folder)
    {
        using var source = new ShardedCheckpointSource(folder);
        var result = new Dictionary<string, Tensor>();
        try
        {
            foreach (var key in source.Names) result[key] = source.Read(key);
            return result;
        }
        catch
        {
            foreach (var t in result.Values) t.Dispose();
            throw;
        }
    }
}
