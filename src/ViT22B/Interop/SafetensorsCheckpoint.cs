using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>A tensor whose shape in the checkpoint differs from the model's.</summary>
/// <param name="Key">State-dict key.</param>
/// <param name="Expected">Shape in the model.</param>
/// <param name="Found">Shape in the checkpoint.</param>
public sealed record ShapeMismatch(string Key, long[] Expected, long[] Found)
{
    /// <inheritdoc />
    public override string ToString() => $"{Key}: model [{string.Join(", ", Expected)}], checkpoint [{string.Join(", ", Found)}]";
}

/// <summary>One key that loading changed on the way, and how.</summary>
/// <param name="Key">The model's state-dict key (for a skipped entry, the checkpoint's key).</param>
/// <param name="Note">What was done: the source keys a converted tensor came from, the shapes a resampled one went
/// between, why a key was skipped or re-initialised.</param>
public sealed record KeyNote(string Key, string Note)
{
    /// <inheritdoc />
    public override string ToString() => $"{Key} ({Note})";
}

/// <summary>What loading a checkpoint into a model found.</summary>
/// <param name="Path">The checkpoint file.</param>
/// <param name="Loaded">Keys copied into the model.</param>
/// <param name="Missing">Model keys the checkpoint lacks (left as they were).</param>
/// <param name="Unexpected">Checkpoint keys the model lacks (ignored).</param>
/// <param name="Mismatched">Keys present in both with different shapes.</param>
public sealed record LoadReport(string Path, IReadOnlyList<string> Loaded, IReadOnlyList<string> Missing,
    IReadOnlyList<string> Unexpected, IReadOnlyList<ShapeMismatch> Mismatched)
{
    /// <summary>The checkpoint layout the keys were read as (e.g. "timm", "Hugging Face ViT", "big_vision"); "timm"
    /// for a file in this library's own keys.</summary>
    public string Layout { get; init; } = "timm";

    /// <summary>Model keys built from checkpoint tensors of other names or layouts (a fused qkv from separate q, k, v;
    /// a transposed Flax kernel), each with the source keys.</summary>
    public IReadOnlyList<KeyNote> Converted { get; init; } = [];

    /// <summary>Model keys resampled to the model's shape (position embedding to another grid, patch embedding to
    /// another patch size).</summary>
    public IReadOnlyList<KeyNote> Resampled { get; init; } = [];

    /// <summary>Model keys left as initialised by the model because the caller asked for it (a classifier of another
    /// class count).</summary>
    public IReadOnlyList<KeyNote> Reinitialized { get; init; } = [];

    /// <summary>Checkpoint keys deliberately not loaded (a text tower, a pooler or classifier the model does not
    /// have), each with the reason.</summary>
    public IReadOnlyList<KeyNote> Skipped { get; init; } = [];

    /// <summary>True when every model key was loaded and nothing was left over or mismatched.</summary>
    public bool IsExact => Missing.Count == 0 && Unexpected.Count == 0 && Mismatched.Count == 0;

    /// <inheritdoc />
    public override string ToString()
    {
        static string List(IEnumerable<object> items) => string.Join("; ", items.Take(20)) + (items.Count() > 20 ? $"; … ({items.Count()} in all)" : "");
        var parts = new List<string> { $"'{Path}' ({Layout} layout): loaded {Loaded.Count} tensors" };
        if (Converted.Count > 0) parts.Add($"converted {Converted.Count}: {List(Converted)}");
        if (Resampled.Count > 0) parts.Add($"resampled {Resampled.Count}: {List(Resampled)}");
        if (Reinitialized.Count > 0) parts.Add($"re-initialised {Reinitialized.Count}: {List(Reinitialized)}");
        if (Skipped.Count > 0) parts.Add($"skipped {Skipped.Count}: {List(Skipped)}");
        if (Missing.Count > 0) parts.Add($"missing {Missing.Count}: {List(Missing)}");
        if (Unexpected.Count > 0) parts.Add($"unexpected {Unexpected.Count}: {List(Unexpected)}");
        if (Mismatched.Count > 0) parts.Add($"shape mismatches {Mismatched.Count}: {List(Mismatched)}");
        return string.Join("; ", parts);
    }
}

/// <summary>The checkpoint does not fit the model; <see cref="Report"/> says how.</summary>
public sealed class CheckpointMismatchException : InvalidOperationException
{
    /// <summary>What was found.</summary>
    public LoadReport Report { get; }

    /// <summary>Creates the exception.</summary>
    public CheckpointMismatchException(LoadReport report)
        : this(report, "")
    {
    }

    /// <summary>Creates the exception with a hint appended to the message.</summary>
    public CheckpointMismatchException(LoadReport report, string hint)
        : base($"Checkpoint does not match the model: {report}.{hint}") => Report = report;
}

/// <summary>
/// Loads and saves a module's state dict as safetensors. Keys are the module's state-dict keys (timm's for
/// <see cref="Models.VisionTransformer"/>), so a timm or converted big_vision checkpoint loads without renaming.
/// </summary>
public static class SafetensorsCheckpoint
{
    /// <summary>
    /// Copies every tensor of the file whose key and shape match into <paramref name="module"/> (converting dtype
    /// and device as needed, one tensor at a time). Nothing is copied when the check fails: shape mismatches always
    /// throw; with <paramref name="strict"/> (default) missing and unexpected keys throw too. With a
    /// <paramref name="prefix"/> only the file's keys that start with it are considered, the prefix removed (a
    /// training checkpoint keeps the model under <c>model/</c>).
    /// </summary>
    /// <exception cref="CheckpointMismatchException">The file does not fit the model.</exception>
    /// <exception cref="SafetensorsFormatException">The file is malformed.</exception>
    public static LoadReport Load(nn.Module module, string path, bool strict = true, string prefix = "")
    {
        ArgumentNullException.ThrowIfNull(module);
        using var reader = SafetensorsReader.Open(path);
        return Load(module, reader, strict, prefix);
    }

    /// <summary>As <see cref="Load(nn.Module, string, bool, string)"/>, from a file already open (a caller that also
    /// reads other entries of it opens it once).</summary>
    public static LoadReport Load(nn.Module module, SafetensorsReader reader, bool strict = true, string prefix = "")
    {
        ArgumentNullException.ThrowIfNull(module);
        ArgumentNullException.ThrowIfNull(reader);
        ArgumentNullException.ThrowIfNull(prefix);
        string path = reader.Path;
        var target = module.state_dict();
        var loaded = new List<string>();
        var unexpected = new List<string>();
        var mismatched = new List<ShapeMismatch>();
        foreach (var e in reader.Entries.Where(e => e.Name.StartsWith(prefix, StringComparison.Ordinal)))
        {
            string key = e.Name[prefix.Length..];
            if (!target.TryGetValue(key, out var t)) unexpected.Add(key);
            else if (!t.shape.SequenceEqual(e.Shape)) mismatched.Add(new ShapeMismatch(key, t.shape, e.Shape));
            else loaded.Add(key);
        }
        var missing = target.Keys.Where(k => !reader.Contains(prefix + k)).ToList();
        var report = new LoadReport(path, loaded, missing, unexpected, mismatched);
        if (mismatched.Count > 0 || (strict && !report.IsExact)) throw new CheckpointMismatchException(report);
        using var noGrad = torch.no_grad();
        foreach (string key in loaded)
        {
            using var src = reader.Read(prefix + key);
            target[key].copy_(src);
        }
        return report;
    }

    /// <summary>Writes the module's state dict atomically, in state-dict order, in the tensors' own dtype.</summary>
    public static void Save(nn.Module module, string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(module);
        Safetensors.Save(module.state_dict(), path, metadata);
    }
}
