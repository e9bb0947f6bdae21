using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Accounting;

/// <summary>Published parameter and FLOPs numbers (docs/model.md#parameters-and-flops) and agreement with instantiated models.</summary>
public class ModelAccountingTests
{
    [Fact]
    public void Vit22B_block_weights_match_the_paper() =>
        Assert.Equal(21_743_271_936L, ModelAccounting.Parameters(ViTConfig.Parse("22B/14")).BlockMatmulWeights);

    [Fact]
    public void Vit22B_with_map_head_counts_22_2_billion()
    {
        var p = ModelAccounting.Parameters(ViTConfig.Parse("22B/14"));
        // docs/model.md#parameters-and-flops: block matmuls + MLP biases + fused out biases + norm scales + QK-norm scales + patch embedding
        // (with bias) + 256 pos-embs = 21,750,251,520; + MAP head (F = 24576) = 22,203,310,080, where the usual MAP
        // formula 4D² + 2DF + 8D + F assumes a LayerNorm with bias in the head. The 22B preset's norms are
        // scale-only, so its MAP norm has D = 6144 parameters fewer.
        Assert.Equal(21_750_251_520L, p.Backbone);
        Assert.Equal(22_203_310_080L - 6144, p.Total);
    }

    [Fact]
    public void Vit_B16_matches_timm() => Assert.Equal(86_567_656L, ModelAccounting.Parameters(ViTConfig.Parse("B/16")).Total);

    [Fact]
    public void So400m_backbone_plus_map_matches_sovit_table() =>
        Assert.Equal(427_680_704L, ModelAccounting.Parameters(ViTConfig.Parse("So400m/14")).Total);

    [Fact]
    public void Vit_G14_backbone_without_head_matches_vit22b_table() =>
        Assert.Equal(1_842_772_352L, ModelAccounting.Parameters(ViTConfig.Parse("G/14")).Backbone);

    [Fact]
    public void Other_published_counts()
    {
        Assert.Equal(1_011_199_616L, ModelAccounting.Parameters(ViTConfig.Parse("g/14")).Backbone);
        var g518 = ModelAccounting.Parameters(ViTConfig.Parse("G/14") with { ImgSize = 518 });
        Assert.Equal(1_882_984_448L, g518.Backbone + g518.PoolHead);
        Assert.Equal(3_926_402_969L, ModelAccounting.Parameters(ViTConfig.Parse("e/14") with { NumClasses = 29_593 }).Total);
        Assert.Equal(137_374_240L, ModelAccounting.Parameters(ViTConfig.Parse("So150m/14")).Total);
        foreach (var (preset, count) in new[] { ("Ti/16", 5_717_416L), ("S/16", 22_050_664L), ("L/16", 304_326_632L), ("H/14", 632_045_800L) })
            Assert.Equal(count, ModelAccounting.Parameters(ViTConfig.Parse(preset)).Total);
    }

    [Theory]
    // A table of rounded per-component GFLOPs sums to 11,251.14; the exact sum is 11,251.130 G (11.25 TFLOP).
    [InlineData("22B/14", 224, 11_251.13)]
    [InlineData("B/16", 224, 35.13)]
    [InlineData("So400m/14", 224, 220.35)]
    // "@384" with patch 14 is 27×27 = 729 tokens (big_vision's VALID convolution drops the 6-pixel border): 378 px.
    [InlineData("So400m/14", 378, 670.35)]
    [InlineData("So400m/14", 518, 1_367.84)]
    [InlineData("g/14", 518, 3_198.72)]
    [InlineData("G/14", 518, 5_655.29)]
    [InlineData("So150m/14", 224, 71.40)]
    public void Forward_flops_match_spec_table(string preset, int img, double gflops)
    {
        var f = ModelAccounting.Flops(ViTConfig.Parse(preset) with { ImgSize = img });
        Assert.Equal(gflops, f.Forward / 1e9, 2);   // the table rounds to 0.01 GFLOP
        Assert.Equal(3 * f.Forward, f.Training);
    }

    [Fact]
    public void Vit_L16_at_384_with_map_matches_sovit_table()
    {
        var c = ViTConfig.Parse("L/16") with { ImgSize = 384, ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0 };
        Assert.Equal(383.85, ModelAccounting.Flops(c).Forward / 1e9, 2);
    }

    [Fact]
    public void Vit22B_flops_components_match_spec()
    {
        var f = ModelAccounting.Flops(ViTConfig.Parse("22B/14"));
        Assert.Equal(11_132.56, f.BlockMatmuls / 1e9, 2);
        Assert.Equal(77.31, f.Attention / 1e9, 2);
        Assert.Equal(1.85, f.Stem / 1e9, 2);
        Assert.Equal(39.42, f.Head / 1e9, 2);
        // Per-token training FLOPs of the blocks, 6N + 12·L·D·T = 1.3137e11 (PaLM App. B); MFU check 54.93%.
        var c = ViTConfig.Parse("22B/14");
        double perToken = 3 * (f.BlockMatmuls + f.Attention) / c.NumTokens;
        Assert.Equal(1.3137e11, perToken, 1.3137e11 * 1e-4);
        Assert.Equal(0.5493, ModelAccounting.Mfu(perToken, 1150, 275e12)!.Value, 4);
    }

    public static TheoryData<string> VariantNames() => new(TestUtil.Variants().Select(v => v.Name));

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void Count_equals_instantiated_parameters_for_every_variant(string variant)
    {
        var c = TestUtil.Variants().Single(v => v.Name == variant).Config;
        AssertCountMatches(c);
        AssertCountMatches(c with { GlobalPool = GlobalPool.Map, NumClasses = 7 });
    }

    [Theory]
    [InlineData("Ti/16")]
    [InlineData("S/16")]
    [InlineData("B/16")]
    public void Count_equals_instantiated_parameters_for_small_presets(string preset)
    {
        AssertCountMatches(ViTConfig.Parse(preset));
        AssertCountMatches(ViTConfig.Parse("22B/14") with { EmbedDim = 192, NumHeads = 3, MlpDim = 768, Depth = 2 });
    }

    private static void AssertCountMatches(ViTConfig c)
    {
        using var m = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        long actual = m.parameters().Sum(p => p.numel());
        Assert.Equal(actual, ModelAccounting.Parameters(c).Total);
    }
}
