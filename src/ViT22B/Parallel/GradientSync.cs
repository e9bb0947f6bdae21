namespace ViT22B.Parallel;

/// <summary>What one <see cref="ShardedVisionTransformer.SynchronizeGradients"/> call issued.</summary>
/// <param name="ModelAxisCollectives">All-reduces over the model axis (one per bucket).</param>
/// <param name="ModelAxisBytes">Bytes of gradient they reduced on this rank.</param>
/// <param name="DataAxisCollectives">All-reduces over the data axis (one per bucket).</param>
/// <param name="DataAxisBytes">Bytes of gradient they reduced on this rank.</param>
public sealed record GradientSync(int ModelAxisCollectives, long ModelAxisBytes, int DataAxisCollectives, long DataAxisBytes)
{
    /// <summary>All collectives of the call.</summary>
    public int Collectives => ModelAxisCollectives + DataAxisCollectives;
}
