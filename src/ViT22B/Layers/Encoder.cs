using TorchSharp;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// The stack of blocks on one device. A <c>ModuleList</c>, so a model's field <c>blocks</c> yields timm's
/// keys <c>blocks.0.…</c>, <c>blocks.1.…</c>.
/// </summary>
public sealed class Encoder : BlockStack
{
    /// <summary>Creates <see cref="ViTConfig.Depth"/> blocks of kind <see cref="ViTConfig.Block"/>.</summary>
    public Encoder(ViTConfig c, Device? device = null, ScalarType dtype = ScalarType.Float32)
        : base(Enumerable.Range(0, c.Depth).Select(_ => c.Block == BlockKind.Parallel
            ? (nn.Module<Tensor, Tensor>)new ParallelBlock(c, device, dtype)
            : new SequentialBlock(c, device, dtype)).ToArray())
    {
    }

    /// <summary>Runs the blocks in order, [B, N, D] → [B, N, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = x;
        foreach (var block in this) h = block.call(h);
        return (ReferenceEquals(h, x) ? x.alias() : h).MoveToOuterDisposeScope();
    }
}
