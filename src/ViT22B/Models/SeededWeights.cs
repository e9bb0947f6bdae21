using System.Text;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Torch;
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
    private readonly int _readers;
    private readonly Dictionary<string, Shared> _shared = new();

    private sealed class Shared(Lazy<Tensor> tensor)
    {
        public Lazy<Tensor> Tensor { get; } = tensor;
        public int Handed;      // readers that asked for it
        public int Aliased;     // readers that hold their handle
    }

    /// <summary>The weights of <paramref name="config"/>'s model for <paramref name="seed"/>.</summary>
    /// <param name="config">The model.</param>
    /// <param name="seed">The seed.</param>
    /// <param name="readersPerTensor">How many readers will ask for each tensor (the ranks of a model axis simulated in
    /// one process, which each cut their slice out of every block tensor): the first read computes it, every reader gets
    /// a handle onto the same storage, and the source forgets it when all have had theirs (a tensor fewer readers ask
    /// for stays until the source is disposed). With 1 (the default) every read computes its own tensor.</param>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="readersPerTensor"/> is less than 1.</exception>
    public SeededWeights(ViTConfig config, ulong seed, int readersPerTensor = 1)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(readersPerTensor, 1);
        _config = config.Validate();
        _seed = seed;
        _readers = readersPerTensor;
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

    /// <summary>Computes parameter <paramref name="name"/> as a float32 CPU tensor (safe to call from several threads;
    /// with several readers per tensor, a handle onto the storage the first read computed).</summary>
    /// <exception cref="KeyNotFoundException">The model has no such parameter.</exception>
    public Tensor Read(string name)
    {
        if (_readers == 1) return Compute(name);
        _ = ShapeOf(name);
        Shared entry;
        lock (_shared)
        {
            if (!_shared.TryGetValue(name, out entry!)) _shared[name] = entry = new Shared(new Lazy<Tensor>(() => Compute(name)));
            if (++entry.Handed == _readers) _shared.Remove(name);
        }
        var result = entry.Tensor.Value.alias();         // computed by the first reader; the others wait for it
        lock (entry)
        {
            // The last reader to take its handle releases the source's own; the handles keep the storage.
            if (++entry.Aliased == _readers) entry.Tensor.Value.Dispose();
        }
        return result;
    }

    private Tensor Compute(string name)
    {
        var shape = ShapeOf(name);
        using var generator = new torch.Generator(KeySeed(name));
        using var noGrad = torch.no_grad();
        // Owned by the caller, not by a dispose scope of the thread that happens to compute it: with several readers
        // per tensor the last reader, on another thread, releases it.
        using var scope = torch.NewDisposeScope();
        var t = torch.empty(shape, dtype: ScalarType.Float32);
        string leaf = name[(name.LastIndexOf('.') + 1)..];
        // Values the modules are created with and the rules leave alone: norm scales one, LayerScale init_values.
        if (leaf == "gamma") t.FillInPlace(_config.InitValues ?? 1.0);
        else if (leaf == "weight" && shape.Length == 1) t.FillInPlace(1.0);
        else Param.Zero(t);
        Initialization.Apply(_config, name, t, shape, Initialization.FillWhole, generator);
        return t.DetachFromDisposeScope();
    }

    /// <summary>FNV-1a over the seed and the key: a parameter's stream depends on nothing else.</summary>
    private ulong KeySeed(string key)
    {
        ulong h = 14695981039346656037UL;
        foreach (byte b in BitConverter.GetBytes(_seed).Concat(Encoding.UTF8.GetBytes(key)))
            h = (h ^ b) * 1099511628211UL;
        return h;
    }

    /// <summary>Releases tensors computed for readers that never came.</summary>
    public void Dispose()
    {
        lock (_shared)
        {
            foreach (var entry in _shared.Values)
                if (entry.Tensor.IsValueCreated) entry.Tensor.Value.Dispose();
            _shared.Clear();
        }
    }
}
