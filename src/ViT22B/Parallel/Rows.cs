using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>New tensors shaped like another but for dimension 0 (token chunks; padded collective buffers).</summary>
internal static class Rows
{
    /// <summary>Zeros with <paramref name="rows"/> rows and <paramref name="like"/>'s other dimensions, dtype and device.</summary>
    public static Tensor Zeros(long rows, Tensor like) => torch.zeros(Shape(rows, like), dtype: like.dtype, device: like.device);

    /// <summary>Uninitialized, otherwise as <see cref="Zeros"/>.</summary>
    public static Tensor Empty(long rows, Tensor like) => torch.empty(Shape(rows, like), dtype: like.dtype, device: like.device);

    private static long[] Shape(long rows, Tensor like) => new[] { rows }.Concat(like.shape.Skip(1)).ToArray();
}
