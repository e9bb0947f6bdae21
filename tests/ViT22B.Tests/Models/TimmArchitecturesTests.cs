using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>The timm names build the architectures timm builds, checked by parameter counts.</summary>
public class TimmArchitecturesTests
{
    /// <summary>Every known name with its exact parameter count, counted by hand from timm's module definitions
    /// (huggingface/pytorch-image-models, vision_transformer.py and deit.py) for the default pretrained tag's image
    /// size and class count.</summary>
    public static TheoryData<string, long> ExactCounts() => new()
    {
        { "vit_tiny_patch16_224", 5_717_416 },
        { "vit_small_patch16_224", 22_050_664 },
        { "vit_base_patch16_224", 86_567_656 },
        { "vit_large_patch16_224", 304_326_632 },
        { "deit3_small_patch16_224", 22_059_496 },
        { "deit3_base_patch16_224", 86_585_320 },
        { "vit_small_patch14_dinov2", 22_056_192 },
        { "vit_base_patch14_dinov2", 86_579_712 },
        { "vit_large_patch14_dinov2", 304_367_616 },
        { "vit_small_patch14_reg4_dinov2", 22_057_344 },
        { "vit_base_patch14_reg4_dinov2", 86_582_016 },
        { "vit_large_patch14_reg4_dinov2", 304_370_688 },
        { "vit_base_patch16_clip_224", 86_568_424 },
        { "vit_base_patch16_clip_quickgelu_224", 86_193_152 },
        { "vit_base_patch16_siglip_224", 92_884_224 },
        { "vit_so400m_patch14_siglip_224", 427_680_704 },
        { "vit_so400m_patch14_siglip_378", 428_225_600 },
    };

    [Theory]
    [MemberData(nameof(ExactCounts))]
    public void Every_name_builds_a_model_with_timms_parameter_count(string name, long expected)
    {
        var c = ViTConfig.FromTimm(name);
        using var model = new VisionTransformer(c, torch.META, ScalarType.Float32);   // shapes only, no memory
        Assert.Equal(expected, model.parameters().Sum(p => p.numel()));
        Assert.Equal(expected, ModelAccounting.Parameters(c).Total);
    }

    [Theory]
    // param_count (millions) of the default tag in timm's results/results-imagenet.csv: published, independent of
    // the counts above.
    [InlineData("vit_tiny_patch16_224", 5.72)]
    [InlineData("vit_small_patch16_224", 22.05)]
    [InlineData("vit_base_patch16_224", 86.57)]
    [InlineData("vit_large_patch16_224", 304.33)]
    [InlineData("deit3_small_patch16_224", 22.06)]
    [InlineData("deit3_base_patch16_224", 86.59)]
    [InlineData("vit_base_patch16_clip_224", 86.57)]
    public void Counts_match_timms_published_results(string name, double millions) =>
        Assert.Equal(millions, Math.Round(ModelAccounting.Parameters(ViTConfig.FromTimm(name)).Total / 1e6, 2));

    [Fact]
    public void Every_known_name_has_a_count_and_tokens_match_timm()
    {
        var counted = ExactCounts().Select(row => (string)row[0]).ToHashSet();
        Assert.Equal(counted.Order(), ViTConfig.TimmNames.Order());
        Assert.Equal(37 * 37 + 1 + 4, ViTConfig.FromTimm("vit_base_patch14_reg4_dinov2").NumTokens);   // 518 / 14 = 37
        Assert.Equal(27 * 27, ViTConfig.FromTimm("vit_so400m_patch14_siglip_378").NumTokens);
        // At 384 px (timm's vit_so400m_patch14_siglip_384) the grid is still 27 × 27: the same parameters.
        Assert.Equal(428_225_600, ModelAccounting.Parameters(ViTConfig.FromTimm("vit_so400m_patch14_siglip_378") with { ImgSize = 384 }).Total);
    }

    [Fact]
    public void An_unknown_name_lists_the_known_ones()
    {
        var e = Assert.Throws<ArgumentException>(() => ViTConfig.FromTimm("vit_huge_patch14_clip_224"));
        Assert.Contains("'vit_huge_patch14_clip_224'", e.Message);
        Assert.Contains("vit_so400m_patch14_siglip_378", e.Message);
    }
}
