using ViT22B.Layers;
using ViT22B.Models;

namespace ViT22B.Accounting;

/// <summary>Parameter counts by component, computed from a config alone (no tensors).</summary>
/// <param name="PatchEmbed">Patch-embedding kernel and bias.</param>
/// <param name="PosEmbed">Learned position embedding (0 for sincos2d).</param>
/// <param name="ClassToken">Class token.</param>
/// <param name="NormPre">timm's <c>norm_pre</c>.</param>
/// <param name="Blocks">All blocks, every parameter.</param>
/// <param name="BlockMatmulWeights">The blocks' matmul weights only, L·(4D² + 2DF): the N of the FLOPs formula and the
/// convention of ViT-22B's published 21,743M.</param>
/// <param name="FinalNorm">The final norm: <c>norm</c> before pooling, or <c>fc_norm</c> after it.</param>
/// <param name="PoolHead">The MAP head.</param>
/// <param name="Classifier">The linear classifier.</param>
/// <param name="RegTokens">Register tokens.</param>
public sealed record ParameterCount(long PatchEmbed, long PosEmbed, long ClassToken, long NormPre, long Blocks,
    long BlockMatmulWeights, long FinalNorm, long PoolHead, long Classifier, long RegTokens = 0)
{
    /// <summary>Everything.</summary>
    public long Total => Backbone + PoolHead + Classifier;
    /// <summary>Everything but the MAP head and the classifier.</summary>
    public long Backbone => PatchEmbed + PosEmbed + ClassToken + RegTokens + NormPre + Blocks + FinalNorm;
}

/// <summary>Model FLOPs per image (2 FLOPs per multiply-accumulate, matmuls only; docs/model.md#parameters-and-flops).</summary>
/// <param name="Stem">Patch embedding, 2·N_patches·C·P²·D.</param>
/// <param name="BlockMatmuls">2·N·T with N = L·(4D² + 2DF) and T tokens including the class token.</param>
/// <param name="Attention">Q·Kᵀ and A·V, 4·L·T²·D.</param>
/// <param name="Head">MAP head (4·T·D² + 4·D² + 4·T·D + 4·D·F) and classifier (2·D·C).</param>
public sealed record FlopsCount(double Stem, double BlockMatmuls, double Attention, double Head)
{
    /// <summary>Forward FLOPs per image.</summary>
    public double Forward => Stem + BlockMatmuls + Attention + Head;
    /// <summary>Training FLOPs per image: forward + backward = 3 × forward (PaLM's MFU convention: no
    /// rematerialization counted).</summary>
    public double Training => 3 * Forward;
}

/// <summary>
/// Exact parameter counts and model FLOPs from a <see cref="ViTConfig"/> (docs/model.md#parameters-and-flops). Costs nothing for the 22B
/// preset: no tensor is allocated. Counts agree with <c>parameters()</c> of an instantiated
/// <see cref="VisionTransformer"/> for every knob.
/// </summary>
public static class ModelAccounting
{
    /// <summary>Parameter counts of <paramref name="c"/> at <see cref="ViTConfig.ImgSize"/>.</summary>
    public static ParameterCount Parameters(ViTConfig c)
    {
        ArgumentNullException.ThrowIfNull(c);
        c.Validate();
        long d = c.EmbedDim, f = c.MlpDim, hd = c.HeadDim;
        long Norm(long dim) => dim + (c.NormBias ? dim : 0);
        long qkNorms = c.QkNorm ? 2 * Norm(hd) : 0;

        var fl = c.BlockOptions.Layout;
        long layerScales = c.InitValues is null ? 0 : (c.Block == BlockKind.Sequential ? 2 * d : d);
        long block = layerScales + (c.Block == BlockKind.Sequential
            ? 2 * Norm(d)
              + fl.QkvFeatures * d + (c.QkvBias ? fl.QkvFeatures : 0) + qkNorms
              + d * d + (c.ProjBias ? d : 0)
              + d * f + (c.MlpBias ? f : 0) + f * d + (c.MlpBias ? d : 0)
            : Norm(d)
              + fl.InFeatures * d + (fl.InProjBias ? fl.InFeatures : 0) + (fl.SeparateMlpBias ? f : 0) + qkNorms
              + (fl.FuseOutProj
                  ? fl.OutFeatures * d + (fl.OutProjBias ? d : 0)
                  : d * d + (fl.AttnOutProjBias ? d : 0) + f * d + (fl.MlpOutProjBias ? d : 0)));

        long map = c.GlobalPool == GlobalPool.Map
            ? d /* latent */ + (d * d + d) /* q */ + (2 * d * d + 2 * d) /* kv */ + (d * d + d) /* proj */ + Norm(d)
              + (d * f + f) + (f * d + d) /* mlp */
            : 0;

        return new ParameterCount(
            PatchEmbed: (long)c.InChans * c.PatchSize * c.PatchSize * d + (c.PreNorm ? 0 : d),
            PosEmbed: c.PosEmbed == PosEmbedKind.Learn ? (c.NumPatches + (c.NoEmbedClass ? 0 : c.NumPrefixTokens)) * d : 0,
            ClassToken: c.ClassToken ? d : 0,
            NormPre: c.PreNorm ? Norm(d) : 0,
            Blocks: c.Depth * block,
            BlockMatmulWeights: c.Depth * (4 * d * d + 2 * d * f),
            FinalNorm: Norm(d),
            PoolHead: map,
            Classifier: c.NumClasses > 0 ? c.NumClasses * d + c.NumClasses : 0,
            RegTokens: (long)c.RegTokens * d);
    }

    /// <summary>Model FLOPs per image of <paramref name="c"/> at <see cref="ViTConfig.ImgSize"/>.</summary>
    public static FlopsCount Flops(ViTConfig c)
    {
        ArgumentNullException.ThrowIfNull(c);
        c.Validate();
        double d = c.EmbedDim, f = c.MlpDim, l = c.Depth, t = c.NumTokens;
        double n = l * (4 * d * d + 2 * d * f);
        double pooledTokens = c.PoolIncludePrefix ? t : c.NumPatches;       // what the MAP head attends over
        double head = (c.GlobalPool == GlobalPool.Map ? 4 * pooledTokens * d * d + 4 * d * d + 4 * pooledTokens * d + 4 * d * f : 0)
                      + 2 * d * c.NumClasses;
        return new FlopsCount(
            Stem: 2.0 * c.NumPatches * c.InChans * c.PatchSize * c.PatchSize * d,
            BlockMatmuls: 2 * n * t,
            Attention: 4 * l * t * t * d,
            Head: head);
    }

    /// <summary>
    /// FLOPs a training step actually computes per image when the blocks named by <paramref name="checkpointing"/>
    /// recompute their forward pass in backward: <see cref="FlopsCount.Training"/> plus those blocks' forward FLOPs
    /// again. The numerator of hardware FLOPs utilization (HFU); MFU keeps counting model FLOPs only.
    /// </summary>
    public static double HardwareTrainingFlops(ViTConfig c, ActivationCheckpointing checkpointing)
    {
        ArgumentNullException.ThrowIfNull(checkpointing);
        var f = Flops(c);
        checkpointing.Validate(c.Depth);
        return f.Training + (f.BlockMatmuls + f.Attention) * checkpointing.CountIn(c.Depth) / c.Depth;
    }

    /// <summary>Bytes of the parameters alone in <paramref name="dtype"/> (no gradients, optimizer state or activations).</summary>
    public static long ParameterBytes(ViTConfig c, TorchSharp.torch.ScalarType dtype) => Parameters(c).Total * BytesPerElement(dtype, nameof(dtype));

    /// <summary>Bytes of one element of a floating-point dtype.</summary>
    internal static long BytesPerElement(TorchSharp.torch.ScalarType dtype, string paramName) => dtype switch
    {
        TorchSharp.torch.ScalarType.Float64 => 8,
        TorchSharp.torch.ScalarType.Float32 => 4,
        TorchSharp.torch.ScalarType.BFloat16 or TorchSharp.torch.ScalarType.Float16 => 2,
        _ => throw new ArgumentException($"Not a floating-point dtype: {dtype}.", paramName),
    };

    /// <summary>
    /// Throws <see cref="InsufficientMemoryException"/> when the parameters of <paramref name="c"/> in
    /// <paramref name="dtype"/> exceed the memory this process may use on the CPU (the GC's view of available
    /// physical memory, which honours container limits). Call before building a model on the CPU: an
    /// over-committed allocation otherwise ends in the kernel's OOM killer, not in an exception.
    /// </summary>
    public static void EnsureFitsInHostMemory(ViTConfig c, TorchSharp.torch.ScalarType dtype)
    {
        long need = ParameterBytes(c, dtype);
        long have = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        if (need > have)
            throw new InsufficientMemoryException(
                $"The parameters alone need {need / 1e9:F1} GB in {dtype} ({Parameters(c).Total:N0} parameters), but this machine has {have / 1e9:F1} GB; " +
                "pick a smaller preset or dtype, or shard the model.");
    }

    /// <summary>
    /// Model FLOPs utilization (PaLM §4.1): achieved model FLOP/s over peak FLOP/s, where the model FLOPs of a
    /// training step are <see cref="FlopsCount.Training"/> per image and of inference <see cref="FlopsCount.Forward"/>;
    /// null when the achieved rate exceeds the peak (<see cref="Utilization.Of"/>).
    /// </summary>
    public static double? Mfu(double modelFlopsPerImage, double imagesPerSecond, double peakFlopsPerSecond) =>
        Utilization.Of(modelFlopsPerImage * imagesPerSecond, peakFlopsPerSecond);
}
