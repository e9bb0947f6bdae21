using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests;

/// <summary>
/// The model's equations written out with raw tensor ops in float64, from a state dict and a config. It shares no
/// code with the library: LayerNorm from mean/variance, RMSNorm from the mean square, GELU from erf/tanh, softmax
/// from exp, patch embedding as a reshape + matmul, sincos table from scalar loops.
/// </summary>
internal sealed class Reference
{
    private readonly Dictionary<string, Tensor> _sd;
    private readonly ViTConfig _c;

    public Reference(IDictionary<string, Tensor> stateDict, ViTConfig config)
    {
        _sd = stateDict.ToDictionary(kv => kv.Key, kv => kv.Value.detach().to(ScalarType.Float64));
        _c = config;
    }

    private Tensor W(string key) => _sd[key];
    private Tensor? Opt(string key) => _sd.TryGetValue(key, out var t) ? t : null;

    public Tensor Norm(string prefix, Tensor x)
    {
        var w = W(prefix + "weight");
        if (_c.Norm == NormKind.RmsNorm)
            return x / (x * x).mean(new long[] { -1 }, keepdim: true).Plus(_c.NormEps).sqrt() * w;
        var mu = x.mean(new long[] { -1 }, keepdim: true);
        var var = ((x - mu) * (x - mu)).mean(new long[] { -1 }, keepdim: true);
        var y = (x - mu) / var.Plus(_c.NormEps).sqrt() * w;
        var b = Opt(prefix + "bias");
        return b is null ? y : y.Plus(b);
    }

    public static Tensor Linear(Tensor x, Tensor w, Tensor? b) => b is null ? x.matmul(w.t()) : x.matmul(w.t()).Plus(b);

    private Tensor Linear(string prefix, Tensor x) => Linear(x, W(prefix + "weight"), Opt(prefix + "bias"));

    public Tensor Gelu(Tensor x) => _c.Act switch
    {
        Activation.Gelu => x.Times(0.5) * x.DividedBy(Math.Sqrt(2)).erf().Plus(1),
        Activation.GeluTanh => x.Times(0.5) * x.Plus(x.Times(0.044715) * x * x).Times(Math.Sqrt(2 / Math.PI)).tanh().Plus(1),
        _ => x / x.Times(-1.702).exp().Plus(1),                                        // QuickGELU: x·σ(1.702x)
    };

    // LayerScale: the branch times γ (per channel), when the state dict has one.
    private Tensor Scale(string key, Tensor branch) => Opt(key) is { } gamma ? branch * gamma : branch;

    public static Tensor Softmax(Tensor s)
    {
        var e = (s - s.amax(new long[] { -1 }, keepdim: true)).exp();
        return e / e.sum(new long[] { -1 }, keepdim: true);
    }

    /// <summary>q [B, Nq, D], k/v [B, Nk, D] → [B, Nq, D].</summary>
    public Tensor Mha(Tensor q, Tensor k, Tensor v, string? qNorm, string? kNorm)
    {
        long b = q.shape[0], nq = q.shape[1], nk = k.shape[1], dim = q.shape[2], h = _c.NumHeads, d = dim / h;
        var qh = q.reshape(b, nq, h, d);
        var kh = k.reshape(b, nk, h, d);
        if (qNorm is not null) qh = Norm(qNorm, qh);
        if (kNorm is not null) kh = Norm(kNorm, kh);
        qh = qh.permute(0, 2, 1, 3);
        kh = kh.permute(0, 2, 1, 3);
        var vh = v.reshape(b, nk, h, d).permute(0, 2, 1, 3);
        var a = Softmax(qh.matmul(kh.transpose(2, 3)).DividedBy(Math.Sqrt(d)));
        return a.matmul(vh).permute(0, 2, 1, 3).reshape(b, nq, dim);
    }

    public Tensor SequentialBlock(string p, Tensor x)
    {
        long dim = _c.EmbedDim;
        var qkv = Linear(p + "attn.qkv.", Norm(p + "norm1.", x));
        var q = qkv.narrow(-1, 0, dim);
        var k = qkv.narrow(-1, dim, dim);
        var v = qkv.narrow(-1, 2 * dim, dim);
        var z = Mha(q, k, v, _c.QkNorm ? p + "attn.q_norm." : null, _c.QkNorm ? p + "attn.k_norm." : null);
        var x1 = x.Plus(Scale(p + "ls1.gamma", Linear(p + "attn.proj.", z)));
        var hdn = Gelu(Linear(p + "mlp.fc1.", Norm(p + "norm2.", x1)));
        return x1.Plus(Scale(p + "ls2.gamma", Linear(p + "mlp.fc2.", hdn)));
    }

    public Tensor ParallelBlock(string p, Tensor x)
    {
        long dim = _c.EmbedDim, f = _c.MlpDim;
        var y = Linear(p + "in_proj.", Norm(p + "in_norm.", x));
        var u = y.narrow(-1, 0, f);
        var mb = Opt(p + "mlp_bias");
        if (mb is not null) u = u.Plus(mb);
        var q = y.narrow(-1, f, dim);
        var k = y.narrow(-1, f + dim, dim);
        var v = y.narrow(-1, f + 2 * dim, dim);
        var z = Mha(q, k, v, _c.QkNorm ? p + "q_norm." : null, _c.QkNorm ? p + "k_norm." : null);
        var g = Gelu(u);
        Tensor outp = _sd.ContainsKey(p + "out_proj.weight")
            ? Linear(torch.cat(new[] { z, g }, -1), W(p + "out_proj.weight"), Opt(p + "out_proj.bias"))
            : Linear(p + "attn_out_proj.", z).Plus(Linear(p + "mlp_out_proj.", g));
        return x.Plus(Scale(p + "ls.gamma", outp));
    }

    public Tensor MapHead(Tensor x)
    {
        long b = x.shape[0], dim = _c.EmbedDim;
        var probe = W("attn_pool.latent").expand(b, 1, dim);
        var q = Linear("attn_pool.q.", probe);
        var kv = Linear("attn_pool.kv.", x);
        var z = Linear("attn_pool.proj.", Mha(q, kv.narrow(-1, 0, dim), kv.narrow(-1, dim, dim), null, null));
        var m = Linear("attn_pool.mlp.fc2.", Gelu(Linear("attn_pool.mlp.fc1.", Norm("attn_pool.norm.", z))));
        return z.Plus(m).select(1, 0);
    }

    public Tensor PatchEmbed(Tensor images)
    {
        long b = images.shape[0], ch = images.shape[1], hh = images.shape[2], ww = images.shape[3], p = _c.PatchSize;
        long gh = hh / p, gw = ww / p;
        var patches = images.reshape(b, ch, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, ch * p * p);
        var w = W("patch_embed.proj.weight");
        return Linear(patches, w.reshape(w.shape[0], ch * p * p), Opt("patch_embed.proj.bias"));
    }

    public static Tensor SinCos(long gh, long gw, long dim)
    {
        long q = dim / 4;
        var table = new double[gh * gw * dim];
        for (long y = 0; y < gh; y++)
        for (long x = 0; x < gw; x++)
        for (long i = 0; i < q; i++)
        {
            double omega = 1.0 / Math.Pow(10000.0, i / (double)(q - 1));
            long row = (y * gw + x) * dim;
            table[row + i] = Math.Sin(x * omega);
            table[row + q + i] = Math.Cos(x * omega);
            table[row + 2 * q + i] = Math.Sin(y * omega);
            table[row + 3 * q + i] = Math.Cos(y * omega);
        }
        return torch.tensor(table, new[] { 1, gh * gw, dim }, ScalarType.Float64);
    }

    /// <summary>(pooled, normed tokens incl. prefix, logits or null).</summary>
    public (Tensor Pooled, Tensor Tokens, Tensor? Logits) Model(Tensor images)
    {
        long b = images.shape[0], p = _c.PatchSize, gh = images.shape[2] / p, gw = images.shape[3] / p;
        var x = PatchEmbed(images);
        // Prefix tokens: the class token, then the register tokens (timm's order).
        var parts = new List<Tensor>();
        if (_c.ClassToken) parts.Add(W("cls_token").expand(b, 1, _c.EmbedDim));
        if (_c.RegTokens > 0) parts.Add(W("reg_token").expand(b, _c.RegTokens, _c.EmbedDim));
        Tensor? cls = parts.Count == 0 ? null : torch.cat(parts.ToArray(), 1);
        if (_c.PosEmbed == PosEmbedKind.SinCos2d)
        {
            x = x.Plus(SinCos(gh, gw, _c.EmbedDim));
            if (cls is not null) x = torch.cat(new[] { cls, x }, 1);
        }
        else if (cls is not null && !_c.NoEmbedClass) x = torch.cat(new[] { cls, x }, 1).Plus(W("pos_embed"));
        else
        {
            x = x.Plus(W("pos_embed"));
            if (cls is not null) x = torch.cat(new[] { cls, x }, 1);
        }
        if (_c.PreNorm) x = Norm("norm_pre.", x);
        for (int i = 0; i < _c.Depth; i++)
            x = _c.Block == BlockKind.Parallel ? ParallelBlock($"blocks.{i}.", x) : SequentialBlock($"blocks.{i}.", x);
        bool fcNorm = _c.FcNorm ?? _c.GlobalPool == GlobalPool.Gap;   // timm: use_fc_norm = global_pool == 'avg' unless fc_norm is given
        if (!fcNorm) x = Norm("norm.", x);
        // timm's pool(): the MAP head and the average see the patch tokens only, unless pool_include_prefix (big_vision's
        // MAPHead never sees a class token: it adds none with map pooling).
        int prefix = (_c.ClassToken ? 1 : 0) + _c.RegTokens;
        var pooledTokens = _c.PoolIncludePrefix ? x : x.narrow(1, prefix, x.shape[1] - prefix);
        var pooled = _c.GlobalPool switch
        {
            GlobalPool.Map => MapHead(pooledTokens),
            GlobalPool.Gap => pooledTokens.mean(new long[] { 1 }),
            _ => x.select(1, 0),
        };
        if (fcNorm) pooled = Norm("fc_norm.", pooled);
        var logits = _c.NumClasses > 0 ? Linear("head.", pooled) : null;
        return (pooled, x, logits);
    }
}
