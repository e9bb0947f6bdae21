using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Multi-head self-attention of the classic block (timm <c>Attention</c>): fused <c>qkv</c> [3D, D] (rows q | k | v,
/// each head-major), optional per-head QK-norm over the head dimension (<c>q_norm</c>, <c>k_norm</c>, shared across
/// heads), softmax(q·kᵀ/√d)·v, out-projection <c>proj</c> [D, D].
/// </summary>
public sealed class Attention : nn.Module<Tensor, Tensor>
{
    private readonly Linear qkv;
    private readonly Norm? q_norm, k_norm;
    private readonly Linear proj;
    private readonly int _heads;

    /// <summary>Creates the attention layer of a block with options <paramref name="options"/> (width, heads, biases,
    /// QK-norm).</summary>
    public Attention(BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(Attention))
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Check();
        _heads = options.NumHeads;
        qkv = nn.Linear(options.Dim, options.Layout.QkvFeatures, hasBias: options.QkvBias, device: device, dtype: dtype);
        if (options.QkNorm)
        {
            q_norm = options.NewNorm(options.HeadDim, device, dtype);
            k_norm = options.NewNorm(options.HeadDim, device, dtype);
        }
        proj = nn.Linear(options.Dim, options.Dim, hasBias: options.ProjBias, device: device, dtype: dtype);
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, N, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var parts = qkv.forward(x).chunk(3, -1);
        var z = AttentionOps.Attend(parts[0], parts[1], parts[2], _heads, q_norm, k_norm);
        return proj.forward(z).MoveToOuterDisposeScope();
    }
}

/// <summary>Statistics of one attention layer's logits on one batch (<see cref="AttentionOps.Observe"/>).</summary>
/// <param name="MaxAbsLogit">The largest |q·k/√d| over the batch, heads and token pairs (ViT-22B saw values over
/// 50,000 before divergence without QK-norm).</param>
/// <param name="MeanEntropy">Mean entropy (nats) of the attention distributions (over batch, heads and queries);
/// near zero means one-hot attention.</param>
/// <param name="MinEntropy">The smallest entropy of any head, averaged over batch and queries.</param>
public sealed record AttentionStats(double MaxAbsLogit, double MeanEntropy, double MinEntropy);

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
        var logits = q.matmul(k.transpose(-2, -1)) / Math.Sqrt(q.shape[^1]);     // [B, H, Nq, Nk]
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
