using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>Parameter creation that survives an enclosing dispose scope.</summary>
internal static class Param
{
    /// <summary>
    /// Wraps <paramref name="data"/> in a <see cref="Parameter"/> after detaching it from any active dispose scope:
    /// TorchSharp would otherwise dispose a custom parameter created inside a scope when that scope ends
    /// (docs/torchsharp-notes.md#dispose-scopes-and-parameters), leaving the module with a dead tensor.
    /// </summary>
    public static Parameter Of(Tensor data) => new(data.DetachFromDisposeScope());

    /// <summary>
    /// Sets <paramref name="t"/> to zero in place. TorchSharp 0.107's <c>zero_()</c> returns a new handle onto the same
    /// storage (its other in-place operations return the tensor itself; checked), and an undisposed handle keeps the
    /// storage alive until the garbage collector runs, which a large tensor freed on purpose must not wait for.
    /// </summary>
    public static void Zero(Tensor t)
    {
        var alias = t.zero_();
        if (!ReferenceEquals(alias, t)) alias.Dispose();
    }
}
