using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Accounting;

/// <summary>Bytes one device holds for a model, by kind.</summary>
/// <param name="Weights">Parameters (this device's shards and the replicated rest).</param>
/// <param name="Gradients">Parameter gradients (training only; same dtype and sharding as the weights).</param>
/// <param name="OptimizerState">The state of this library's <c>ViT22B.Training.AdamW</c>, training only: two moments
/// per parameter in float32 (float64 for float64 parameters) and, for 16-bit parameters, a float32 master copy, so 12
/// bytes per bfloat16 parameter, 8 per float32 one.</param>
/// <param name="Activations">Peak activation memory: for inference the largest set of tensors alive at once inside
/// a block; for training <see cref="SavedActivations"/>, plus one block's saved tensors while a checkpointed block is
/// recomputed in backward, plus that working set.</param>
public sealed record MemoryPlan(long Weights, long Gradients, long OptimizerState, long Activations)
{
    /// <summary>Training: what autograd holds between the forward and the backward pass (every block's saved tensors,
    /// or only its input for a checkpointed block, plus the stem output and the gathered tokens before the head);
    /// 0 for inference.</summary>
    public long SavedActivations { get; init; }

    /// <summary>Streamed inference: the buffer one tensor is read into before it is cut to this rank's slice and
    /// converted to the parameter dtype; 0 otherwise.</summary>
    public long Staging { get; init; }

    /// <summary>FSDP: the block weights gathered over the data axis that are alive at the peak. Autograd keeps each
    /// block's gathered weights from its forward to its backward (its matmuls' backward needs them), unless the block
    /// is recomputed, which gathers them again in backward; so in training every non-recomputed block's (one block's
    /// at a time for recomputed ones), in inference one block's. 0 without FSDP or with one data rank. Derived from
    /// what the code keeps, not checked against the allocator.</summary>
    public long GatheredWeights { get; init; }

    /// <summary>Everything.</summary>
    public long Total => Weights + Gradients + OptimizerState + Activations + Staging + GatheredWeights;

    /// <summary>Whether <see cref="Total"/> fits in <paramref name="deviceBytes"/>.</summary>
    public bool FitsIn(long deviceBytes) => Total <= deviceBytes;
}

/// <summary>
/// Estimates the bytes per device of weights, gradients, optimizer state and activations for a preset, dtype, batch,
/// training or inference, and a data × model mesh (tensor-parallel blocks as in <c>ViT22B.Parallel</c>, optional FSDP
/// over the data axis) — from the config alone, so it answers questions such as whether ViT-22B/14 bf16 inference
/// fits one 80 GB GPU before anything is allocated. The activation model is derived from the block equations
/// (which tensors are alive, which autograd saves) and checked against measured peak resident memory for small
/// presets on the CPU (tests); it ignores allocator fragmentation and framework workspace (cuBLAS, flash attention),
/// so keep a margin.
/// </summary>
public static class MemoryPlanner
{
    /// <summary>Plans one device's memory.</summary>
    /// <param name="c">The model.</param>
    /// <param name="dtype">Parameter and activation dtype.</param>
    /// <param name="batch">Global batch (split over the data axis).</param>
    /// <param name="training">Training (gradients, the library's AdamW state, saved activations) or inference.</param>
    /// <param name="model">Tensor-parallel degree.</param>
    /// <param name="data">Data-parallel degree.</param>
    /// <param name="fsdp">Shard block weights (and their gradients and optimizer state) over the data axis too.</param>
    /// <param name="checkpointing">Blocks that recompute their activations in backward (training only; default none).</param>
    public static MemoryPlan Plan(ViTConfig c, ScalarType dtype, int batch, bool training, int model = 1, int data = 1, bool fsdp = false,
        ActivationCheckpointing? checkpointing = null)
    {
        ArgumentNullException.ThrowIfNull(c);
        c.Validate();
        checkpointing ??= ActivationCheckpointing.None;
        checkpointing.Validate(c.Depth);
        if (batch < 1 || model < 1 || data < 1) throw new ArgumentException($"batch ({batch}), model ({model}) and data ({data}) must be at least 1.");
        if (c.NumHeads % model != 0 || c.MlpDim % model != 0)
            throw new ArgumentException($"A model axis of {model} must divide num_heads ({c.NumHeads}) and mlp_dim ({c.MlpDim}).");
        long size = ModelAccounting.BytesPerElement(dtype, nameof(dtype));
        var p = ModelAccounting.Parameters(c);
        long l = c.Depth;
        long splitBiases = l * SplitBiasesPerBlock(c);
        double weightsPerDevice = p.Total - p.BlockMatmulWeights - splitBiases
            + (double)p.BlockMatmulWeights / model / (fsdp ? data : 1) + (double)splitBiases / model;
        long parameters = (long)Math.Ceiling(weightsPerDevice);
        long weights = parameters * size;
        // AdamW: float32 moments (float64 for float64 parameters), and a float32 master copy of 16-bit parameters.
        long optimizer = parameters * (size < 4 ? 2 * 4 + 4 : 2 * size);
        int recomputed = training ? checkpointing.CountIn(c.Depth) : 0;
        double gatheredPerBlock = fsdp && data > 1 ? (double)p.BlockMatmulWeights / l / model : 0;
        double gathered = !training ? gatheredPerBlock
            : (l - recomputed) * gatheredPerBlock + (recomputed > 0 ? gatheredPerBlock : 0);

        // Activations, in elements of the activation dtype, for this device's share of the batch.
        double b = Math.Ceiling((double)batch / data), t = c.NumTokens, k = model, d = c.EmbedDim, f = c.MlpDim;
        double bt = b * t;
        double qkNorm = c.QkNorm ? 2 * d : 0, qkv = c.BlockOptions.Layout.QkvFeatures;
        double working = Working(c, bt, k);
        double activations = working, kept = 0;
        if (training)
        {
            // Saved for backward per block: norm inputs (own tokens), gathered normed inputs, q/k/v and the attention
            // output, QK-norm inputs, the MLP pre-activation and activation (own heads / MLP slice).
            double saved = c.Block == BlockKind.Parallel
                ? bt * (d / k + d + (qkv + d + qkNorm + f + f) / k)
                : bt * (2 * d / k + 2 * d + (qkv + d + qkNorm + f + f) / k);
            // A checkpointed block keeps only its input (own tokens); in backward one block at a time is recomputed
            // and holds its saved tensors again.
            kept = (l - recomputed) * saved + recomputed * bt * d / k + bt * d * 2;   // + stem output and the gathered tokens before the head
            activations = kept + (recomputed > 0 ? saved : 0) + working;
        }
        long acts = (long)Math.Ceiling(activations) * size;
        return new MemoryPlan(weights, training ? weights : 0, training ? optimizer : 0, acts)
        {
            SavedActivations = (long)Math.Ceiling(kept) * size,
            GatheredWeights = (long)Math.Ceiling(gathered) * size,
        };
    }

    /// <summary>
    /// Plans one rank's memory for block-streamed inference (<c>StreamedVisionTransformer</c>, or
    /// <c>StreamedShardedVisionTransformer</c> on a model axis of <paramref name="model"/>): the resident stem and head,
    /// one block (two with prefetch, each cut to the rank's slices), the staging buffer of the largest block tensor as
    /// the source stores it (plus its slice when sharded), and one block's working set. A process that simulates the
    /// mesh with threads holds <paramref name="model"/> of these. This is the CPU's picture, where blocks are built
    /// where they run: on a GPU the prefetched blocks are built in host memory and moved to the device one at a time,
    /// so the device holds one block and the host up to two, a split this plan does not make.
    /// </summary>
    /// <param name="c">The model.</param>
    /// <param name="dtype">Parameter and activation dtype.</param>
    /// <param name="batch">Images per pass.</param>
    /// <param name="model">Tensor-parallel degree.</param>
    /// <param name="prefetch">The next block is loaded while the current one computes.</param>
    /// <param name="sourceDtype">The dtype the weight source returns (float32 for <c>SeededWeights</c>).</param>
    public static MemoryPlan PlanStreamedInference(ViTConfig c, ScalarType dtype, int batch, int model = 1, bool prefetch = true,
        ScalarType sourceDtype = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(c);
        c.Validate();
        if (batch < 1 || model < 1) throw new ArgumentException($"batch ({batch}) and model ({model}) must be at least 1.");
        if (c.NumHeads % model != 0 || c.MlpDim % model != 0)
            throw new ArgumentException($"A model axis of {model} must divide num_heads ({c.NumHeads}) and mlp_dim ({c.MlpDim}).");
        long size = ModelAccounting.BytesPerElement(dtype, nameof(dtype)), sourceSize = ModelAccounting.BytesPerElement(sourceDtype, nameof(sourceDtype));
        var p = ModelAccounting.Parameters(c);
        double blockParams = (double)p.Blocks / c.Depth;
        double split = (double)p.BlockMatmulWeights / c.Depth + SplitBiasesPerBlock(c);
        double blockPerRank = blockParams - split + split / model;
        double resident = p.Total - p.Blocks;
        long largest = VisionTransformer.StateShapes(c with { Depth = 1 })
            .Where(kv => kv.Key.StartsWith("blocks.0.", StringComparison.Ordinal))
            .Max(kv => kv.Value.Aggregate(1L, (a, n) => a * n));
        double staging = largest * (double)sourceSize * (model > 1 ? 1 + 1.0 / model : 1);
        double working = Working(c, batch * (double)c.NumTokens, model);
        return new MemoryPlan((long)Math.Ceiling(resident + (prefetch ? 2 : 1) * blockPerRank) * size, 0, 0, (long)Math.Ceiling(working) * size)
        {
            Staging = (long)Math.Ceiling(staging),
        };
    }

    /// <summary>Biases of a block that are split over the model axis with their rows.</summary>
    private static long SplitBiasesPerBlock(ViTConfig c)
    {
        var layout = c.BlockOptions.Layout;
        long f = c.MlpDim;
        return c.Block == BlockKind.Parallel
            ? (layout.InProjBias ? layout.InFeatures : layout.SeparateMlpBias ? f : 0)
            : (c.QkvBias ? layout.QkvFeatures : 0) + (c.MlpBias ? f : 0);
    }

    /// <summary>Working set inside one block (elements), for <paramref name="bt"/> images × tokens on a model axis of
    /// <paramref name="k"/>: block input and output, normed input (all tokens when sharded), the in-projection outputs,
    /// the attention output and the MLP hidden activation.</summary>
    private static double Working(ViTConfig c, double bt, double k)
    {
        double d = c.EmbedDim, f = c.MlpDim;
        var layout = c.BlockOptions.Layout;
        return c.Block == BlockKind.Parallel
            ? bt * (2 * d / k + d + (layout.InFeatures + d + f) / k)
            : bt * (2 * d / k + d + Math.Max(layout.QkvFeatures + d, f + f) / k);
    }
}
