using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Training;

/// <summary>Classification loss.</summary>
public enum LossKind
{
    /// <summary>Softmax cross-entropy over the classes (mean over the batch).</summary>
    Softmax,
    /// <summary>Sigmoid cross-entropy with one-hot targets, summed over classes and averaged over the batch
    /// (big_vision <c>sigmoid_xent</c>; the ViT-22B pre-training loss).</summary>
    Sigmoid,
}

/// <summary>Losses on logits [B, C] and integer labels [B], computed in float32 (or float64) whatever the model dtype.</summary>
public static class Losses
{
    /// <summary>The loss of <paramref name="logits"/> against <paramref name="labels"/> (a scalar).</summary>
    /// <param name="logits">[B, C].</param>
    /// <param name="labels">[B] class indices (int64).</param>
    /// <param name="kind">Softmax or sigmoid cross-entropy.</param>
    /// <param name="labelSmoothing">Softmax only: target = (1 − s)·one-hot + s/C.</param>
    public static Tensor Compute(Tensor logits, Tensor labels, LossKind kind, double labelSmoothing = 0)
    {
        if (logits.dim() != 2) throw new ArgumentException($"Expected logits [B, C], found [{string.Join(", ", logits.shape)}].", nameof(logits));
        if (labels.dim() != 1 || labels.shape[0] != logits.shape[0])
            throw new ArgumentException($"Expected labels [{logits.shape[0]}], found [{string.Join(", ", labels.shape)}].", nameof(labels));
        if (labelSmoothing is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(labelSmoothing), $"must be in [0, 1), found {labelSmoothing}.");
        using var scope = NewDisposeScope();
        var z = logits.dtype == ScalarType.Float64 ? logits : logits.to(ScalarType.Float32);
        Tensor loss;
        if (kind == LossKind.Softmax)
        {
            loss = nn.functional.cross_entropy(z, labels, label_smoothing: labelSmoothing);
        }
        else
        {
            if (labelSmoothing != 0) throw new ArgumentException("Label smoothing applies to the softmax loss only.", nameof(labelSmoothing));
            var target = nn.functional.one_hot(labels, z.shape[1]).to(z.dtype);
            loss = nn.functional.binary_cross_entropy_with_logits(z, target, reduction: nn.Reduction.None).sum(1).mean();
        }
        return loss.MoveToOuterDisposeScope();
    }

    /// <summary>Top-k correct counts: for each k of <paramref name="ks"/>, how many rows have their label among the
    /// k largest logits.</summary>
    public static long[] TopKCorrect(Tensor logits, Tensor labels, params int[] ks)
    {
        using var scope = NewDisposeScope();
        int maxK = (int)Math.Min(ks.Max(), logits.shape[1]);
        var top = logits.topk(maxK, dim: 1).indexes;                     // [B, maxK]
        var hit = top.eq(labels.unsqueeze(1));                           // [B, maxK]
        return ks.Select(k => hit.narrow(1, 0, Math.Min(k, maxK)).any(1).sum().item<long>()).ToArray();
    }

    /// <summary>
    /// Scales all gradients so that their global L2 norm is at most <paramref name="maxNorm"/> (PyTorch
    /// <c>clip_grad_norm_</c>: coefficient maxNorm / (norm + 1e-6), capped at 1) and returns the norm before
    /// clipping (computed in float64). <paramref name="maxNorm"/> ≤ 0 only measures.
    /// </summary>
    public static double ClipGradNorm(IEnumerable<Tensor> parameters, double maxNorm)
    {
        using var scope = NewDisposeScope();
        var grads = parameters.Select(p => p.grad).Where(g => g is not null).Select(g => g!).ToList();
        if (grads.Count == 0) return 0;
        double norm = torch.stack(grads.Select(g => g.to(ScalarType.Float64).Squared().sum())).sum().sqrt().item<double>();
        if (maxNorm > 0 && double.IsFinite(norm))
        {
            double coef = maxNorm / (norm + 1e-6);
            if (coef < 1)
                using (torch.no_grad())
                    foreach (var g in grads) g.TimesInPlace(coef);
        }
        return norm;
    }
}
