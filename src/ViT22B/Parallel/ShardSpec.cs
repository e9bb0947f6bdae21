namespace ViT22B.Parallel;

/// <summary>
/// Which part of a full parameter a (sharded) module holds: the concatenation, along <see cref="Dim"/>, of the
/// <see cref="Segments"/> <c>[start, start + length)</c> of the full tensor of shape <see cref="FullShape"/>. A
/// tensor-parallel rank of the fused in-projection holds, for example, four segments along dimension 0: its MLP
/// rows and the rows of its heads in each of Q, K and V.
/// </summary>
/// <param name="FullShape">Shape of the unsharded parameter.</param>
/// <param name="Dim">The sharded dimension.</param>
/// <param name="Segments">Ranges of the full tensor along <see cref="Dim"/>, in the order the shard stores them.</param>
public sealed record ShardSpec(long[] FullShape, int Dim, IReadOnlyList<(long Start, long Length)> Segments)
{
    /// <summary>The shape of the shard.</summary>
    public long[] LocalShape
    {
        get
        {
            var s = (long[])FullShape.Clone();
            s[Dim] = Segments.Sum(g => g.Length);
            return s;
        }
    }

    /// <summary>The whole tensor (a replicated parameter).</summary>
    public static ShardSpec Whole(long[] fullShape) => new(fullShape, 0, new[] { (0L, fullShape.Length == 0 ? 1L : fullShape[0]) });

    /// <summary>True when the shard is the whole tensor.</summary>
    public bool IsWhole => FullShape.Length == 0 || Segments.Count == 1 && Segments[0].Start == 0 && Segments[0].Length == FullShape[Dim];

    /// <summary>
    /// The sub-shard made of local indices <c>[start, start + length)</c> along <see cref="Dim"/> of this shard,
    /// expressed as segments of the full tensor (used to shard a shard again, e.g. over the data axis).
    /// </summary>
    public ShardSpec Slice(long start, long length)
    {
        var result = new List<(long, long)>();
        long offset = 0, end = start + length;
        foreach (var (s, l) in Segments)
        {
            long a = Math.Max(start, offset), b = Math.Min(end, offset + l);
            if (b > a) result.Add((s + a - offset, b - a));
            offset += l;
        }
        return this with { Segments = result };
    }
}
