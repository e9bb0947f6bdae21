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
}
