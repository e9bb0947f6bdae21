using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// The stack of blocks on one device. A <c>ModuleList</c>, so a model's field <c>blocks</c> yields timm's
/// keys <c>blocks.0.…</c>, <c>blocks.1.…</c>.
/// </summary>
public sealed class Encoder : BlockStack<nn.Module<Tensor, Tensor>>
{
    /// <summary>Creates <paramref name="depth"/> blocks of kind <paramref name="kind"/> with options <paramref name="options"/>.</summary>
    public Encoder(BlockKind kind, int depth, BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32)
        : base(Enumerable.Range(0, depth).Select(_ => kind == BlockKind.Parallel
            ? (nn.Module<Tensor, Tensor>)new ParallelBlock(options, device, dtype)
            : new SequentialBlock(options, device, dtype)).ToArray())
    {
    }

    /// <summary>Runs the blocks in order, [B, N, D] → [B, N, D] (the blocks named by
    /// <see cref="BlockStack{TBlock}.Checkpointing"/> recompute their activations in backward).</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = x;
        for (int i = 0; i < Count; i++)
        {
            var block = this[i];
            h = RunBlock(i, h, block.call);
        }
        return (ReferenceEquals(h, x) ? x.alias() : h).MoveToOuterDisposeScope();
    }
}
