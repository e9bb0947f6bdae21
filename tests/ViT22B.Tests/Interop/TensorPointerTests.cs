using System.Runtime.InteropServices;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Interop;

public sealed class TensorPointerTests
{
    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    [InlineData(ScalarType.Float64)]
    public void Pointer_addresses_the_tensors_own_bytes_including_the_offset(ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        using var x = ScalarMath.Arange(100, ScalarType.Float32, torch.CPU).reshape(10, 10).to(dtype);
        using var y = x.narrow(0, 2, 3);                                  // a view: storage offset 20 elements
        nint px = TensorPointers.DataPointer(x), py = TensorPointers.DataPointer(y);
        Assert.Equal(20 * x.element_size(), (long)(py - px));
        var expected = y.contiguous().bytes.ToArray();                     // the view's bytes, read by TorchSharp
        var read = new byte[expected.Length];
        Marshal.Copy(py, read, 0, read.Length);
        Assert.Equal(expected, read);
    }

    [Fact]
    public void Non_contiguous_tensors_are_refused_unless_allowed()
    {
        using var x = torch.zeros(4, 6);
        using var t = x.t();
        var e = Assert.Throws<ArgumentException>(() => TensorPointers.DataPointer(t));
        Assert.Contains("contiguous", e.Message);
        Assert.Equal(TensorPointers.DataPointer(x), TensorPointers.DataPointer(t, requireContiguous: false));
    }
}
