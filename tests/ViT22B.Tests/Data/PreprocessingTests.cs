using TorchSharp;
using ViT22B.Data;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Data;

/// <summary>A checkpoint's evaluation preprocessing against a float64 reference pipeline (antialiased bicubic resize
/// from <see cref="ReferenceResampling"/>, clamp to [0, 1], torchvision's center-crop rounding, (v − mean) / std).</summary>
public sealed class PreprocessingTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-prep-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Tensor Image(long h, long w) =>
        torch.rand(new[] { 3L, h, w }, dtype: ScalarType.Float64, generator: new torch.Generator(50)).to(ScalarType.Float32);

    private static Tensor Reference(Tensor image, long rh, long rw, int size, Preprocessing p)
    {
        var x = ReferenceResampling.Resize(image, rh, rw).Clamped(0.0, 1.0);
        long top = (long)Math.Round((rh - size) / 2.0, MidpointRounding.ToEven), left = (long)Math.Round((rw - size) / 2.0, MidpointRounding.ToEven);
        x = x.narrow(1, top, size).narrow(2, left, size);
        var mean = torch.tensor(new[] { p.Mean.R, p.Mean.G, p.Mean.B }, dtype: ScalarType.Float64).view(3, 1, 1);
        var std = torch.tensor(new[] { p.Std.R, p.Std.G, p.Std.B }, dtype: ScalarType.Float64).view(3, 1, 1);
        return (x - mean) / std;
    }

    [Fact]
    public void Center_crop_resizes_the_shorter_side_to_size_over_crop_then_crops()
    {
        // DINOv2's: crop 0.875 at 14 px → shorter side 16, then the central 14 × 14.
        var p = ViTConfig.TimmPreprocessing("vit_base_patch14_dinov2");
        Assert.Equal(ResizeMode.CenterCrop, p.Resize);
        Assert.Equal(0.875, p.CropPct);
        Assert.Equal(16, p.ScaleSize(14));
        using var scope = torch.NewDisposeScope();
        var image = Image(30, 45);                          // → 16 × 24
        var y = p.EvalTransform(14)(image, new Random(0));
        Assert.Equal(new long[] { 3, 14, 14 }, y.shape);
        Assert.True(TestUtil.MaxAbs(y, Reference(image, 16, 24, 14, p)) < 1e-5);
    }

    [Fact]
    public void SigLIP_squashes_to_the_square_size_with_pixels_in_minus_one_one()
    {
        var p = ViTConfig.TimmPreprocessing("vit_so400m_patch14_siglip_224");
        Assert.Equal(ResizeMode.Squash, p.Resize);
        using var scope = torch.NewDisposeScope();
        var image = Image(30, 45);
        var y = p.EvalTransform(14)(image, new Random(0));
        Assert.True(TestUtil.MaxAbs(y, Reference(image, 14, 14, 14, p)) < 1e-5);
        Assert.True(y.min().item<float>() >= -1f && y.max().item<float>() <= 1f);
    }

    [Theory]
    [InlineData("vit_base_patch16_224", 0.5, 0.5, 0.9)]
    [InlineData("deit3_base_patch16_224", 0.485, 0.229, 0.9)]
    [InlineData("vit_large_patch14_reg4_dinov2", 0.485, 0.229, 0.875)]
    [InlineData("vit_base_patch16_clip_224", 0.48145466, 0.26862954, 0.95)]
    [InlineData("vit_base_patch16_clip_quickgelu_224", 0.48145466, 0.26862954, 1.0)]
    [InlineData("vit_base_patch16_siglip_224", 0.5, 0.5, 1.0)]
    public void Each_family_carries_its_home_preprocessing(string name, double meanR, double stdR, double crop)
    {
        var p = ViTConfig.TimmPreprocessing(name);
        Assert.Equal(meanR, p.Mean.R);
        Assert.Equal(stdR, p.Std.R);
        Assert.Equal(crop, p.CropPct);
        Assert.Equal(Resampling.Bicubic, p.Interpolation);
        Assert.Throws<ArgumentException>(() => ViTConfig.TimmPreprocessing("vit_nonexistent"));
    }

    [Fact]
    public void Half_mean_and_std_give_the_same_floats_as_2v_minus_1()
    {
        // ImageTensors' MinusOneToOne overloads go through Preprocessing (0.5 / 0.5); 2v − 1 is what they computed before.
        using var scope = torch.NewDisposeScope();
        var image = torch.rand(new[] { 3L, 64, 64 }, dtype: ScalarType.Float32, generator: new torch.Generator(51));
        var half = Transforms.Normalize(Preprocessing.Half, Preprocessing.Half)(image, new Random(0));
        Assert.True(TensorAssert.Same(Transforms.Normalize(PixelNormalization.MinusOneToOne)(image, new Random(0)), half));
    }

    [Fact]
    public void Json_round_trips_and_bad_json_is_named()
    {
        foreach (string name in ViTConfig.TimmNames)
        {
            var p = ViTConfig.TimmPreprocessing(name);
            Assert.Equal(p, Preprocessing.FromJson(p.ToJson()));
        }
        Assert.Contains("crop_pct", Assert.Throws<FormatException>(() => Preprocessing.FromJson("""{"mean":[0,0,0],"std":[1,1,1],"resize":"squash","crop_pct":1.5,"interpolation":"bicubic"}""")).Message, StringComparison.Ordinal);
        Assert.Contains("resize", Assert.Throws<FormatException>(() => Preprocessing.FromJson("""{"mean":[0,0,0],"std":[1,1,1],"resize":"zoom","crop_pct":1,"interpolation":"bicubic"}""")).Message, StringComparison.Ordinal);
        Assert.Contains("'std'", Assert.Throws<FormatException>(() => Preprocessing.FromJson("""{"mean":[0,0,0],"std":[1,1],"resize":"squash","crop_pct":1,"interpolation":"bicubic"}""")).Message, StringComparison.Ordinal);
        Assert.Throws<FormatException>(() => Preprocessing.FromJson("{"));
    }

    [Fact]
    public void A_saved_checkpoint_carries_its_config_and_preprocessing()
    {
        var c = ViTConfig.FromTimm("vit_base_patch16_siglip_224") with { Depth = 1, EmbedDim = 32, NumHeads = 2, MlpDim = 48, ImgSize = 32 };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        string path = Path.Combine(_dir, "m.safetensors");
        var p = ViTConfig.TimmPreprocessing("vit_base_patch16_siglip_224");
        PretrainedCheckpoint.Save(model, path, p);
        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(p, Preprocessing.FromMetadata(reader.Metadata));
        Assert.Equal(c, ViTConfigJson.FromJson(reader.Metadata[PretrainedCheckpoint.ConfigMetadataKey]));
    }
}
