using BenchmarkDotNet.Attributes;
using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>
/// The library's 12-block ViT-B/16 stack (no stem or head, batch 8 × 197 tokens, inference) against the same stack
/// written as plain TorchSharp functional ops on raw weight tensors — the "plain code" the library must beat.
/// </summary>
[Config(typeof(MfuConfig))]
public class PlainBaselineBenchmarks : MfuBenchmark
{
    private Encoder _encoder = null!;
    private List<Dictionary<string, Tensor>> _weights = null!;
    private Tensor _x = null!;
    private ViTConfig _c = null!;

    /// <summary>dtype.</summary>
    [Params(ScalarType.Float32, ScalarType.BFloat16)] public ScalarType DType { get; set; }
    /// <summary>Block kind.</summary>
    [Params(BlockKind.Parallel, BlockKind.Sequential)] public BlockKind Block { get; set; }
    /// <summary>library or plain.</summary>
    [Params("library", "plain")] public string Impl { get; set; } = "";

    /// <summary>Builds the stack and a copy of its weights for the plain version.</summary>
    [GlobalSetup]
    public void Setup()
    {
        torch.manual_seed(0);
        _c = ViTConfig.Parse("B/16") with { Block = Block, QkNorm = false, Norm = NormKind.LayerNorm, NormBias = true, QkvBias = Block == BlockKind.Sequential };
        _encoder = new Encoder(_c.Block, _c.Depth, _c.BlockOptions, Bench.Device, DType);
        _weights = _encoder.Select(b => b.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach())).ToList();
        _x = Bench.Built(() => torch.randn(new long[] { 8, _c.NumTokens, _c.EmbedDim }, generator: new torch.Generator(1)).to(DType).to(Bench.Device));
        FlopsPerInvocation = 8 * _c.Depth * (2.0 * _c.NumTokens * (4.0 * _c.EmbedDim * _c.EmbedDim + 2.0 * _c.EmbedDim * _c.MlpDim) + 4.0 * _c.NumTokens * _c.NumTokens * _c.EmbedDim);
        StartPeakSampling(DType, Bench.Device);
    }

    private Tensor Attention(Tensor q, Tensor k, Tensor v)
    {
        long b = q.shape[0], n = q.shape[1], h = _c.NumHeads, d = _c.HeadDim;
        var o = nn.functional.scaled_dot_product_attention(q.view(b, n, h, d).transpose(1, 2), k.view(b, n, h, d).transpose(1, 2), v.view(b, n, h, d).transpose(1, 2));
        return o.transpose(1, 2).reshape(b, n, h * d);
    }

    private Tensor PlainSequential(Tensor x, Dictionary<string, Tensor> w)
    {
        long dim = _c.EmbedDim;
        var y = nn.functional.layer_norm(x, new[] { dim }, w["norm1.weight"], w["norm1.bias"], 1e-6);
        var qkv = nn.functional.linear(y, w["attn.qkv.weight"], w["attn.qkv.bias"]).chunk(3, -1);
        x = x.Plus(nn.functional.linear(Attention(qkv[0], qkv[1], qkv[2]), w["attn.proj.weight"], w["attn.proj.bias"]));
        y = nn.functional.layer_norm(x, new[] { dim }, w["norm2.weight"], w["norm2.bias"], 1e-6);
        var hdn = nn.functional.gelu(nn.functional.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"]));
        return x.Plus(nn.functional.linear(hdn, w["mlp.fc2.weight"], w["mlp.fc2.bias"]));
    }

    private Tensor PlainParallel(Tensor x, Dictionary<string, Tensor> w)
    {
        long dim = _c.EmbedDim, f = _c.MlpDim;
        var y = nn.functional.layer_norm(x, new[] { dim }, w["in_norm.weight"], w["in_norm.bias"], 1e-6);
        var p = nn.functional.linear(y, w["in_proj.weight"]).split(new[] { f, dim, dim, dim }, -1);
        var z = Attention(p[1], p[2], p[3]);
        var g = nn.functional.gelu(p[0].Plus(w["mlp_bias"]));
        return x.Plus(nn.functional.linear(torch.cat(new[] { z, g }, -1), w["out_proj.weight"], w["out_proj.bias"]));
    }

    /// <summary>One forward of the 12-block stack.</summary>
    [Benchmark]
    public void Run()
    {
        using var mode = torch.inference_mode();
        using var scope = torch.NewDisposeScope();
        if (Impl == "library")
        {
            _encoder.forward(_x);
        }
        else
        {
            var h = _x;
            foreach (var w in _weights) h = Block == BlockKind.Parallel ? PlainParallel(h, w) : PlainSequential(h, w);
        }
        Bench.Sync();
    }

    /// <summary>Samples the peak after each iteration.</summary>
    [IterationCleanup] public void Peak() => SamplePeak();

    /// <summary>Writes the samples and releases everything.</summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        WriteSamples();
        _encoder.Dispose();
        _x.Dispose();
    }
}
