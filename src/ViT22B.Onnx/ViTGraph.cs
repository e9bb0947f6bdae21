using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Onnx.Proto;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Onnx;

/// <summary>
/// Writes a <see cref="VisionTransformer"/>'s forward pass as ONNX nodes, layer by layer as the layers compute it
/// (each method below names the layer it mirrors). Weights come from the model's state dict by their timm keys; a bias
/// or norm shift is present exactly when its key is. Everything runs in float32; 16-bit weights are cast once.
/// </summary>
internal sealed class ViTGraph
{
    private readonly OnnxGraph _g;
    private readonly ViTConfig _c;
    private readonly Dictionary<string, Tensor> _state;
    private readonly ScalarType _storage;
    private readonly bool _int8;

    private ViTGraph(OnnxGraph g, VisionTransformer model, ScalarType storage, bool int8)
    {
        (_g, _c, _storage, _int8) = (g, model.Config, storage, int8);
        _state = model.state_dict();
    }

    /// <summary>Emits the model into <paramref name="g"/>: input <c>images</c>, outputs <c>features</c>, <c>tokens</c> and
    /// (with a classifier) <c>logits</c>.</summary>
    public static void Emit(OnnxGraph g, VisionTransformer model, ScalarType storage, bool int8)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        new ViTGraph(g, model, storage, int8).Emit();
    }

    private void Emit()
    {
        var c = _c;
        object height = c.DynamicImgSize ? "height" : c.ImageShape.Height, width = c.DynamicImgSize ? "width" : c.ImageShape.Width;
        _g.Proto.Input.Add(OnnxGraph.Value("images", TensorProto.Types.DataType.Float, "batch", c.InChans, height, width));

        // PatchEmbed: a stride-p convolution (the remainder of a size not divisible by p is dropped), then [B, N, D].
        var convInputs = new List<string> { "images", W("patch_embed.proj.weight") };
        if (Has("patch_embed.proj.bias")) convInputs.Add(W("patch_embed.proj.bias"));
        var map = _g.Node("Conv", convInputs, "patch_embed", OnnxGraph.Ints("kernel_shape", c.PatchSize, c.PatchSize),
            OnnxGraph.Ints("strides", c.PatchSize, c.PatchSize));
        var x = _g.Transpose(_g.Reshape(map, 0, 0, -1), 0, 2, 1);
        x = AddPositions(x, map);
        if (Has("norm_pre.weight")) x = Norm(x, "norm_pre");
        for (int i = 0; i < c.Depth; i++)
            x = c.Block == BlockKind.Parallel ? ParallelBlock(x, $"blocks.{i}") : SequentialBlock(x, $"blocks.{i}");
        if (Has("norm.weight")) x = Norm(x, "norm");

        int prefix = c.NumPrefixTokens;
        var tokens = prefix == 0 ? _g.Node("Identity", new[] { x }, "tokens")
            : _g.Node("Slice", new[] { x, _g.Int64s(prefix), _g.Int64s(long.MaxValue), _g.Int64s(1) }, "tokens");
        var pooled = c.GlobalPool switch
        {
            GlobalPool.Map => MapHead(c.PoolIncludePrefix ? x : tokens, "attn_pool"),
            GlobalPool.Gap => _g.Node("ReduceMean", new[] { c.PoolIncludePrefix ? x : tokens, _g.Int64s(1) }, null, OnnxGraph.Int("keepdims", 0)),
            _ => _g.Node("Gather", new[] { x, _g.Int64Scalar(0) }, null, OnnxGraph.Int("axis", 1)),
        };
        if (Has("fc_norm.weight")) pooled = Norm(pooled, "fc_norm");
        var features = _g.Node("Identity", new[] { pooled }, "features");
        _g.Proto.Output.Add(OnnxGraph.Value(features, TensorProto.Types.DataType.Float, "batch", c.EmbedDim));
        _g.Proto.Output.Add(OnnxGraph.Value(tokens, TensorProto.Types.DataType.Float, "batch", c.DynamicImgSize ? "patches" : c.NumPatches, c.EmbedDim));
        if (!Has("head.weight")) return;
        var logits = _g.Node("Identity", new[] { Linear(pooled, "head") }, "logits");
        _g.Proto.Output.Add(OnnxGraph.Value(logits, TensorProto.Types.DataType.Float, "batch", c.NumClasses));
    }

    private bool Has(string key) => _state.ContainsKey(key);

    private Tensor Param(string key) => _state.TryGetValue(key, out var t) ? t
        : throw new KeyNotFoundException($"ONNX export: the model has no parameter '{key}'.");

    /// <summary>A parameter as a float32 graph value (stored in the export's weight type).</summary>
    private string W(string key) => _g.Weight(key, Param(key), _storage);

    // VisionTransformer.AddPositions: class and register tokens first, the position embedding added to every token
    // (timm) or to the patch tokens only (no_embed_class, sin-cos), resampled bicubically (antialiased) to the input's
    // grid when the model takes dynamic sizes.
    private string AddPositions(string x, string map)
    {
        var c = _c;
        string? prefix = null;
        if (c.NumPrefixTokens > 0)
        {
            var parts = new List<string>();
            if (Has("cls_token")) parts.Add(W("cls_token"));
            if (Has("reg_token")) parts.Add(W("reg_token"));
            var stacked = parts.Count == 1 ? parts[0] : _g.Concat(1, parts.ToArray());                  // [1, P, D]
            var batch = _g.Slice(_g.Shape(x), 0L, 1L, 0L);
            prefix = _g.Node("Expand", new[] { stacked, _g.Concat(0, batch, _g.Int64s(1, 1)) });       // [B, P, D]
        }
        if (c.PosEmbed == PosEmbedKind.SinCos2d)
        {
            string table = c.DynamicImgSize ? SinCosTable(map) : _g.Initializer("pos_embed_sincos", SinCosPosEmbed.Table(c.GridHeight, c.GridWidth, c.EmbedDim, ScalarType.Float32, torch.CPU), ScalarType.Float32);
            x = _g.Add(x, table);
            return prefix is null ? x : _g.Concat(1, prefix, x);
        }
        bool slots = prefix is not null && !c.NoEmbedClass;
        var pos = W("pos_embed");
        if (c.DynamicImgSize)
        {
            int p = slots ? c.NumPrefixTokens : 0;
            var grid = p == 0 ? pos : _g.Slice(pos, p, long.MaxValue, 1L);
            grid = _g.Transpose(_g.Reshape(grid, 1, c.GridHeight, c.GridWidth, c.EmbedDim), 0, 3, 1, 2);       // [1, D, gh0, gw0]
            var size = _g.Concat(0, _g.Int64s(1, c.EmbedDim), _g.Slice(_g.Shape(map), 2L, 4L, 0L));
            // As torch.nn.functional.interpolate(bicubic, align_corners=False, antialias=True): the antialiased kernel
            // has a = -0.5 (-0.75 is plain bicubic), half-pixel centers (half_pixel, not pytorch_half_pixel, which puts
            // an output of length 1 at input 0 where torch centres it), and taps outside the grid dropped with the
            // weights renormalized (exclude_outside; without it ONNX Runtime differs by 4e-3 when upsampling).
            var resized = _g.Node("Resize", new[] { grid, "", "", size }, null, OnnxGraph.Text("mode", "cubic"),
                OnnxGraph.Float("cubic_coeff_a", -0.5f), OnnxGraph.Int("antialias", 1), OnnxGraph.Int("exclude_outside", 1),
                OnnxGraph.Text("coordinate_transformation_mode", "half_pixel"));
            var flat = _g.Reshape(_g.Transpose(resized, 0, 2, 3, 1), 1, -1, c.EmbedDim);
            pos = p == 0 ? flat : _g.Concat(1, _g.Slice(pos, 0L, p, 1L), flat);
        }
        if (slots) return _g.Add(_g.Concat(1, prefix!, x), pos);
        x = _g.Add(x, pos);
        return prefix is null ? x : _g.Concat(1, prefix, x);
    }

    // SinCosPosEmbed.Table for the input's grid, in float64 as the layer computes it: [sin x·ω, cos x·ω, sin y·ω, cos y·ω]
    // with ω_i = 10000^(−i / (D/4 − 1)).
    private string SinCosTable(string map)
    {
        long quarter = _c.EmbedDim / 4;
        var omega = _g.Initializer("pos_embed_omega", torch.exp(ScalarMath.Arange(quarter, ScalarType.Float64, null).DividedBy(Math.Max(1, quarter - 1)).Times(-Math.Log(10_000.0))), ScalarType.Float64);
        var shape = _g.Shape(map);
        var gh = _g.Slice(shape, 2L, 3L, 0L);
        var gw = _g.Slice(shape, 3L, 4L, 0L);
        var grid = _g.Concat(0, gh, gw);
        string Coordinates(string n, long axis)
        {
            var range = _g.Node("Range", new[] { _g.Int64Scalar(0), _g.Node("Squeeze", new[] { n, _g.Int64s(0) }), _g.Int64Scalar(1) });
            var shaped = _g.Node("Unsqueeze", new[] { range, _g.Int64s(axis) });                           // [gh, 1] or [1, gw]
            var full = _g.Reshape(_g.Node("Expand", new[] { shaped, grid }), -1, 1);                          // [gh·gw, 1]
            return _g.Mul(_g.Cast(full, TensorProto.Types.DataType.Double), omega);
        }
        var oy = Coordinates(gh, 1);
        var ox = Coordinates(gw, 0);
        var table = _g.Concat(1, _g.Node("Sin", new[] { ox }), _g.Node("Cos", new[] { ox }), _g.Node("Sin", new[] { oy }), _g.Node("Cos", new[] { oy }));
        return _g.Node("Unsqueeze", new[] { _g.Cast(table, TensorProto.Types.DataType.Float), _g.Int64s(0) });
    }

    // Norm: LayerNorm over the last axis (shift when the key has one), or RMSNorm x / sqrt(mean(x²) + eps) · weight.
    private string Norm(string x, string prefix)
    {
        var weight = W(prefix + ".weight");
        if (_c.Norm == NormKind.LayerNorm)
        {
            var inputs = new List<string> { x, weight };
            if (Has(prefix + ".bias")) inputs.Add(W(prefix + ".bias"));
            return _g.Node("LayerNormalization", inputs, null, OnnxGraph.Int("axis", -1), OnnxGraph.Float("epsilon", (float)_c.NormEps));
        }
        var meanSquare = _g.Node("ReduceMean", new[] { _g.Mul(x, x), _g.Int64s(-1) }, null, OnnxGraph.Int("keepdims", 1));
        var rms = _g.Node("Sqrt", new[] { _g.Add(meanSquare, _g.Scalar(_c.NormEps)) });
        return _g.Mul(_g.Node("Div", new[] { x, rms }), weight);
    }

    // nn.Linear: x·Wᵀ (+ b). The transposed weight is stored, so MatMul needs no Transpose node; with int8 the weight
    // is quantized symmetrically per output channel and the input per call (DynamicQuantizeLinear + MatMulInteger).
    private string Linear(string x, string prefix)
    {
        var weight = Param(prefix + ".weight");
        string y;
        if (_int8) y = QuantizedMatMul(x, prefix, weight);
        else y = _g.MatMul(x, _g.Weight(prefix + ".weight", weight.t(), _storage));
        return Has(prefix + ".bias") ? _g.Add(y, W(prefix + ".bias")) : y;
    }

    private string QuantizedMatMul(string x, string prefix, Tensor weight)
    {
        using var scope = torch.NewDisposeScope();      // this weight's float32 temporaries go before the next one's come
        Tensor q, scale;                                                                          // [in, out], per output column
        if (_g.IsSizeOnly)
        {
            // The dry run that sizes the export needs only the shapes: nothing is quantized for it.
            q = weight.t();
            scale = torch.empty(q.shape[1], dtype: ScalarType.Float32, device: torch.CPU);
        }
        else
        {
            var wt = weight.t().to(ScalarType.Float32);
            scale = wt.abs().amax(new long[] { 0 }).AtLeast(1e-12).DividedBy(127.0);
            q = torch.round(wt / scale).Clamped(-127, 127);
        }
        var wq = _g.Initializer(prefix + ".weight_int8", q, ScalarType.Int8);
        var wzp = _g.Initializer(prefix + ".weight_zero_point", torch.zeros(q.shape[1], dtype: ScalarType.Int8), ScalarType.Int8);
        var ws = _g.Initializer(prefix + ".weight_scale", scale, ScalarType.Float32);
        var dq = _g.NodeN("DynamicQuantizeLinear", new[] { x }, 3);                             // uint8, scale, zero point
        var acc = _g.Node("MatMulInteger", new[] { dq[0], wq, dq[2], wzp });
        return _g.Mul(_g.Cast(acc, TensorProto.Types.DataType.Float), _g.Mul(dq[1], ws));
    }

    // AttentionOps.Attend: heads split, optional per-head QK-norm, softmax(q·kᵀ/√d)·v, heads joined. A query of batch 1
    // (the MAP head's probe) broadcasts over the keys' batch.
    private string Attend(string q, string k, string v, string? qNorm, string? kNorm)
    {
        long heads = _c.NumHeads, d = _c.HeadDim;
        string Heads(string t) => _g.Reshape(t, 0, 0, heads, d);
        var qh = Heads(q);
        var kh = Heads(k);
        if (qNorm is not null) qh = Norm(qh, qNorm);
        if (kNorm is not null) kh = Norm(kh, kNorm);
        var qt = _g.Mul(_g.Transpose(qh, 0, 2, 1, 3), _g.Scalar(1.0 / Math.Sqrt(d)));              // [B, H, Nq, d]
        var kt = _g.Transpose(kh, 0, 2, 3, 1);                                                      // [B, H, d, Nk]
        var vt = _g.Transpose(Heads(v), 0, 2, 1, 3);                                                // [B, H, Nk, d]
        var p = _g.Node("Softmax", new[] { _g.MatMul(qt, kt) }, null, OnnxGraph.Int("axis", -1));
        return _g.Reshape(_g.Transpose(_g.MatMul(p, vt), 0, 2, 1, 3), 0, 0, _c.EmbedDim);
    }

    // Mlp's activations: GELU (erf), GELU (tanh approximation), QuickGELU x·σ(1.702x).
    private string Activation(string x)
    {
        switch (_c.Act)
        {
            case Layers.Activation.Gelu:
                var erf = _g.Node("Erf", new[] { _g.Mul(x, _g.Scalar(1 / Math.Sqrt(2))) });
                return _g.Mul(_g.Mul(x, _g.Scalar(0.5)), _g.Add(erf, _g.Scalar(1)));
            case Layers.Activation.GeluTanh:
                var cube = _g.Mul(_g.Mul(x, x), x);
                var inner = _g.Mul(_g.Add(x, _g.Mul(cube, _g.Scalar(0.044715))), _g.Scalar(Math.Sqrt(2 / Math.PI)));
                return _g.Mul(_g.Mul(x, _g.Scalar(0.5)), _g.Add(_g.Node("Tanh", new[] { inner }), _g.Scalar(1)));
            case Layers.Activation.QuickGelu:
                return _g.Mul(x, _g.Node("Sigmoid", new[] { _g.Mul(x, _g.Scalar(1.702)) }));
            default:
                throw new NotSupportedException($"ONNX export: activation {_c.Act} has no ONNX form.");
        }
    }

    private string Scale(string x, string key) => Has(key) ? _g.Mul(x, W(key)) : x;

    private string? QkNorm(string attention, string which) => Has($"{attention}.{which}.weight") ? $"{attention}.{which}" : null;

    // ParallelBlock: y = Norm(x); [U|Q|K|V] = y·W_inᵀ; x + LayerScale([Attn(Q, K, V) | act(U)]·W_outᵀ) (or the two
    // unfused out-projections summed).
    private string ParallelBlock(string x, string p)
    {
        var l = _c.BlockOptions.Layout;
        var y = Norm(x, p + ".in_norm");
        var parts = _g.Split(Linear(y, p + ".in_proj"), -1, l.InSplit);
        var u = Has(p + ".mlp_bias") ? _g.Add(parts[0], W(p + ".mlp_bias")) : parts[0];
        var z = Attend(parts[1], parts[2], parts[3], QkNorm(p, "q_norm"), QkNorm(p, "k_norm"));
        var g = Activation(u);
        var outp = Has(p + ".out_proj.weight") ? Linear(_g.Concat(-1, z, g), p + ".out_proj")
            : _g.Add(Linear(z, p + ".attn_out_proj"), Linear(g, p + ".mlp_out_proj"));
        return _g.Add(x, Scale(outp, p + ".ls.gamma"));
    }

    // SequentialBlock: x + ls1(Attn(norm1(x))), then + ls2(Mlp(norm2(·))).
    private string SequentialBlock(string x, string p)
    {
        var qkv = _g.Split(Linear(Norm(x, p + ".norm1"), p + ".attn.qkv"), -1, _c.BlockOptions.Layout.QkvSplitOf(1));
        var a = Linear(Attend(qkv[0], qkv[1], qkv[2], QkNorm(p + ".attn", "q_norm"), QkNorm(p + ".attn", "k_norm")), p + ".attn.proj");
        var x1 = _g.Add(x, Scale(a, p + ".ls1.gamma"));
        var m = Mlp(Norm(x1, p + ".norm2"), p + ".mlp");
        return _g.Add(x1, Scale(m, p + ".ls2.gamma"));
    }

    private string Mlp(string x, string p) => Linear(Activation(Linear(x, p + ".fc1")), p + ".fc2");

    // MapHead: a learned probe attends over all tokens; pooled = proj(attn) + Mlp(Norm(·)); [B, D].
    private string MapHead(string x, string p)
    {
        var query = Linear(W(p + ".latent"), p + ".q");                                            // [1, 1, D]
        var kv = _g.Split(Linear(x, p + ".kv"), -1, _c.EmbedDim, _c.EmbedDim);
        var pooled = Linear(Attend(query, kv[0], kv[1], null, null), p + ".proj");                  // [B, 1, D]
        pooled = _g.Add(pooled, Mlp(Norm(pooled, p + ".norm"), p + ".mlp"));
        return _g.Node("Squeeze", new[] { pooled, _g.Int64s(1) });
    }
}
