namespace ViT22B.Parallel;

/// <summary>Splits a token count into one contiguous chunk per rank (the first <c>T mod k</c> ranks get one more).</summary>
internal static class TokenPartition
{
    /// <summary>Chunk sizes of <paramref name="tokens"/> over <paramref name="ranks"/> ranks.</summary>
    public static long[] Counts(long tokens, int ranks)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        return Enumerable.Range(0, ranks).Select(r => tokens / ranks + (r < tokens % ranks ? 1 : 0)).ToArray();
    }

    /// <summary>Start of chunk <paramref name="rank"/>.</summary>
    public static long Start(long[] counts, int rank) => counts.Take(rank).Sum();
}
