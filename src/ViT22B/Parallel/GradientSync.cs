namespace ViT22B.Parallel;

/// <summary>What one training step's gradient reduction issued on this rank: the data-axis collectives that backward
/// issued since the previous <see cref="ShardedVisionTransformer.SynchronizeGradients"/> call (FSDP reduce-scatters,
/// all-reduces of the block weights' gradients), and that call's all-reduces.</summary>
/// <param name="ModelAxisCollectives">All-reduces over the model axis (one per bucket).</param>
/// <param name="ModelAxisBytes">Bytes of gradient they reduced on this rank.</param>
/// <param name="DataAxisCollectives">All-reduces over the data axis (one per bucket), those issued in backward
/// included.</param>
/// <param name="DataAxisBytes">Bytes of gradient they reduced on this rank.</param>
/// <param name="FsdpReduceScatters">FSDP reduce-scatters over the data axis (one per bucket, or one per data-sharded
/// gradient when <see cref="ShardedVisionTransformer.BackwardBucketBytes"/> is 0), all issued in backward.</param>
/// <param name="FsdpBytes">Bytes of full gradient they reduced on this rank.</param>
/// <param name="DataAxisInBackward">Of <paramref name="DataAxisCollectives"/>, the all-reduces issued in backward
/// (the block weights' gradients when they are not data-sharded), overlapping it.</param>
public sealed record GradientSync(int ModelAxisCollectives, long ModelAxisBytes, int DataAxisCollectives, long DataAxisBytes,
    int FsdpReduceScatters = 0, long FsdpBytes = 0, int DataAxisInBackward = 0)
{
    /// <summary>All collectives of the step's gradient reduction.</summary>
    public int Collectives => ModelAxisCollectives + DataAxisCollectives + FsdpReduceScatters;

    /// <summary>The collectives issued inside backward: FSDP reduce-scatters and data-axis all-reduces.</summary>
    public int InBackward => FsdpReduceScatters + DataAxisInBackward;
}
