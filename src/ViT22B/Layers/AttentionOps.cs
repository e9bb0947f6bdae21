using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>The attention arithmetic shared by the classic block, the parallel block and the MAP head.</summary>
public static class AttentionOps
{
    [ThreadStatic] private static Action<AttentionStats>? _observer;

    /// <summary>
    /// Until the returned scope is disposed, every attention computed on this thread (each block in order, then the
    /// MAP head) also reports its logit statistics to <paramref name="observer"/>. Costs one extra q·kᵀ per layer
    /// (in float32, float64 for float64 models; without gradient); nothing is computed when no observer is set.
    /// </summary>
    public static IDisposable Observe(Action<AttentionStats> observer)
    {
        ArgumentNullException.ThrowIfNull(observer);
        var previous = _observer;
        _observer = observer;
        return new Restore(() => _observer = previous);
    }

    /// <summary>Until the returned scope is disposed, attention on this thread reports to no observer (a block's
    /// recomputation in backward must not report its statistics twice).</summary>
    internal static IDisposable Suspend()
    {
        var previous = _observer;
        _observer = null;
        return new Restore(() => _observer = previous);
    }

    private sealed class Restore(Action undo) : IDisposable
    {
        public void Dispose() => undo();
    }

    private static void Report(Tensor qh, Tensor kh)   // [B, N, H, d]
    {
        using var noGrad = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var dt = qh.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var q = qh.detach().to(dt).transpose(1, 2);
        var k = kh.detach().to(dt).transpose(1, 2);
        var logits = q.matmul(k.transpose(-2, -1)).DividedBy(Math.Sqrt(q.shape[^1]));     // [B, H, Nq, Nk]
        var logp = logits.log_softmax(-1);
        var entropy = -(logp.exp() * logp).sum(-1);                                // [B, H, Nq]
        var perHead = entropy.mean(new long[] { 0, 2 });                          // [H]
        double Item(Tensor t) => t.to(ScalarType.Float64).item<double>();
        _observer!(new AttentionStats(Item(logits.abs().max()), Item(entropy.mean()), Item(perHead.min())));
    }

    /// <summary>
    /// q [B, Nq, D], k and v [B, Nk, D] → concat over heads of softmax(Norm_q(q_h)·Norm_k(k_h)ᵀ/√d)·v_h, [B, Nq, D].
    /// The norms (when given) act per head and token over the head dimension d = D / heads.
    /// </summary>
    public static Tensor Attend(Tensor q, Tensor k, Tensor v, int heads, Norm? qNorm, Norm? kNorm)
    {
        using var scope = torch.NewDisposeScope();
        long b = q.shape[0], nq = q.shape[1], nk = k.shape[1], dim = q.shape[2], d = dim / heads;
        var qh = q.view(b, nq, heads, d);
        var kh = k.view(b, nk, heads, d);
        if (qNorm is not null) qh = qNorm.call(qh);
        if (kNorm is not null) kh = kNorm.call(kh);
        if (_observer is not null) Report(qh, kh);
        var vh = v.view(b, nk, heads, d).transpose(1, 2);
        var o = nn.functional.scaled_dot_product_attention(qh.transpose(1, 2), kh.transpose(1, 2), vh); // [B, H, Nq, d]
        return o.transpose(1, 2).reshape(b, nq, dim).MoveToOuterDisposeScope();
    }
}

/// <summary>Statistics of one attention layer's logits on one batch (<see cref="AttentionOps.Observe"/>).</summary>
/// <param name="MaxAbsLogit">The largest |q·k/√d| over the batch, heads and token pairs (ViT-22B saw values over
/// 50,000 before divergence without QK-norm).</param>
/// <param name="MeanEntropy">Mean entropy (nats) of the attention distributions (over batch, heads and queries);
/// near zero means one-hot attention.</param>
/// <param name="MinEntropy">The smallest entropy of any head, averaged over batch and queries.</param>
public sealed record AttentionStats(double MaxAbsLogit, double MeanEntropy, double MinEntropy);
