using TorchSharp;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>
/// Every timm name <see cref="ViTConfig.FromTimm"/> knows loads a timm-layout file and a Hugging Face-layout file of
/// its architecture, at its own resolution and at another one. Real widths and options, one block (the per-block keys
/// are the same for every block; the layout tests cover several), float32.
/// </summary>
public sealed class TimmCheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-timm-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    public static TheoryData<string> Names() => new(ViTConfig.TimmNames);

    /// <summary>The name's checkpoint as Hugging Face publishes it: transformers' own classes where they exist
    /// (ViT, DINOv2 with and without registers, CLIP, SigLIP). DeiT-3 has no transformers class: its Hub weights are
    /// timm's (one <c>model.safetensors</c> in the <c>timm/deit3_*</c> repositories), so its "Hugging Face" file here is
    /// timm's keys again, written as a sharded Hugging Face index to exercise that path: a second timm-layout load, not
    /// a layout of its own.</summary>
    private (string Path, string Layout, bool ResetHead) HuggingFace(string name, ViTConfig c, IDictionary<string, Tensor> sd)
    {
        string file = Path.Combine(_dir, name + ".hf.safetensors");
        if (name.StartsWith("deit3", StringComparison.Ordinal))
            return (HomeLayouts.SaveSharded(sd, Path.Combine(_dir, name + ".hf"), shards: 2), "timm", false);
        (Dictionary<string, Tensor> tensors, string layout, bool reset) = name switch
        {
            _ when name.StartsWith("vit_", StringComparison.Ordinal) && name.Contains("dinov2", StringComparison.Ordinal) =>
                (HomeLayouts.HfDinov2(sd, c, ScalarMath.Full(new long[] { 1, 1, c.EmbedDim }, 0.125, ScalarType.Float32, torch.CPU)), "Hugging Face DINOv2", false),
            _ when name.Contains("siglip", StringComparison.Ordinal) => (HomeLayouts.HfSiglip(sd, c, textTower: true), "Hugging Face SigLIP", false),
            // CLIP's 1000-class timm tag is a timm fine-tune: from Hugging Face's CLIP tower its classifier starts afresh.
            _ when name.Contains("clip", StringComparison.Ordinal) => (HomeLayouts.HfClip(sd, c, projection: c.NumClasses == 512), "Hugging Face CLIP", c.NumClasses != 512),
            _ => (HomeLayouts.HfVit(sd, c, classifier: true), "Hugging Face ViT", false),
        };
        Safetensors.Save(tensors, file);
        return (file, layout, reset);
    }

    private static int OtherSize(ViTConfig c) => c.ImgSize switch { 378 or 518 => 224, _ => c.ImgSize + 32 };

    [Theory]
    [MemberData(nameof(Names))]
    public void Name_loads_timm_and_Hugging_Face_files_at_its_own_and_another_resolution(string name)
    {
        var c = ViTConfig.FromTimm(name) with { Depth = 1 };
        using var original = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        TestUtil.Randomize(original, seed: name.Length);
        if (name.Contains("clip", StringComparison.Ordinal))
            using (var noGrad = torch.no_grad()) original.state_dict()["head.bias"].zero_();   // CLIP's projection has no bias
        var sd = original.state_dict();
        string timm = Path.Combine(_dir, name + ".safetensors");
        SafetensorsCheckpoint.Save(original, timm);
        var hf = HuggingFace(name, c, sd);

        foreach (var (path, layout, reset) in new[] { (timm, "timm", false), hf })
        {
            foreach (int size in new[] { c.ImgSize, OtherSize(c) })
            {
                var cs = c with { ImgSize = size };
                using var model = new VisionTransformer(cs, torch.CPU, ScalarType.Float32);
                var report = PretrainedCheckpoint.Load(model, path, new PretrainedLoadOptions { ResetHead = reset });
                string what = $"{name} from {layout} at {size} px";
                Assert.Equal(layout, report.Layout);
                Assert.Empty(report.Missing);
                Assert.Empty(report.Unexpected);
                foreach (var (k, v) in model.state_dict())
                {
                    if (reset && k.StartsWith("head.", StringComparison.Ordinal))
                    {
                        Assert.Contains(report.Reinitialized, n => n.Key == k);
                        continue;
                    }
                    if (k == "pos_embed" && size != c.ImgSize)
                    {
                        int prefix = c.NoEmbedClass ? 0 : c.NumPrefixTokens;
                        var expected = ReferenceResampling.PositionEmbedding(sd[k], prefix, c.GridHeight, cs.GridHeight);
                        Assert.True(TestUtil.MaxAbs(v, expected) < 1e-5, $"{what}: pos_embed off by {TestUtil.MaxAbs(v, expected):E2}");
                        Assert.Contains(report.Resampled, n => n.Key == k);
                        continue;
                    }
                    // The DINOv2-register class token comes back as (cls - slot) + slot in float32.
                    double tolerance = k == "cls_token" && c.RegTokens > 0 && layout != "timm" ? 1e-6 : 0;
                    double diff = TestUtil.MaxAbs(v, sd[k]);
                    Assert.True(diff <= tolerance, $"{what}: {k} differs by {diff:E2} ({v.dtype} [{string.Join(", ", v.shape)}] vs {sd[k].dtype} [{string.Join(", ", sd[k].shape)}])");
                }
            }
        }
    }
}
