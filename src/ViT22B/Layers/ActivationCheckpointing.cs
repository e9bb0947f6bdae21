using System.Globalization;

namespace ViT22B.Layers;

/// <summary>
/// Which blocks of an encoder recompute their activations in backward instead of keeping them (activation
/// checkpointing, PyTorch's <c>torch.utils.checkpoint</c>, Megatron's full recompute). A checkpointed block keeps
/// only its input during the forward pass; backward runs its forward again, with gradients, and backpropagates
/// through that. Gradients are the same; memory falls from every block's saved tensors to one block's input per
/// checkpointed block plus one block's saved tensors at a time, and each checkpointed block's forward FLOPs are
/// spent twice. Only training passes are affected: under <c>torch.no_grad()</c> nothing is saved anyway.
/// </summary>
public sealed record ActivationCheckpointing
{
    private readonly int _every;                 // 0: the named set only
    private readonly int[] _blocks;              // sorted, distinct

    private ActivationCheckpointing(int every, int[] blocks) => (_every, _blocks) = (every, blocks);

    /// <summary>No block recomputes: every activation is kept (the default).</summary>
    public static ActivationCheckpointing None { get; } = new(0, Array.Empty<int>());

    /// <summary>Every block recomputes.</summary>
    public static ActivationCheckpointing AllBlocks { get; } = new(1, Array.Empty<int>());

    /// <summary>Blocks 0, <paramref name="n"/>, 2·<paramref name="n"/>, … recompute (<paramref name="n"/> = 1 is
    /// <see cref="AllBlocks"/>).</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="n"/> is not positive.</exception>
    public static ActivationCheckpointing EveryNth(int n)
    {
        if (n < 1) throw new ArgumentOutOfRangeException(nameof(n), $"Checkpoint every n-th block needs n ≥ 1, found {n}.");
        return new(n, Array.Empty<int>());
    }

    /// <summary>The named blocks (0-based) recompute.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A negative index.</exception>
    public static ActivationCheckpointing Blocks(params int[] indices)
    {
        ArgumentNullException.ThrowIfNull(indices);
        foreach (int i in indices)
            if (i < 0) throw new ArgumentOutOfRangeException(nameof(indices), $"Block indices are 0-based and non-negative, found {i}.");
        return new(0, indices.Distinct().Order().ToArray());
    }

    /// <summary>
    /// Parses <c>none</c>, <c>all</c>, <c>every:N</c> or <c>blocks:I,J,…</c> (the samples' <c>--checkpointing</c>).
    /// </summary>
    /// <exception cref="FormatException">Anything else, with the accepted forms.</exception>
    public static ActivationCheckpointing Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var t = text.Trim().ToLowerInvariant();
        const string forms = "use none, all, every:N (blocks 0, N, 2N, …) or blocks:I,J,… (0-based)";
        if (t == "none") return None;
        if (t == "all") return AllBlocks;
        if (t.StartsWith("every:", StringComparison.Ordinal) &&
            int.TryParse(t.AsSpan(6), NumberStyles.None, CultureInfo.InvariantCulture, out int n) && n >= 1)
            return EveryNth(n);
        if (t.StartsWith("blocks:", StringComparison.Ordinal))
        {
            var parts = t[7..].Split(',', StringSplitOptions.TrimEntries);
            var indices = new int[parts.Length];
            for (int i = 0; i < parts.Length; i++)
                if (!int.TryParse(parts[i], NumberStyles.None, CultureInfo.InvariantCulture, out indices[i]))
                    throw new FormatException($"Activation checkpointing '{text}': '{parts[i]}' is not a block index; {forms}.");
            return Blocks(indices);
        }
        throw new FormatException($"Activation checkpointing '{text}' is not understood; {forms}.");
    }

    /// <summary>Whether block <paramref name="block"/> recomputes.</summary>
    public bool Applies(int block) =>
        block >= 0 && (_every > 0 ? block % _every == 0 : Array.BinarySearch(_blocks, block) >= 0);

    /// <summary>How many of the first <paramref name="depth"/> blocks recompute.</summary>
    public int CountIn(int depth) => Enumerable.Range(0, Math.Max(depth, 0)).Count(Applies);

    /// <summary>Throws when the named set refers to a block a stack of <paramref name="depth"/> blocks does not have.</summary>
    /// <exception cref="ArgumentException">An index ≥ <paramref name="depth"/>.</exception>
    public void Validate(int depth)
    {
        if (_blocks.Length > 0 && _blocks[^1] >= depth)
            throw new ArgumentException($"Activation checkpointing names block {_blocks[^1]}, but the encoder has {depth} blocks (0…{depth - 1}).");
    }

    /// <summary>Equal when the same blocks recompute for every depth.</summary>
    public bool Equals(ActivationCheckpointing? other) =>
        other is not null && _every == other._every && _blocks.AsSpan().SequenceEqual(other._blocks);

    /// <inheritdoc />
    public override int GetHashCode() => HashCode.Combine(_every, _blocks.Length, _blocks.Length > 0 ? _blocks[0] : -1);

    /// <summary>The form <see cref="Parse"/> reads.</summary>
    public override string ToString() =>
        _every == 1 ? "all" : _every > 1 ? $"every:{_every}" : _blocks.Length == 0 ? "none" : "blocks:" + string.Join(',', _blocks);
}
