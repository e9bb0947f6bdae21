using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>Every module against the float64 reference of <see cref="Reference"/>.</summary>
public class ModelNumericsTests
{
    public static TheoryData<string> VariantNames() => new(TestUtil.Variants().Select(v => v.Name));

    private static ViTConfig Variant(string name) => TestUtil.Variants().Single(v => v.Name == name).Config;

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void Full_model_matches_float64_reference(string variant)
    {
        var c = Variant(variant);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 1);
        using var scope = torch.NewDisposeScope();
        var images = TestUtil.RandomImages(c, 3, seed: 2);
        var expected = new Reference(model.state_dict(), c).Model(images);

        using var noGrad = torch.no_grad();
        using var output = model.Encode(images);
        Assert.True(TestUtil.MaxAbs(output.Pooled, expected.Pooled) < 1e-10, $"pooled Δ = {TestUtil.MaxAbs(output.Pooled, expected.Pooled):E2}");
        var patches = expected.Tokens.narrow(1, c.NumPrefixTokens, c.NumPatches);
        Assert.True(TestUtil.MaxAbs(output.PatchTokens, patches) < 1e-10, $"tokens Δ = {TestUtil.MaxAbs(output.PatchTokens, patches):E2}");
        Assert.Equal(expected.Logits is null, output.Logits is null);
        if (expected.Logits is not null)
            Assert.True(TestUtil.MaxAbs(output.Logits!, expected.Logits) < 1e-10);
        var forward = model.call(images);
        Assert.True(TestUtil.MaxAbs(forward, expected.Logits ?? expected.Pooled) < 1e-10);
    }

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void Full_model_float32_matches_float64_reference_to_1e5_relative(string variant)
    {
        var c = Variant(variant);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(model, seed: 3);
        using var scope = torch.NewDisposeScope();
        var images = TestUtil.RandomImages(c, 2, seed: 4);
        var expected = new Reference(model.state_dict(), c).Model(images);
        using var noGrad = torch.no_grad();
        using var output = model.Encode(images.to(ScalarType.Float32));
        double err = TestUtil.RelErr(output.Pooled, expected.Pooled);
        Assert.True(err < 1e-5, $"relative error {err:E2}");
        double tokErr = TestUtil.RelErr(output.PatchTokens, expected.Tokens.narrow(1, c.NumPrefixTokens, c.NumPatches));
        Assert.True(tokErr < 1e-5, $"token relative error {tokErr:E2}");
    }

    [Theory]
    [InlineData(BlockKind.Parallel)]
    [InlineData(BlockKind.Sequential)]
    public void Blocks_match_reference_individually(BlockKind kind)
    {
        var c = TestUtil.Tiny(kind) with { QkNorm = true, NormBias = true, QkvBias = kind == BlockKind.Sequential };
        using var block = kind == BlockKind.Parallel
            ? (nn.Module<Tensor, Tensor>)new ParallelBlock(c.BlockOptions, torch.CPU, ScalarType.Float64)
            : new SequentialBlock(c.BlockOptions, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(block, seed: 5);
        using var scope = torch.NewDisposeScope();
        var x = torch.randn(new long[] { 2, 7, c.EmbedDim }, dtype: ScalarType.Float64, generator: new torch.Generator(6));
        var sd = block.state_dict().ToDictionary(kv => "blocks.0." + kv.Key, kv => kv.Value);
        var r = new Reference(sd, c);
        var expected = kind == BlockKind.Parallel ? r.ParallelBlock("blocks.0.", x) : r.SequentialBlock("blocks.0.", x);
        using var noGrad = torch.no_grad();
        Assert.True(TestUtil.MaxAbs(block.call(x), expected) < 1e-10);
    }

    [Theory]
    [InlineData(NormKind.LayerNorm, true)]
    [InlineData(NormKind.LayerNorm, false)]
    [InlineData(NormKind.RmsNorm, false)]
    public void Norm_matches_reference(NormKind kind, bool bias)
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { Norm = kind, NormBias = bias };
        using var norm = new Norm(16, kind, bias, c.NormEps, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(norm, seed: 7);
        using var scope = torch.NewDisposeScope();
        var x = torch.randn(new long[] { 3, 5, 16 }, dtype: ScalarType.Float64, generator: new torch.Generator(8)).Times(3).Plus(1);
        var sd = norm.state_dict().ToDictionary(kv => "n." + kv.Key, kv => kv.Value);
        var expected = new Reference(sd, c).Norm("n.", x);
        Assert.True(TestUtil.MaxAbs(norm.call(x), expected) < 1e-10);
        Assert.Equal(bias ? 2 : 1, norm.parameters().Count());
    }

    [Fact]
    public void Patch_embedding_matches_reshape_matmul_reference()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { InChans = 2 };
        using var pe = new PatchEmbed(c.InChans, c.EmbedDim, c.PatchSize, bias: true, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(pe, seed: 9);
        using var scope = torch.NewDisposeScope();
        var images = TestUtil.RandomImages(c, 2, seed: 10);
        var sd = pe.state_dict().ToDictionary(kv => "patch_embed." + kv.Key, kv => kv.Value);
        Assert.True(TestUtil.MaxAbs(pe.call(images), new Reference(sd, c).PatchEmbed(images)) < 1e-10);
    }

    [Fact]
    public void SinCos_table_matches_scalar_formula()
    {
        using var scope = torch.NewDisposeScope();
        var actual = SinCosPosEmbed.Table(3, 5, 16, ScalarType.Float64, torch.CPU);
        Assert.True(TestUtil.MaxAbs(actual, Reference.SinCos(3, 5, 16)) < 1e-12);
    }

    [Fact]
    public void Mlp_and_attention_match_reference()
    {
        var c = TestUtil.Tiny(BlockKind.Sequential) with { QkNorm = true, QkvBias = true, Act = Activation.Gelu };
        using var block = new SequentialBlock(c.BlockOptions, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(block, seed: 11);
        using var scope = torch.NewDisposeScope();
        var sd = block.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        var r = new Reference(sd, c);
        var x = torch.randn(new long[] { 2, 6, 16 }, dtype: ScalarType.Float64, generator: new torch.Generator(12));
        var mlp = block.named_modules().Single(m => m.name == "mlp").module as nn.Module<Tensor, Tensor>;
        var attn = block.named_modules().Single(m => m.name == "attn").module as nn.Module<Tensor, Tensor>;
        var expMlp = Reference.Linear(r.Gelu(Reference.Linear(x, sd["mlp.fc1.weight"], sd["mlp.fc1.bias"])), sd["mlp.fc2.weight"], sd["mlp.fc2.bias"]);
        Assert.True(TestUtil.MaxAbs(mlp!.call(x), expMlp) < 1e-10);
        var qkv = Reference.Linear(x, sd["attn.qkv.weight"], sd["attn.qkv.bias"]);
        var z = r.Mha(qkv.narrow(-1, 0, 16), qkv.narrow(-1, 16, 16), qkv.narrow(-1, 32, 16), "attn.q_norm.", "attn.k_norm.");
        var expAttn = Reference.Linear(z, sd["attn.proj.weight"], sd["attn.proj.bias"]);
        Assert.True(TestUtil.MaxAbs(attn!.call(x), expAttn) < 1e-10);
    }

    [Fact]
    public void Fused_parallel_block_equals_unfused_after_rearranging_weights()
    {
        var unfusedCfg = TestUtil.Tiny(BlockKind.Parallel) with { FuseOutProj = false, ProjBias = true, MlpBias = true };
        using var unfused = new VisionTransformer(unfusedCfg, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(unfused, seed: 13);
        using var fused = new VisionTransformer(unfusedCfg with { FuseOutProj = true }, torch.CPU, ScalarType.Float64);
        using var scope = torch.NewDisposeScope();
        var converted = ParallelBlock.FuseOutProjection(unfused.state_dict());
        Assert.Contains("blocks.0.out_proj.weight", converted.Keys);
        Assert.DoesNotContain("blocks.0.attn_out_proj.weight", converted.Keys);
        var (missing, unexpected) = fused.load_state_dict(converted, strict: true);
        Assert.Empty(missing);
        Assert.Empty(unexpected);
        var images = TestUtil.RandomImages(unfusedCfg, 2, seed: 14);
        using var noGrad = torch.no_grad();
        Assert.True(TestUtil.MaxAbs(fused.call(images), unfused.call(images)) < 1e-10);
    }

    [Fact]
    public void Gradients_match_finite_differences_in_float64()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { Depth = 1, ImgSize = 8, NumClasses = 3, QkNorm = true, Norm = NormKind.RmsNorm, ClassToken = true, GlobalPool = GlobalPool.Map };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 15, scale: 0.3);
        using var scope = torch.NewDisposeScope();
        var images = TestUtil.RandomImages(c, 2, seed: 16);
        var weights = torch.randn(new long[] { 2, 3 }, dtype: ScalarType.Float64, generator: new torch.Generator(17));
        double Loss() { using var ng = torch.no_grad(); return (model.call(images) * weights).sum().item<double>(); }

        model.zero_grad();
        (model.call(images) * weights).sum().backward();
        var rng = new Random(18);
        int checkedCount = 0;
        foreach (var (name, p) in model.named_parameters())
        {
            var grad = p.grad!.reshape(-1);
            var flat = p.detach().reshape(-1);
            for (int trial = 0; trial < 2; trial++)
            {
                long i = rng.NextInt64(flat.shape[0]);
                double h = 1e-6, orig = flat[i].item<double>();
                using (torch.no_grad()) flat[i] = orig + h;
                double up = Loss();
                using (torch.no_grad()) flat[i] = orig - h;
                double down = Loss();
                using (torch.no_grad()) flat[i] = orig;
                double numeric = (up - down) / (2 * h), analytic = grad[i].item<double>();
                Assert.True(Math.Abs(numeric - analytic) <= 1e-6 * Math.Max(1, Math.Abs(numeric)),
                    $"{name}[{i}]: autograd {analytic:E6}, finite difference {numeric:E6}");
                checkedCount++;
            }
        }
        Assert.True(checkedCount > 20);
    }

    [Fact]
    public void An_image_size_that_is_not_a_multiple_of_the_patch_drops_the_remainder()
    {
        // 18 px with 4-px patches: a 4 × 4 grid; the last 2 rows and columns are ignored, as the strided convolution
        // in timm and big_vision ignores them. Same weights, so the model on the 16-px crop gives the same outputs.
        var c16 = TestUtil.Tiny(BlockKind.Sequential) with { ClassToken = true, GlobalPool = GlobalPool.Token };
        var c18 = c16 with { ImgSize = 18 };
        Assert.Equal(c16.NumPatches, c18.NumPatches);
        using var m16 = new VisionTransformer(c16, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(m16, seed: 31);
        using var m18 = new VisionTransformer(c18, torch.CPU, ScalarType.Float64);
        m18.load_state_dict(m16.state_dict());
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(c18, 2, seed: 32);
        var expected = new Reference(m16.state_dict(), c16).Model(images.narrow(2, 0, 16).narrow(3, 0, 16)).Logits!;
        Assert.True(TestUtil.MaxAbs(m18.call(images), expected) < 1e-10);
        Assert.Equal(27 * 27, (ViTConfig.Parse("So400m/14") with { ImgSize = 384 }).NumPatches);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(2)]
    public void Dynamic_image_size_resamples_position_embedding(int regTokens)
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { DynamicImgSize = true, ClassToken = true, RegTokens = regTokens };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 19);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        // At the native size, dynamic mode is exactly the fixed-size model.
        var images = TestUtil.RandomImages(c, 2, seed: 20);
        var expected = new Reference(model.state_dict(), c).Model(images);
        Assert.True(TestUtil.MaxAbs(model.call(images), expected.Logits!) < 1e-10);
        // Other sizes give the right number of patch tokens.
        using var output = model.Encode(TestUtil.RandomImages(c, 2, seed: 21, h: 8, w: 24));
        Assert.Equal(new long[] { 2, 2 * 6, c.EmbedDim }, output.PatchTokens.shape);
    }

    [Fact]
    public void Bfloat16_model_runs_and_tracks_float32()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel) with { Norm = NormKind.RmsNorm };
        using var f32 = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(f32, seed: 22, scale: 0.2);
        using var bf16 = new VisionTransformer(c, torch.CPU, ScalarType.BFloat16);
        using var scope = torch.NewDisposeScope();
        bf16.load_state_dict(f32.state_dict());
        var images = TestUtil.RandomImages(c, 2, seed: 23, ScalarType.Float32);
        using var noGrad = torch.no_grad();
        var y32 = f32.call(images);
        var y16 = bf16.call(images.to(ScalarType.BFloat16));
        Assert.Equal(ScalarType.BFloat16, y16.dtype);
        Assert.True(bf16.parameters().All(p => p.dtype == ScalarType.BFloat16));
        // bf16 keeps 8 mantissa bits; a 2-block model stays within a few percent of float32.
        double err = TestUtil.RelErr(y16, y32);
        Assert.True(err < 0.05, $"bf16 relative error {err:E2}");
    }
}
