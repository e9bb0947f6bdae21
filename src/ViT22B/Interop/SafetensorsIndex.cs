using System.Text.Json;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>
/// A Hugging Face sharded checkpoint: an index <c>model.safetensors.index.json</c>
/// (<c>{"metadata": {...}, "weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}}</c>) beside its
/// safetensors shards, read as one source. Every shard is opened and validated up front; the index must name plain file
/// names in its own folder, and every tensor it lists must be in the shard it names and nowhere else.
/// </summary>
public sealed class SafetensorsIndex : ITensorSource
{
    /// <summary>The file name Hugging Face gives the index.</summary>
    public const string DefaultFileName = "model.safetensors.index.json";

    private readonly Dictionary<string, SafetensorsReader> _shardOf;
    private readonly List<SafetensorsReader> _shards;

    /// <inheritdoc />
    public string Path { get; }

    /// <inheritdoc />
    public IReadOnlyList<string> Names { get; }

    /// <summary>The index's <c>metadata</c> entries whose values are strings or numbers (e.g. <c>total_size</c>).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>The shard files, in the order the index first names them.</summary>
    public IReadOnlyList<string> ShardPaths => _shards.Select(s => s.Path).ToArray();

    private SafetensorsIndex(string path, List<SafetensorsReader> shards, Dictionary<string, SafetensorsReader> shardOf,
        IReadOnlyList<string> names, Dictionary<string, string> metadata)
    {
        (Path, _shards, _shardOf, Names, Metadata) = (path, shards, shardOf, names, metadata);
    }

    /// <summary>Opens an index file and all its shards.</summary>
    /// <exception cref="FileNotFoundException">The index or a shard it names does not exist.</exception>
    /// <exception cref="SafetensorsFormatException">The index or a shard is malformed or they disagree.</exception>
    public static SafetensorsIndex Open(string indexPath)
    {
        ArgumentNullException.ThrowIfNull(indexPath);
        if (!File.Exists(indexPath)) throw new FileNotFoundException($"Safetensors index '{indexPath}' does not exist.", indexPath);
        string folder = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(indexPath))!;
        var metadata = new Dictionary<string, string>();
        var fileOf = new List<(string Name, string File)>();
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(indexPath));
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException($"Safetensors index '{indexPath}': expected a JSON object with a 'weight_map' object.");
            if (root.TryGetProperty("metadata", out var meta) && meta.ValueKind == JsonValueKind.Object)
                foreach (var m in meta.EnumerateObject())
                    if (m.Value.ValueKind is JsonValueKind.String or JsonValueKind.Number) metadata[m.Name] = m.Value.ToString();
            foreach (var e in map.EnumerateObject())
            {
                if (e.Value.ValueKind != JsonValueKind.String)
                    throw new SafetensorsFormatException($"Safetensors index '{indexPath}': weight_map['{e.Name}'] is not a file name string.");
                string file = e.Value.GetString()!;
                if (file.Length == 0 || file != System.IO.Path.GetFileName(file) || file is "." or "..")
                    throw new SafetensorsFormatException($"Safetensors index '{indexPath}': weight_map['{e.Name}'] = '{file}' is not a plain file name in the index's folder.");
                fileOf.Add((e.Name, file));
            }
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException($"Safetensors index '{indexPath}' is not valid JSON: {e.Message}", e);
        }
        if (fileOf.Count == 0) throw new SafetensorsFormatException($"Safetensors index '{indexPath}': weight_map is empty.");

        var shards = new List<SafetensorsReader>();
        try
        {
            var byFile = new Dictionary<string, SafetensorsReader>(StringComparer.Ordinal);
            foreach (string file in fileOf.Select(f => f.File).Distinct(StringComparer.Ordinal))
            {
                string shardPath = System.IO.Path.Combine(folder, file);
                if (!File.Exists(shardPath))
                    throw new FileNotFoundException($"Safetensors index '{indexPath}' names shard '{file}', which is not in '{folder}'.", shardPath);
                var reader = SafetensorsReader.Open(shardPath);
                shards.Add(reader);
                byFile[file] = reader;
            }
            var shardOf = new Dictionary<string, SafetensorsReader>(StringComparer.Ordinal);
            foreach (var (name, file) in fileOf)
            {
                if (!byFile[file].Contains(name))
                    throw new SafetensorsFormatException($"Safetensors index '{indexPath}': tensor '{name}' is listed in shard '{file}', which does not hold it.");
                shardOf[name] = byFile[file];
            }
            foreach (var shard in shards)
                foreach (var e in shard.Entries)
                    if (!shardOf.TryGetValue(e.Name, out var listed) || listed != shard)
                        throw new SafetensorsFormatException($"Safetensors index '{indexPath}': shard '{System.IO.Path.GetFileName(shard.Path)}' holds tensor '{e.Name}', which the index "
                            + (listed is not null ? $"assigns to shard '{System.IO.Path.GetFileName(listed.Path)}'." : "does not list."));
            return new SafetensorsIndex(indexPath, shards, shardOf, fileOf.Select(f => f.Name).ToArray(), metadata);
        }
        catch
        {
            foreach (var s in shards) s.Dispose();
            throw;
        }
    }

    /// <inheritdoc />
    public bool Contains(string name) => _shardOf.ContainsKey(name);

    /// <inheritdoc />
    public long[] ShapeOf(string name) => Shard(name).ShapeOf(name);

    /// <inheritdoc />
    public Tensor Read(string name) => Shard(name).Read(name);

    /// <summary>Bytes copied out of the shards so far (<see cref="SafetensorsReader.BytesRead"/>, summed).</summary>
    internal long BytesRead => _shards.Sum(s => s.BytesRead);

    /// <summary>Reads part of a tensor from its shard's memory mapping (<see cref="SafetensorsReader.ReadSlice"/>).</summary>
    public Tensor ReadSlice(string name, int dim, IReadOnlyList<(long Start, long Length)> segments) => Shard(name).ReadSlice(name, dim, segments);

    private SafetensorsReader Shard(string name) => _shardOf.TryGetValue(name, out var s) ? s
        : throw new KeyNotFoundException($"Safetensors index '{Path}' has no tensor '{name}'.");

    /// <summary>Closes every shard.</summary>
    public void Dispose()
    {
        foreach (var s in _shards) s.Dispose();
    }
}
