namespace ViT22B.Interop;

/// <summary>Opens the checkpoint formats this library reads as one <see cref="ITensorSource"/>.</summary>
public static class TensorSources
{
    /// <summary>
    /// Opens <paramref name="path"/> by what it is: a <c>.safetensors</c> file; a Hugging Face sharded checkpoint's
    /// <c>*.index.json</c>; a NumPy <c>.npz</c> archive (big_vision); or a folder holding <c>model.safetensors.index.json</c>
    /// or exactly one <c>.safetensors</c> file (a downloaded Hugging Face model folder).
    /// </summary>
    /// <exception cref="FileNotFoundException">Nothing at <paramref name="path"/>, or a folder without a checkpoint.</exception>
    /// <exception cref="ArgumentException">A file of another kind (the message lists the kinds read).</exception>
    public static ITensorSource Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        const string Kinds = ".safetensors, a Hugging Face *.index.json, .npz, or a folder holding model.safetensors.index.json or one .safetensors file";
        if (Directory.Exists(path))
        {
            string index = Path.Combine(path, SafetensorsIndex.DefaultFileName);
            if (File.Exists(index)) return SafetensorsIndex.Open(index);
            var files = Directory.GetFiles(path, "*.safetensors");
            return files.Length switch
            {
                1 => SafetensorsReader.Open(files[0]),
                0 => throw new FileNotFoundException($"Folder '{path}' holds no checkpoint: neither {SafetensorsIndex.DefaultFileName} nor a .safetensors file.", path),
                _ => throw new FileNotFoundException($"Folder '{path}' holds {files.Length} .safetensors files and no {SafetensorsIndex.DefaultFileName} saying how they fit together; pass one file.", path),
            };
        }
        if (!File.Exists(path)) throw new FileNotFoundException($"Checkpoint '{path}' does not exist.", path);
        if (path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)) return SafetensorsReader.Open(path);
        if (path.EndsWith(".json", StringComparison.OrdinalIgnoreCase)) return SafetensorsIndex.Open(path);
        if (path.EndsWith(".npz", StringComparison.OrdinalIgnoreCase)) return NpzReader.Open(path);
        throw new ArgumentException($"Checkpoint '{path}' is not a kind this library reads ({Kinds}).", nameof(path));
    }

    /// <summary>Throws when <paramref name="source"/> lacks <paramref name="key"/> or holds it in another shape than
    /// <paramref name="expected"/>; the message names the source, the key and both shapes.</summary>
    internal static void CheckShape(ITensorSource source, string key, long[] expected)
    {
        if (!source.Contains(key)) throw new KeyNotFoundException($"{source.Path} has no '{key}'.");
        var found = source.ShapeOf(key);
        if (!found.SequenceEqual(expected))
            throw new ArgumentException($"{source.Path}: '{key}' is [{string.Join(", ", found)}] but the model needs [{string.Join(", ", expected)}].");
    }
}
