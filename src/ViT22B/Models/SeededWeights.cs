using System.Text;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>
/// A checkpoint that is computed instead of stored: every parameter of a config's model, big_vision-initialized
/// (<see cref="Initialization"/>) in float32 from a generator seeded by the seed and the parameter's key, so any one
/// tensor can be produced on its own, in any order, on any thread, and is the same every time. Lets a model too large
/// for memory (ViT-22B/14 on a 24 GiB machine) run block by block (<see cref="StreamedVisionTransformer"/>) with the
/// same weights whether it runs on one device or sharded.
/// </summary>
public sealed class SeededWeights : ITensorSource
{
    private readonly ViTConfig _config;
    private readonly ulong _seed;
    private readonly Dictionary<string, long[]> _shapes;

    /// <summary>The weights of <paramref name="config"/>'s model for <paramref name="seed"/>.</summary>
    public SeededWeights(ViTConfig config, ulong seed)
    {
        ArgumentNullException.ThrowIfNull(config);
        _config = config.Validate();
        _seed = seed;
        _shapes = VisionTransformer.StateShapes(config);
        Names = _shapes.Keys.ToArray();
        Metadata = new Dictionary<string, string> { ["config"] = ViTConfigJson.ToJson(config), ["seed"] = seed.ToString(System.Globalization.CultureInfo.InvariantCulture) };
    }

    /// <inheritdoc />
    public string Path => $"seeded weights (seed {_seed})";

    /// <inheritdoc />
    public IReadOnlyList<string> Names { get; }

    /// <summary>The config (<c>config</c>, as <see cref="ViTConfigJson"/>) and the seed (<c>seed</c>).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <inheritdoc />
    public bool Contains(string name) => _shapes.ContainsKey(name);

    /// <inheritdoc />
    public long[] ShapeOf(string name) =>
        _shapes.TryGetValue(name, out var shape) ? (long[])shape.Clone() : throw new KeyNotFoundException($"The model of {Path} has no parameter '{name}'.");

    /// <summary>Computes parameter <paramref name="name"/> as a new float32 CPU tensor.</summary>
    /// <exception cref="KeyNotFoundException">The model has no such parameter.</exception>
    public Tensor Read(string name)
    {
        var shape = ShapeOf(name);
        var generator = new torch.Generator(KeySeed(name));
        using var noGrad = torch.no_grad();
        var t = torch.empty(shape, dtype: ScalarType.Float32);
        string leaf = name[(name.LastIndexOf('.') + 1)..];
        // Values the modules are created with and the rules leave alone: norm scales one, LayerScale init_values.
        if (leaf == "gamma") t.fill_(_config.InitValues ?? 1.0);
        else if (leaf == "weight" && shape.Length == 1) t.fill_(1.0);
        else Param.Zero(t);
        Initialization.Apply(_config, name, t, shape, Initialization.FillWhole, generator);
        return t;
    }

    /// <summary>FNV-1a over the seed and the key: a parameter's stream depends on nothing else.</summary>
    private ulong KeySeed(string key)
    {
        ulong h = 14695981039346656037UL;
        foreach (byte b in BitConverter.GetBytes(_seed).Concat(Encoding.UTF8.GetBytes(key)))
            h = (h ^ b) * 1099511628211UL;
        return h;
    }

    /// <summary>Nothing to release.</summary>
    public void Dispose() { }
}
