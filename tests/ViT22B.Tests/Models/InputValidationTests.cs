using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

public class InputValidationTests
{
    private static readonly ViTConfig Cfg = TestUtil.Tiny(BlockKind.Parallel);

    private static ArgumentException Forward(Tensor images)
    {
        using var model = new VisionTransformer(Cfg, torch.CPU, ScalarType.Float32);
        using (images)   // the callers' temporary: reachable until the forward has failed (docs/torchsharp-notes.md)
            return Assert.Throws<ArgumentException>(() => model.call(images));
    }

    [Fact]
    public void Wrong_channel_count_is_named() =>
        Assert.Contains("Expected 3 input channels, found 1", Forward(torch.zeros(2, 1, 16, 16)).Message);

    [Fact]
    public void Wrong_image_size_is_named() =>
        Assert.Contains("Expected 16×16 images, found 16×20", Forward(torch.zeros(2, 3, 16, 20)).Message);

    [Fact]
    public void Wrong_rank_is_named() =>
        Assert.Contains("Expected images [B, C, H, W], found shape [3, 16, 16]", Forward(torch.zeros(3, 16, 16)).Message);

    [Fact]
    public void Wrong_dtype_is_named() =>
        Assert.Contains("Images are Float64 but the model's parameters are Float32", Forward(torch.zeros(new long[] { 1, 3, 16, 16 }, dtype: ScalarType.Float64)).Message);

    [Fact]
    public void Dynamic_size_not_divisible_by_patch_is_named()
    {
        using var model = new VisionTransformer(Cfg with { DynamicImgSize = true }, torch.CPU, ScalarType.Float32);
        using var scope = torch.NewDisposeScope();
        var e = Assert.Throws<ArgumentException>(() => model.call(torch.zeros(1, 3, 16, 18)));
        Assert.Contains("16×18 is not a positive multiple of the patch size 4", e.Message);
    }

    [Fact]
    public void Invalid_config_is_rejected_by_the_model()
    {
        var e = Assert.Throws<ArgumentException>(() => new VisionTransformer(Cfg with { NumHeads = 3 }, torch.CPU));
        Assert.Contains("embed_dim 16 is not divisible by num_heads 3", e.Message);
    }
}
