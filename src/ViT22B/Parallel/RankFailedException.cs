namespace ViT22B.Parallel;

/// <summary>One rank's failure, as collected by <see cref="Spmd"/>.</summary>
public sealed class RankFailedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public RankFailedException(int rank, Exception inner) : base($"Rank {rank} failed: {inner.Message}", inner) => Rank = rank;

    /// <summary>The failed rank.</summary>
    public int Rank { get; }
}
