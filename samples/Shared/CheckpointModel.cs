using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

/// <summary>The samples' one way of building a model from a checkpoint file the user names.</summary>
internal static class CheckpointModel
{
    /// <summary>The config a <c>--config</c> value names: a config JSON file, a timm model name or a preset.</summary>
    public static ViTConfig Config(string configArg) =>
        File.Exists(configArg) ? ViTConfigJson.Load(configArg) : ViTConfig.TimmNames.Contains(configArg) ? ViTConfig.FromTimm(configArg) : ViTConfig.Parse(configArg);

    /// <summary>
    /// A float32 CPU model from <paramref name="path"/>: a training checkpoint (its own config; <paramref name="configArg"/>
    /// must then be null), or a checkpoint of any layout the library reads with the config <paramref name="configArg"/>
    /// names (a preset, timm name or config JSON), or else the config stored in its metadata (written by
    /// <c>PretrainedCheckpoint.Save</c>, e.g. <c>Features --save-weights</c>); the activation and norm ε are matched to
    /// the checkpoint's home library. <paramref name="metadata"/> is the file's metadata.
    /// </summary>
    public static VisionTransformer Load(string path, string? configArg, out IReadOnlyDictionary<string, string> metadata)
    {
        using var source = TensorSources.Open(path);
        metadata = source.Metadata.ToDictionary();
        if (source.Metadata.TryGetValue("format", out var format) && format == TrainingCheckpoint.Format)
        {
            if (configArg is not null) throw new ArgumentException($"--config is for checkpoints of other layouts; training checkpoint '{path}' stores its own config.");
            return TrainingCheckpoint.LoadModel(path, torch.CPU, ScalarType.Float32);
        }
        var config = configArg is null
            ? source.Metadata.TryGetValue(PretrainedCheckpoint.ConfigMetadataKey, out var json) ? ViTConfigJson.FromJson(json, path)
                : throw new ArgumentException($"Checkpoint '{path}' stores no config (metadata '{PretrainedCheckpoint.ConfigMetadataKey}') and is not a training checkpoint; pass --config (a preset, timm name or config JSON).")
            : Config(configArg);
        config = PretrainedCheckpoint.MatchHome(config, path, out var changes);   // its home library's activation and norm ε
        foreach (var change in changes) Console.WriteLine($"Config matched to the checkpoint's home: {change}.");
        ModelAccounting.EnsureFitsInHostMemory(config, ScalarType.Float32);
        var model = new VisionTransformer(config, torch.CPU, ScalarType.Float32);
        try
        {
            PretrainedCheckpoint.Load(model, source);
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }
}
