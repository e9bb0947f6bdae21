using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>Models built for non-square images (timm's <c>img_size=(h, w)</c>), against the float64 reference.</summary>
public sealed class NonSquareTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-ns-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static ViTConfig Wide(BlockKind kind) => TestUtil.Tiny(kind) with { ImgSize = 16, ImgWidth = 26, ClassToken = true, GlobalPool = GlobalPool.Token };

    [Theory]
    [InlineData(BlockKind.Parallel)]
    [InlineData(BlockKind.Sequential)]
    public void A_16_by_26_model_has_a_4_by_6_grid_and_matches_the_reference(BlockKind kind)
    {
        var c = Wide(kind);                                   // 26 / 4 = 6 columns, 2 pixels dropped
        Assert.Equal((4, 6, 24), (c.GridHeight, c.GridWidth, c.NumPatches));
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        Assert.Equal(new long[] { 1, 25, c.EmbedDim }, model.state_dict()["pos_embed"].shape);
        TestUtil.Randomize(model, seed: 60);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(c, 2, seed: 61);
        Assert.Equal(new long[] { 2, 3, 16, 26 }, images.shape);
        var expected = new Reference(model.state_dict(), c).Model(images.narrow(3, 0, 24)).Logits!;
        Assert.True(TestUtil.MaxAbs(model.call(images), expected) < 1e-10);
        var e = Assert.Throws<ArgumentException>(() => model.call(TestUtil.RandomImages(c, 1, seed: 62, h: 26, w: 16)));
        Assert.Contains("Expected 16×26 images, found 26×16", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Json_takes_height_and_width_and_refuses_other_forms()
    {
        var c = Wide(BlockKind.Parallel);
        string json = ViTConfigJson.ToJson(c);
        Assert.Contains("\"img_size\": [", json, StringComparison.Ordinal);
        Assert.Equal(c, ViTConfigJson.FromJson(json));
        Assert.Null(ViTConfigJson.FromJson(ViTConfigJson.ToJson(c with { ImgWidth = null })).ImgWidth);
        Assert.Contains("[height, width]", Assert.Throws<FormatException>(() => ViTConfigJson.FromJson("{\"img_size\": [16, 26, 3]}")).Message, StringComparison.Ordinal);
        Assert.Contains("image width 2", Assert.Throws<ArgumentException>(() => ViTConfigJson.FromJson("{\"img_size\": [224, 2]}")).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_square_grid_with_the_token_count_of_a_non_square_one_is_resampled_not_copied()
    {
        // 12 × 12 and 16 × 9 both have 144 patches: the shapes agree, the grids do not (a review found this copied).
        var square = TestUtil.Tiny(BlockKind.Sequential) with { ImgSize = 48, ClassToken = true, GlobalPool = GlobalPool.Token };
        using var m = new VisionTransformer(square, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(m, seed: 64);
        string path = Path.Combine(_dir, "square12.safetensors");
        SafetensorsCheckpoint.Save(m, path);   // no config metadata: the grid is inferred as square, as timm does
        using var tall = new VisionTransformer(square with { ImgSize = 64, ImgWidth = 36 }, torch.CPU, ScalarType.Float64);
        Assert.Equal(m.state_dict()["pos_embed"].shape, tall.state_dict()["pos_embed"].shape);
        var report = PretrainedCheckpoint.Load(tall, path);
        Assert.Contains(report.Resampled, n => n.Key == "pos_embed" && n.Note.Contains("grid 12×12 → 16×9", StringComparison.Ordinal));
        var expected = ReferenceResampling.PositionEmbedding(m.state_dict()["pos_embed"], 1, 12, 16, 9);
        Assert.True(TestUtil.MaxAbs(tall.state_dict()["pos_embed"], expected) < 1e-12);

        // A file saved with its config knows its own grid: a 16 × 9 model's embedding comes back as it was.
        string own = Path.Combine(_dir, "tall.safetensors");
        PretrainedCheckpoint.Save(tall, own);
        using var again = new VisionTransformer(square with { ImgSize = 64, ImgWidth = 36 }, torch.CPU, ScalarType.Float64);
        var r2 = PretrainedCheckpoint.Load(again, own);
        Assert.Contains("pos_embed", r2.Loaded);
        Assert.True(TensorAssert.Same(tall.state_dict()["pos_embed"], again.state_dict()["pos_embed"]));
    }

    [Fact]
    public void A_square_checkpoint_loads_into_a_non_square_model_with_the_grid_resampled()
    {
        var square = Wide(BlockKind.Sequential) with { ImgWidth = null };   // 4 × 4
        using var m = new VisionTransformer(square, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(m, seed: 63);
        string path = Path.Combine(_dir, "square.safetensors");
        SafetensorsCheckpoint.Save(m, path);
        using var wide = new VisionTransformer(Wide(BlockKind.Sequential), torch.CPU, ScalarType.Float64);
        var report = PretrainedCheckpoint.Load(wide, path);
        Assert.Contains(report.Resampled, n => n.Key == "pos_embed" && n.Note.Contains("grid 4×4 → 4×6", StringComparison.Ordinal));
        var expected = ReferenceResampling.PositionEmbedding(m.state_dict()["pos_embed"], 1, 4, 4, 6);
        Assert.True(TestUtil.MaxAbs(wide.state_dict()["pos_embed"], expected) < 1e-12);
    }
}
