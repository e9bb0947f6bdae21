using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>
/// Named tensors read one at a time from a checkpoint on disk: a safetensors file (<see cref="SafetensorsReader"/>),
/// a Hugging Face sharded checkpoint (<see cref="SafetensorsIndex"/>) or a NumPy <c>.npz</c> archive
/// (<see cref="NpzReader"/>). Shapes and dtypes are known without reading any tensor data.
/// </summary>
public interface ITensorSource : IDisposable
{
    /// <summary>The file or index the tensors come from (used in messages).</summary>
    string Path { get; }

    /// <summary>Tensor names in storage order.</summary>
    IReadOnlyList<string> Names { get; }

    /// <summary>Metadata stored with the tensors (safetensors <c>__metadata__</c>; empty where the format has none).</summary>
    IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>True when the source holds a tensor of that name.</summary>
    bool Contains(string name);

    /// <summary>The shape of a tensor, from the header alone.</summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name (the message names the file).</exception>
    long[] ShapeOf(string name);

    /// <summary>Reads a tensor into a new CPU tensor of its stored dtype.</summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name (the message names the file).</exception>
    Tensor Read(string name);

    /// <summary>
    /// Reads part of a tensor: the concatenation along <paramref name="dim"/> of the ranges
    /// <paramref name="segments"/> (a shard of a tensor-parallel rank, for example), as a new CPU tensor of the stored
    /// dtype. This default reads the whole tensor and cuts it; <see cref="SafetensorsReader"/> (and so
    /// <see cref="SafetensorsIndex"/>) copies only the slice's bytes out of a memory mapping of the file.
    /// </summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name.</exception>
    /// <exception cref="ArgumentException">The dimension or a range lies outside the tensor.</exception>
    Tensor ReadSlice(string name, int dim, IReadOnlyList<(long Start, long Length)> segments)
    {
        var shape = ShapeOf(name);
        TensorSlices.Check(Path, name, shape, dim, segments);
        using var whole = Read(name);
        return TensorSlices.Cut(whole, dim, segments);
    }
}
