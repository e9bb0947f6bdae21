using System.Globalization;
using System.Text.Json;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Training;

/// <summary>Where a run stands: completed optimizer steps, and the next batch to train on.</summary>
/// <param name="Step">Completed steps (= the next step's index, the schedule's argument).</param>
/// <param name="Epoch">The epoch the next batch belongs to.</param>
/// <param name="BatchInEpoch">The next batch's position in that epoch.</param>
public sealed record TrainingPosition(long Step, int Epoch, int BatchInEpoch);

/// <summary>
/// A training checkpoint in one safetensors file: the model under <c>model/</c> (timm keys), the optimizer state
/// under <c>optimizer/</c>, libtorch's CPU generator state as <c>rng/torch_cpu</c>, and metadata (format, position,
/// config JSON, optimizer, schedule, data order). Written atomically (temporary file, flush, rename): a crash
/// mid-write leaves the previous checkpoint intact. Loading refuses a checkpoint of another config, optimizer or
/// schedule with a message naming the file and the difference.
/// </summary>
public static class TrainingCheckpoint
{
    /// <summary>The <c>format</c> metadata value.</summary>
    public const string Format = "vit22b-training-checkpoint/1";

    /// <summary>Writes a checkpoint atomically.</summary>
    public static void Save(VisionTransformer model, string path, Optimizer optimizer, ILearningRateSchedule schedule,
        TrainingPosition position, string dataOrder)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(optimizer);
        ArgumentNullException.ThrowIfNull(schedule);
        ArgumentNullException.ThrowIfNull(position);
        using var rng = torch.random.get_rng_state();
        var tensors = model.state_dict().Select(kv => KeyValuePair.Create("model/" + kv.Key, kv.Value))
            .Concat(optimizer.State.Select(kv => KeyValuePair.Create("optimizer/" + kv.Key, kv.Value)))
            .Append(KeyValuePair.Create("rng/torch_cpu", rng));
        var metadata = new Dictionary<string, string>
        {
            ["format"] = Format,
            ["step"] = position.Step.ToString(CultureInfo.InvariantCulture),
            ["epoch"] = position.Epoch.ToString(CultureInfo.InvariantCulture),
            ["batch_in_epoch"] = position.BatchInEpoch.ToString(CultureInfo.InvariantCulture),
            ["config"] = ViTConfigJson.ToJson(model.Config),
            ["dtype"] = ViTConfigJson.DTypeName(model.DType),
            ["optimizer"] = optimizer.Describe(),
            ["schedule"] = schedule.Describe(),
            ["data_order"] = dataOrder ?? "",
        };
        Safetensors.Save(tensors, path, metadata);
    }

    /// <summary>The model config stored in a checkpoint.</summary>
    public static ViTConfig ReadConfig(string path)
    {
        using var reader = Open(path);
        return ViTConfigJson.FromJson(Meta(reader, "config"), path);
    }

    /// <summary>Builds the checkpoint's model (its config, the given device, its dtype unless one is given) and loads
    /// its weights, for evaluation or fine-tuning.</summary>
    public static VisionTransformer LoadModel(string path, Device? device = null, ScalarType? dtype = null)
    {
        using var reader = Open(path);
        var config = ViTConfigJson.FromJson(Meta(reader, "config"), path);
        var storedDType = ViTConfigJson.ParseDType(Meta(reader, "dtype"));
        var model = new VisionTransformer(config, device ?? torch.CPU, dtype ?? storedDType);
        try
        {
            SafetensorsCheckpoint.Load(model, reader, strict: true, prefix: "model/");
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Restores model weights, optimizer state and the CPU generator state and returns the position and the data
    /// order the run used. Nothing is changed when the checkpoint does not fit (another config, optimizer or
    /// schedule, or missing tensors).
    /// </summary>
    /// <exception cref="InvalidDataException">The checkpoint does not fit (the message names the file and what differs).</exception>
    public static (TrainingPosition Position, string DataOrder) Load(VisionTransformer model, string path, Optimizer optimizer, ILearningRateSchedule schedule)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(optimizer);
        ArgumentNullException.ThrowIfNull(schedule);
        using var reader = Open(path);
        CheckConfig(path, Meta(reader, "config"), model.Config);
        Expect(path, "dtype", Meta(reader, "dtype"), ViTConfigJson.DTypeName(model.DType));
        Expect(path, "optimizer", Meta(reader, "optimizer"), optimizer.Describe());
        Expect(path, "schedule", Meta(reader, "schedule"), schedule.Describe());
        var position = new TrainingPosition(long.Parse(Meta(reader, "step"), CultureInfo.InvariantCulture),
            int.Parse(Meta(reader, "epoch"), CultureInfo.InvariantCulture), int.Parse(Meta(reader, "batch_in_epoch"), CultureInfo.InvariantCulture));
        string dataOrder = reader.Metadata.TryGetValue("data_order", out var d) ? d : "";
        if (!reader.Contains("rng/torch_cpu")) throw new InvalidDataException($"Training checkpoint '{path}' lacks the tensor 'rng/torch_cpu'.");
        // Checkpoints written before parameters counted their own steps have no 'step' slots (Optimizer.LoadState).
        var missing = optimizer.State.Keys.Where(k => !reader.Contains("optimizer/" + k) && !k.EndsWith(".step", StringComparison.Ordinal)).Take(5).ToList();
        if (missing.Count > 0) throw new InvalidDataException($"Training checkpoint '{path}' lacks optimizer state {string.Join(", ", missing)}.");

        SafetensorsCheckpoint.Load(model, reader, strict: true, prefix: "model/");   // checks every key and shape before copying
        var state = new Dictionary<string, Tensor>();
        try
        {
            foreach (var k in optimizer.State.Keys.Where(k => reader.Contains("optimizer/" + k))) state[k] = reader.Read("optimizer/" + k);
            optimizer.LoadState(state, position.Step, path);
        }
        finally
        {
            foreach (var t in state.Values) t.Dispose();
        }
        using var rng = reader.Read("rng/torch_cpu");
        torch.random.set_rng_state(rng);
        return (position, dataOrder);
    }

    private static SafetensorsReader Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        var reader = SafetensorsReader.Open(path);
        if (!reader.Metadata.TryGetValue("format", out var f) || f != Format)
        {
            reader.Dispose();
            throw new InvalidDataException($"'{path}' is not a ViT22B training checkpoint (metadata 'format' is {(f is null ? "absent" : $"'{f}'")}, expected '{Format}'). For plain model weights use SafetensorsCheckpoint.Load.");
        }
        return reader;
    }

    private static string Meta(SafetensorsReader reader, string key) =>
        reader.Metadata.TryGetValue(key, out var v) ? v : throw new InvalidDataException($"Training checkpoint '{reader.Path}' lacks the metadata entry '{key}'.");

    private static void Expect(string path, string what, string found, string expected)
    {
        if (found != expected)
            throw new InvalidDataException($"Training checkpoint '{path}' was written with {what} '{found}', but this run uses '{expected}'.");
    }

    private static void CheckConfig(string path, string storedJson, ViTConfig config)
    {
        string current = ViTConfigJson.ToJson(config);
        if (storedJson == current) return;
        using var a = JsonDocument.Parse(storedJson);
        using var b = JsonDocument.Parse(current);
        var stored = a.RootElement.EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetRawText());
        var now = b.RootElement.EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetRawText());
        var diffs = stored.Keys.Union(now.Keys)
            .Where(k => !stored.TryGetValue(k, out var x) || !now.TryGetValue(k, out var y) || x != y)
            .Select(k => $"{k}: checkpoint {(stored.TryGetValue(k, out var x) ? x : "absent")}, model {(now.TryGetValue(k, out var y) ? y : "absent")}");
        throw new InvalidDataException($"Training checkpoint '{path}' is for another model config ({string.Join("; ", diffs)}).");
    }
}
