using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>Validation and cutting shared by the <see cref="ITensorSource.ReadSlice"/> implementations.</summary>
internal static class TensorSlices
{
    public static void Check(string path, string name, long[] shape, int dim, IReadOnlyList<(long Start, long Length)> segments)
    {
        ArgumentNullException.ThrowIfNull(segments);
        if (dim < 0 || dim >= Math.Max(shape.Length, 1) || shape.Length == 0)
            throw new ArgumentException($"{path}: '{name}' of shape [{string.Join(", ", shape)}] has no dimension {dim} to slice.");
        if (segments.Count == 0) throw new ArgumentException($"{path}: no ranges given to read from '{name}'.");
        foreach (var (start, length) in segments)
            if (start < 0 || length <= 0 || start > shape[dim] || length > shape[dim] - start)
                throw new ArgumentException($"{path}: range [{start}, {unchecked(start + length)}) is empty or lies outside dimension {dim} (size {shape[dim]}) of '{name}'.");
    }

    public static Tensor Cut(Tensor whole, int dim, IReadOnlyList<(long Start, long Length)> segments)
    {
        using var scope = torch.NewDisposeScope();
        var parts = segments.Select(g => whole.narrow(dim, g.Start, g.Length)).ToArray();
        return (parts.Length == 1 ? parts[0].clone() : torch.cat(parts, dim)).MoveToOuterDisposeScope();
    }
}
