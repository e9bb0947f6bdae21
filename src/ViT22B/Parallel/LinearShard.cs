using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>Holds one linear layer's parameters (keys <c>weight</c>, <c>bias</c>) without computing anything.</summary>
internal sealed class LinearShard : nn.Module
{
    private readonly Parameter weight;
    private readonly Parameter? bias;

    public LinearShard(ShardContext s, string prefix, long outFeatures, long inFeatures, bool hasBias, ScalarType dtype, Device device)
        : base(nameof(LinearShard))
    {
        (Prefix, FullWeight, FullBias) = (prefix, new[] { outFeatures, inFeatures }, new[] { outFeatures });
        weight = s.NewParameter(prefix + "weight", FullWeight, dtype, device);
        if (hasBias) bias = s.NewParameter(prefix + "bias", FullBias, dtype, device);
        RegisterComponents();
    }

    public string Prefix { get; }
    public long[] FullWeight { get; }
    public long[] FullBias { get; }
    public Tensor Weight(ShardContext s) => s.Use(Prefix + "weight", weight, FullWeight);
    public Tensor? Bias => bias;
}
