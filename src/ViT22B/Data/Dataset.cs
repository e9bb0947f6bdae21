using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Data;

/// <summary>One labelled example: an image [C, H, W] (float, owned by the caller) and its class index.</summary>
/// <param name="Image">The image tensor; the receiver disposes it.</param>
/// <param name="Label">The class index in [0, classes).</param>
public readonly record struct Example(Tensor Image, long Label);

/// <summary>
/// A random-access labelled image dataset (PyTorch's map-style <c>Dataset</c>). <see cref="Get"/> must be safe to
/// call from several threads at once: <see cref="DataLoader"/> calls it from its worker threads.
/// </summary>
public interface IDataset
{
    /// <summary>Number of examples.</summary>
    int Count { get; }

    /// <summary>Class names, index = label.</summary>
    IReadOnlyList<string> Classes { get; }

    /// <summary>Example <paramref name="index"/>; <paramref name="rng"/> drives random augmentation (the loader
    /// seeds one per example from the run seed, epoch and index, so results do not depend on thread timing).</summary>
    /// <exception cref="InvalidDataException">The example's source is unreadable (the message names it).</exception>
    Example Get(int index, Random rng);

    /// <summary>Where example <paramref name="index"/> comes from (a file path, or "name[index]").</summary>
    string Describe(int index);
}

/// <summary>
/// Examples held in memory: images [N, C, H, W] or [N, H, W] (any dtype; uint8 is scaled to [0, 1]) and labels
/// [N]; an optional transform turns each float [C, H, W] image into the model's input.
/// </summary>
public sealed class TensorDataset : IDataset, IDisposable
{
    private readonly Tensor _images;
    private readonly long[] _labels;
    private readonly ImageTransform? _transform;
    private readonly string _name;

    /// <summary>Wraps <paramref name="images"/> and <paramref name="labels"/> (both copied to CPU; the dataset owns the copies).</summary>
    public TensorDataset(Tensor images, Tensor labels, IReadOnlyList<string> classes, ImageTransform? transform = null, string name = "tensors")
    {
        ArgumentNullException.ThrowIfNull(images);
        ArgumentNullException.ThrowIfNull(labels);
        ArgumentNullException.ThrowIfNull(classes);
        if (images.dim() is not (3 or 4))
            throw new ArgumentException($"{name}: images must be [N, H, W] or [N, C, H, W], found [{string.Join(", ", images.shape)}].", nameof(images));
        if (labels.dim() != 1 || labels.shape[0] != images.shape[0])
            throw new ArgumentException($"{name}: labels must be [N] with N = {images.shape[0]} images, found [{string.Join(", ", labels.shape)}].", nameof(labels));
        if (classes.Count == 0) throw new ArgumentException($"{name}: at least one class is needed.", nameof(classes));
        using var scope = NewDisposeScope();   // holds the temporaries through each native call
        _labels = labels.to(ScalarType.Int64).cpu().data<long>().ToArray();
        for (int i = 0; i < _labels.Length; i++)
            if (_labels[i] < 0 || _labels[i] >= classes.Count)
                throw new ArgumentException($"{name}: label {_labels[i]} of example {i} is outside [0, {classes.Count}).", nameof(labels));
        _images = (images.dim() == 3 ? images.unsqueeze(1) : images).cpu().detach().clone().DetachFromDisposeScope();
        Classes = classes;
        _transform = transform;
        _name = name;
    }

    /// <inheritdoc />
    public int Count => (int)_images.shape[0];

    /// <inheritdoc />
    public IReadOnlyList<string> Classes { get; }

    /// <summary>All labels, in order.</summary>
    public IReadOnlyList<long> Labels => _labels;

    /// <inheritdoc />
    public Example Get(int index, Random rng)
    {
        if ((uint)index >= (uint)Count) throw new ArgumentOutOfRangeException(nameof(index), $"{_name}: index {index} is outside [0, {Count}).");
        using var scope = NewDisposeScope();
        var x = _images[index];
        x = x.dtype == ScalarType.Byte ? x.to(ScalarType.Float32).DividedBy(255.0) : x.to(ScalarType.Float32);
        if (_transform is not null) x = _transform(x, rng);
        return new Example(x.MoveToOuterDisposeScope(), _labels[index]);
    }

    /// <inheritdoc />
    public string Describe(int index) => $"{_name}[{index}]";

    /// <inheritdoc />
    public void Dispose() => _images.Dispose();
}

/// <summary>A view of some examples of another dataset (PyTorch's <c>Subset</c>); does not own it.</summary>
public sealed class Subset : IDataset
{
    private readonly IDataset _inner;
    private readonly int[] _indices;

    /// <summary>The examples <paramref name="indices"/> of <paramref name="inner"/>, in that order.</summary>
    public Subset(IDataset inner, IEnumerable<int> indices)
    {
        _inner = inner ?? throw new ArgumentNullException(nameof(inner));
        _indices = indices.ToArray();
        foreach (int i in _indices)
            if ((uint)i >= (uint)inner.Count) throw new ArgumentOutOfRangeException(nameof(indices), $"Index {i} is outside [0, {inner.Count}).");
    }

    /// <summary>The first <paramref name="count"/> examples of <paramref name="inner"/> (all of them if it has fewer).</summary>
    public static Subset First(IDataset inner, int count) => new(inner, Enumerable.Range(0, Math.Min(count, inner.Count)));

    /// <inheritdoc />
    public int Count => _indices.Length;
    /// <inheritdoc />
    public IReadOnlyList<string> Classes => _inner.Classes;
    /// <inheritdoc />
    public Example Get(int index, Random rng) => _inner.Get(_indices[index], rng);
    /// <inheritdoc />
    public string Describe(int index) => _inner.Describe(_indices[index]);
}
