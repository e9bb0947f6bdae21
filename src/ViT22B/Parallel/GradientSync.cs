namespace ViT22B.Parallel;

/// <summary>What one training step's gradient reduction issued on this rank: the FSDP reduce-scatters of the backward
/// pass since the previous <see cref="ShardedVisionTransformer.SynchronizeGradients"/> call, and that call's
/// all-reduces.</summary>
/// <param name="ModelAxisCollectives">All-reduces over the model axis (one per bucket).</param>
/// <param name="ModelAxisBytes">Bytes of gradient they reduced on this rank.</param>
/// <param name="DataAxisCollectives">All-reduces over the data axis (one per bucket).</param>
/// <param name="DataAxisBytes">Bytes of gradient they reduced on this rank.</param>
/// <param name="FsdpReduceScatters">FSDP reduce-scatters over the data axis (one per bucket, or one per data-sharded
/// gradient when <see cref="ShardedVisionTransformer.FsdpBucketBytes"/> is 0).</param>
/// <param name="FsdpBytes">Bytes of full gradient they reduced on this rank.</param>
public sealed record GradientSync(int ModelAxisCollectives, long ModelAxisBytes, int DataAxisCollectives, long DataAxisBytes,
    int FsdpReduceScatters = 0, long FsdpBytes = 0)
{
    /// <summary>All collectives of the step's gradient reduction.</summary>
    public int Collectives => ModelAxisCollectives + DataAxisCollectives + FsdpReduceScatters;
}
