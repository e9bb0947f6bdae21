using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>Block-streamed inference gives the outputs of the same weights held in memory; at most two blocks are
/// alive; seeded weights are reproducible per key and follow big_vision's rules.</summary>
public sealed class StreamedVisionTransformerTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-streamed-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static ViTConfig Config(BlockKind block) => TestUtil.Tiny(block) with
    {
        Depth = 4, ClassToken = true, GlobalPool = GlobalPool.Map, InitValues = 0.1, NormBias = true,
    };

    /// <summary>An in-memory model holding exactly the source's tensors.</summary>
    private static VisionTransformer InMemory(ViTConfig c, ITensorSource weights, ScalarType dtype)
    {
        var model = new VisionTransformer(c, torch.CPU, dtype);
        StreamedVisionTransformer.Load(model, weights, "");
        return model;
    }

    [Theory]
    [InlineData(BlockKind.Parallel, true, ScalarType.Float64)]
    [InlineData(BlockKind.Parallel, false, ScalarType.Float32)]
    [InlineData(BlockKind.Sequential, true, ScalarType.BFloat16)]
    public void Streaming_seeded_weights_gives_the_in_memory_outputs(BlockKind block, bool prefetch, ScalarType dtype)
    {
        var c = Config(block);
        using var weights = new SeededWeights(c, seed: 5);
        using var reference = InMemory(c, weights, dtype);
        using var streamed = new StreamedVisionTransformer(c, weights, torch.CPU, dtype, prefetch);
        using var images = TestUtil.RandomImages(c, 3, seed: 6, dtype);
        using var inference = torch.inference_mode();
        using var expected = reference.Encode(images);
        using var actual = streamed.Encode(images);
        Assert.True(TensorAssert.Same(expected.Pooled, actual.Pooled));
        Assert.True(TensorAssert.Same(expected.PatchTokens, actual.PatchTokens));
        Assert.True(TensorAssert.Same(expected.Logits!, actual.Logits!));
        Assert.Equal(c.Depth, streamed.LastPass!.Blocks);
        long blockBytes = new VisionTransformer(c with { Depth = 1 }, torch.META, dtype).named_parameters()
            .Where(p => p.name.StartsWith("blocks.0.", StringComparison.Ordinal)).Sum(p => p.parameter.numel() * p.parameter.element_size());
        Assert.Equal(blockBytes, streamed.LastPass.LargestBlockBytes);
        Assert.DoesNotContain(streamed.Resident.state_dict().Keys, k => k.StartsWith("blocks.", StringComparison.Ordinal));
    }

    [Fact]
    public void Streaming_a_safetensors_file_gives_the_in_memory_outputs()
    {
        var c = Config(BlockKind.Parallel);
        string path = Path.Combine(_dir, "model.safetensors");
        using var reference = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(reference, seed: 7, scale: 0.3);
        SafetensorsCheckpoint.Save(reference, path);
        using var file = TensorSources.Open(path);
        using var streamed = new StreamedVisionTransformer(c, file, torch.CPU, ScalarType.Float32);
        using var images = TestUtil.RandomImages(c, 2, seed: 8, ScalarType.Float32);
        using var inference = torch.inference_mode();
        using var expected = reference.call(images);
        using var actual = streamed.Forward(images);
        Assert.True(TensorAssert.Same(expected, actual));
    }

    [Fact]
    public void A_checkpoint_without_a_block_or_with_a_wrong_shape_is_refused_before_anything_runs()
    {
        var c = Config(BlockKind.Sequential);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        var state = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        string missing = Path.Combine(_dir, "missing.safetensors");
        Safetensors.Save(state.Where(kv => kv.Key != "blocks.3.mlp.fc2.weight").ToDictionary(kv => kv.Key, kv => kv.Value), missing);
        using (var file = TensorSources.Open(missing))
        {
            var e = Assert.Throws<KeyNotFoundException>(() => new StreamedVisionTransformer(c, file));
            Assert.Contains("blocks.3.mlp.fc2.weight", e.Message);
            Assert.Contains("missing.safetensors", e.Message);
        }
        string wrong = Path.Combine(_dir, "wrong.safetensors");
        using var narrow = torch.zeros(c.MlpDim, 3);
        Safetensors.Save(new Dictionary<string, Tensor>(state) { ["blocks.2.mlp.fc1.weight"] = narrow }, wrong);
        using (var file = TensorSources.Open(wrong))
        {
            var e = Assert.Throws<ArgumentException>(() => new StreamedVisionTransformer(c, file));
            Assert.Contains($"'blocks.2.mlp.fc1.weight' is [{c.MlpDim}, 3] but the model needs [{c.MlpDim}, {c.EmbedDim}]", e.Message);
        }
    }

    /// <summary>A block that counts how many of its kind are alive.</summary>
    private sealed class CountedBlock : nn.Module<Tensor, Tensor>
    {
        public static int Alive, MaxAlive;
        private readonly TorchSharp.Modules.Parameter weight;

        public CountedBlock(double value) : base(nameof(CountedBlock))
        {
            weight = new TorchSharp.Modules.Parameter(ScalarMath.Full(new long[] { 1 }, value, ScalarType.Float64, torch.CPU));
            RegisterComponents();
            int alive = Interlocked.Increment(ref Alive);
            lock (typeof(CountedBlock)) MaxAlive = Math.Max(MaxAlive, alive);
        }

        public override Tensor forward(Tensor x) => x * weight;

        protected override void Dispose(bool disposing)
        {
            if (disposing) Interlocked.Decrement(ref Alive);
            base.Dispose(disposing);
        }
    }

    [Theory]
    [InlineData(true, 2)]
    [InlineData(false, 1)]
    public void At_most_two_blocks_are_alive_and_a_failed_load_releases_every_block(bool prefetch, int bound)
    {
        using var inference = torch.inference_mode();
        (CountedBlock.Alive, CountedBlock.MaxAlive) = (0, 0);
        using var x = torch.ones(3, dtype: ScalarType.Float64);
        // On the CPU every block, prefetched or not, is built where it runs.
        var (y, stats) = BlockStreaming.Run(6, (i, device) => device.type == DeviceType.CPU ? new CountedBlock(i + 1) : throw new InvalidOperationException($"block {i} built on {device}"),
            (b, h) => b.call(h), x, prefetch);
        using (y)
        using (var first = y[0])
            Assert.Equal(720.0, first.item<double>());              // 6!
        Assert.Equal(0, CountedBlock.Alive);
        Assert.Equal(bound, CountedBlock.MaxAlive);
        Assert.Equal(6, stats.Blocks);
        Assert.Equal(8, stats.LargestBlockBytes);

        var e = Assert.Throws<IOException>(() => BlockStreaming.Run(6, (i, _) => i == 4 ? throw new IOException("block 4 unreadable") : new CountedBlock(1),
            (b, h) => b.call(h), x, prefetch));
        Assert.Equal("block 4 unreadable", e.Message);
        Assert.Equal(0, CountedBlock.Alive);
        using var grad = torch.enable_grad();
        Assert.Contains("inference only", Assert.Throws<InvalidOperationException>(() => BlockStreaming.Run(1, (_, _) => new CountedBlock(1), (b, h) => b.call(h), x, prefetch)).Message);
    }

    [Fact]
    public void Seeded_weights_are_the_same_for_a_key_on_every_read_and_follow_big_vision_rules()
    {
        var c = ViTConfig.Parse("B/16") with { Depth = 2, InitValues = 0.25, Block = BlockKind.Parallel, NormBias = true };
        using var a = new SeededWeights(c, seed: 1);
        using var b = new SeededWeights(c, seed: 1);
        using var other = new SeededWeights(c, seed: 2);
        using var w1 = a.Read("blocks.1.in_proj.weight");
        using var w2 = b.Read("blocks.1.in_proj.weight");
        using var w3 = other.Read("blocks.1.in_proj.weight");
        using var w0 = a.Read("blocks.0.in_proj.weight");
        Assert.True(TensorAssert.Same(w1, w2));
        Assert.False(TensorAssert.Same(w1, w3));
        Assert.False(TensorAssert.Same(w1, w0));
        Assert.Equal(ScalarType.Float32, w1.dtype);
        Assert.Equal(a.Names, VisionTransformer.StateShapes(c).Keys);

        // xavier-uniform per sub-block: the MLP rows [F, D] with bound √(6 / (F + D)), q rows [D, D] with √(6 / 2D).
        long d = c.EmbedDim, f = c.MlpDim;
        double mlpBound = Math.Sqrt(6.0 / (f + d)), qBound = Math.Sqrt(6.0 / (2 * d));
        using var scope = torch.NewDisposeScope();
        using var mlp = w1.narrow(0, 0, f);
        using var q = w1.narrow(0, f, d);
        Assert.InRange(mlp.abs().max().item<float>(), 0.99 * mlpBound, mlpBound);
        Assert.InRange(q.abs().max().item<float>(), 0.99 * qBound, qBound);
        Assert.InRange(q.std().item<float>(), 0.98 * qBound / Math.Sqrt(3), 1.02 * qBound / Math.Sqrt(3));

        // lecun-normal patch embedding, truncated at ±2σ with σ corrected so that the std is √(1 / fan_in).
        using var pe = a.Read("patch_embed.proj.weight");
        double fanIn = 3 * 16 * 16, std = Math.Sqrt(1 / fanIn);
        Assert.InRange(pe.std().item<float>(), 0.97 * std, 1.03 * std);
        Assert.InRange(pe.abs().max().item<float>(), 0.95 * 2 * std / .87962566103423978, 2 * std / .87962566103423978 * (1 + 1e-6));
        Assert.InRange(pe.mean().item<float>(), -0.01 * std, 0.01 * std);

        // The MAP probe as timm's AttentionPoolLatent draws it (trunc_normal_tf_, std 1/√D): truncated at ±2σ, so its
        // spread is 0.88σ; untruncated, some of the 768 values would lie beyond 2σ.
        var withMap = c with { GlobalPool = GlobalPool.Map, ClassToken = false };
        using var mapWeights = new SeededWeights(withMap, seed: 1);
        using var latent = mapWeights.Read("attn_pool.latent");
        double sigma = 1 / Math.Sqrt(c.EmbedDim);
        Assert.InRange(latent.abs().max().item<float>(), 1.5 * sigma, 2 * sigma * (1 + 1e-6));
        Assert.InRange(latent.std().item<float>(), 0.8 * sigma, 0.96 * sigma);

        using var gamma = a.Read("blocks.0.ls.gamma");
        Assert.True(TensorAssert.AllEqual(gamma, 0.25f));
        using var norm = a.Read("blocks.0.in_norm.weight");
        Assert.True(TensorAssert.AllEqual(norm, 1f));
        using var normBias = a.Read("blocks.0.in_norm.bias");
        Assert.True(TensorAssert.AllEqual(normBias, 0f));
        using var head = a.Read("head.weight");
        Assert.True(TensorAssert.AllEqual(head, 0f));
        Assert.Contains("blocks.9.in_proj.weight", Assert.Throws<KeyNotFoundException>(() => a.Read("blocks.9.in_proj.weight")).Message);
    }
}
