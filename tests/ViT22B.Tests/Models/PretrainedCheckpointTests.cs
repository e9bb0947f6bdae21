using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>
/// Checkpoints in other projects' layouts (written by <see cref="HomeLayouts"/> from those projects' key names) load
/// into the model and compute what the same weights compute in this library's own layout; resolution, patch and
/// classifier changes are adapted as timm adapts them. Float64 throughout.
/// </summary>
public sealed class PretrainedCheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-pre-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    private static ViTConfig Classic => TestUtil.Tiny(BlockKind.Sequential) with
    {
        QkvBias = true, QkNorm = false, NormBias = true, Act = Activation.Gelu, ClassToken = true, GlobalPool = GlobalPool.Token,
    };

    private static VisionTransformer Random(ViTConfig c, long seed)
    {
        var m = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(m, seed);
        return m;
    }

    private string Save(string name, IDictionary<string, Tensor> tensors)
    {
        string path = PathOf(name);
        Safetensors.Save(tensors, path);
        return path;
    }

    /// <summary>Loads <paramref name="path"/> into a fresh model of <paramref name="c"/> and checks that it equals
    /// <paramref name="original"/>: the same state dict (to 1e-15) and the same logits (to 1e-12).</summary>
    private static LoadReport AssertLoadsAs(VisionTransformer original, ViTConfig c, string path, string layout)
    {
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var report = PretrainedCheckpoint.Load(loaded, path);
        Assert.Equal(layout, report.Layout);
        Assert.True(report.IsExact, report.ToString());
        var expected = original.state_dict();
        foreach (var (k, v) in loaded.state_dict())
            Assert.True(TestUtil.MaxAbs(v, expected[k]) <= 1e-15, $"{k} differs by {TestUtil.MaxAbs(v, expected[k]):E2}");
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(c, 2, seed: 77);
        Assert.True(TestUtil.MaxAbs(loaded.call(images), original.call(images)) < 1e-12);
        return report;
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Hugging_Face_ViT_loads_with_qkv_fused_and_the_pooler_skipped(bool classifier)
    {
        var c = Classic with { NumClasses = classifier ? 5 : 0 };
        using var m = Random(c, 1);
        string path = Save("hf-vit.safetensors", HomeLayouts.HfVit(m.state_dict(), c, classifier));
        var report = AssertLoadsAs(m, c, path, "Hugging Face ViT");
        Assert.Contains(report.Converted, n => n.Key == "blocks.1.attn.qkv.weight" && n.Note.Contains("attention.attention.query.weight", StringComparison.Ordinal)
            && n.Note.Contains("key.weight", StringComparison.Ordinal) && n.Note.Contains("value.weight", StringComparison.Ordinal));
        if (!classifier) Assert.Contains(report.Skipped, n => n.Key == "pooler.dense.weight");
        else Assert.Contains(report.Converted, n => n.Key == "head.weight" && n.Note == "from classifier.weight");
    }

    [Fact]
    public void Hugging_Face_DINOv2_loads_with_layer_scale()
    {
        var c = Classic with { InitValues = 1e-5, NumClasses = 0 };
        using var m = Random(c, 2);
        string path = Save("hf-dinov2.safetensors", HomeLayouts.HfDinov2(m.state_dict(), c));
        var report = AssertLoadsAs(m, c, path, "Hugging Face DINOv2");
        Assert.Contains(report.Converted, n => n.Key == "blocks.0.ls1.gamma" && n.Note == "from encoder.layer.0.layer_scale1.lambda1");
        Assert.Contains(report.Skipped, n => n.Key == "embeddings.mask_token");
    }

    [Fact]
    public void Hugging_Face_DINOv2_with_registers_folds_the_class_slot_into_the_class_token()
    {
        // timm's reg4 DINOv2 gives prefix tokens no position slot; Hugging Face keeps one for the class token.
        var c = Classic with { InitValues = 1e-5, NumClasses = 0, RegTokens = 4, NoEmbedClass = true };
        using var m = Random(c, 3);
        var slot = torch.randn(new long[] { 1, 1, c.EmbedDim }, dtype: ScalarType.Float64, generator: new torch.Generator(4));
        string path = Save("hf-dinov2-reg.safetensors", HomeLayouts.HfDinov2(m.state_dict(), c, slot));
        var report = AssertLoadsAs(m, c, path, "Hugging Face DINOv2");
        Assert.Contains(report.Converted, n => n.Key == "cls_token" && n.Note.Contains("class slot", StringComparison.Ordinal));
        Assert.Contains(report.Converted, n => n.Key == "reg_token" && n.Note == "from embeddings.register_tokens");
    }

    [Fact]
    public void A_timm_parallel_block_checkpoint_with_separate_out_projections_loads_into_the_fused_default()
    {
        // timm's ParallelScalingBlock defaults to fuse_out_proj=False (attn_out_proj, mlp_out_proj); this library's
        // default fuses them: the checkpoint's two projections become one, columns [attn | mlp], biases summed.
        var unfused = TestUtil.Tiny(BlockKind.Parallel) with { FuseOutProj = false, ProjBias = true, NumClasses = 3 };
        using var m = Random(unfused, 28);
        string path = Save("timm-parallel.safetensors", m.state_dict());
        var fused = unfused with { FuseOutProj = true };
        using var loaded = new VisionTransformer(fused, torch.CPU, ScalarType.Float64);
        var report = PretrainedCheckpoint.Load(loaded, path);
        Assert.True(report.IsExact, report.ToString());
        Assert.Contains(report.Converted, n => n.Key == "blocks.0.out_proj.weight" && n.Note == "from blocks.0.attn_out_proj.weight + blocks.0.mlp_out_proj.weight");
        Assert.Contains(report.Converted, n => n.Key == "blocks.0.out_proj.bias");
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(unfused, 2, seed: 29);
        Assert.True(TestUtil.MaxAbs(loaded.call(images), m.call(images)) < 1e-12);
    }

    [Fact]
    public void Meta_s_DINOv2_layout_loads_as_timm_converts_it()
    {
        // Meta's own state dicts (torch.hub, the .pth files) have timm's block names but keep 'mask_token', call the
        // registers 'register_tokens' and give the class token a position slot; timm's _convert_dinov2 drops the first,
        // renames the second and folds the slot into the class token.
        var c = Classic with { InitValues = 1e-5, NumClasses = 0, RegTokens = 4, NoEmbedClass = true };
        using var m = Random(c, 26);
        using var scope = torch.NewDisposeScope();
        var slot = torch.randn(new long[] { 1, 1, c.EmbedDim }, dtype: ScalarType.Float64, generator: new torch.Generator(27));
        var meta = m.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        meta["register_tokens"] = meta["reg_token"];
        meta.Remove("reg_token");
        meta["cls_token"] = meta["cls_token"] - slot;
        meta["pos_embed"] = torch.cat(new[] { slot, meta["pos_embed"] }, 1);
        meta["mask_token"] = torch.zeros(1, c.EmbedDim, dtype: ScalarType.Float64);
        string path = Save("meta-dinov2-reg.safetensors", meta);
        var report = AssertLoadsAs(m, c, path, "timm");
        Assert.Contains(report.Converted, n => n.Key == "reg_token" && n.Note == "from register_tokens");
        Assert.Contains(report.Converted, n => n.Key == "cls_token" && n.Note.Contains("class slot", StringComparison.Ordinal));
        Assert.Contains(report.Skipped, n => n.Key == "mask_token");
    }

    [Fact]
    public void Hugging_Face_SigLIP_loads_with_its_attention_pool_split_and_the_text_tower_skipped()
    {
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0 };
        using var m = Random(c, 5);
        string path = Save("hf-siglip.safetensors", HomeLayouts.HfSiglip(m.state_dict(), c, textTower: true));
        var report = AssertLoadsAs(m, c, path, "Hugging Face SigLIP");
        Assert.Contains(report.Converted, n => n.Key == "attn_pool.kv.weight" && n.Note == "from vision_model.head.attention.in_proj_weight");
        Assert.Contains(report.Skipped, n => n.Key == "text_model.embeddings.token_embedding.weight" && n.Note.Contains("text tower", StringComparison.Ordinal));
        Assert.Contains(report.Skipped, n => n.Key == "logit_bias");
    }

    [Fact]
    public void A_Hugging_Face_SigLIP_checkpoint_computes_what_transformers_computes_once_the_config_matches_its_home()
    {
        // transformers' SiglipVisionConfig uses the tanh GELU, timm's SigLIP names the exact one. The "home" model here
        // is this library's with the tanh GELU (its numerics are checked against the float64 reference elsewhere).
        var timm = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0 };
        var home = timm with { Act = Activation.GeluTanh };
        using var m = Random(home, 21);
        Directory.CreateDirectory(PathOf("siglip"));
        string path = Save(Path.Combine("siglip", "model.safetensors"), HomeLayouts.HfSiglip(m.state_dict(), home, textTower: false));
        var matched = PretrainedCheckpoint.MatchHome(timm, path, out var changes);
        Assert.Equal(home, matched);
        Assert.Equal($"activation Gelu → GeluTanh (transformers' SiglipVisionConfig default (no config.json beside the checkpoint))", Assert.Single(changes));
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(home, 2, seed: 78);
        var expected = m.call(images);
        using var asTimm = new VisionTransformer(timm, torch.CPU, ScalarType.Float64);
        using var asHome = new VisionTransformer(matched, torch.CPU, ScalarType.Float64);
        PretrainedCheckpoint.Load(asTimm, path);
        PretrainedCheckpoint.Load(asHome, path);
        Assert.True(TestUtil.MaxAbs(asHome.call(images), expected) < 1e-12);
        Assert.True(TestUtil.MaxAbs(asTimm.call(images), expected) > 1e-6);   // the exact GELU computes something else
    }

    [Fact]
    public void The_home_activation_and_norm_epsilon_come_from_config_json_else_the_home_defaults()
    {
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0 };
        using var m = Random(c, 22);
        string Folder(string name, IDictionary<string, Tensor> tensors, string? json)
        {
            Directory.CreateDirectory(PathOf(name));
            Save(Path.Combine(name, "model.safetensors"), tensors);
            if (json is not null) File.WriteAllText(PathOf(Path.Combine(name, "config.json")), json);
            return PathOf(name);
        }
        // A SiglipModel's config.json: the vision settings are under vision_config; what it leaves out is the default.
        string siglip = Folder("siglip", HomeLayouts.HfSiglip(m.state_dict(), c, textTower: true),
            """{"model_type": "siglip", "text_config": {"hidden_act": "quick_gelu"}, "vision_config": {"hidden_act": "gelu", "layer_norm_eps": 1e-05}}""");
        var matched = PretrainedCheckpoint.MatchHome(c, siglip, out var changes);
        Assert.Equal(c with { NormEps = 1e-5 }, matched);
        Assert.Equal($"norm ε 1E-06 → 1E-05 ({Path.Combine(siglip, "config.json")}: layer_norm_eps 1E-05)", Assert.Single(changes));

        // Hugging Face ViT without config.json: transformers' ViTConfig defaults (exact GELU, ε 1e-12).
        var vit = Classic with { NumClasses = 3 };
        using var mv = Random(vit, 23);
        matched = PretrainedCheckpoint.MatchHome(vit, Folder("vit", HomeLayouts.HfVit(mv.state_dict(), vit, classifier: true), null), out changes);
        Assert.Equal(vit with { NormEps = 1e-12 }, matched);
        Assert.Single(changes);

        // CLIP: QuickGELU and ε 1e-5 from an (OpenAI-style) config.json that names only the activation.
        var clip = Classic with { PreNorm = true, NumClasses = 0 };
        using var mc = Random(clip, 24);
        matched = PretrainedCheckpoint.MatchHome(clip, Folder("clip", HomeLayouts.HfClip(mc.state_dict(), clip, projection: false),
            """{"hidden_act": "quick_gelu"}"""), out changes);
        Assert.Equal(clip with { Act = Activation.QuickGelu, NormEps = 1e-5 }, matched);
        Assert.Equal(2, changes.Count);

        // big_vision: Flax's nn.gelu is the tanh approximation; timm files say nothing, so nothing changes.
        string npz = PathOf("bv.npz");
        HomeLayouts.SaveNpz(npz, HomeLayouts.BigVision(m.state_dict(), c, ""));
        Assert.Equal(c with { Act = Activation.GeluTanh }, PretrainedCheckpoint.MatchHome(c, npz, out changes));
        Assert.Contains("nn.gelu", Assert.Single(changes));
        string timmFile = Save("timm.safetensors", m.state_dict());
        Assert.Equal(c, PretrainedCheckpoint.MatchHome(c, timmFile, out changes));
        Assert.Empty(changes);

        // Bad config.json: named, with what is wrong.
        string relu = Folder("relu", HomeLayouts.HfSiglip(m.state_dict(), c, textTower: false), """{"vision_config": {"hidden_act": "relu"}}""");
        var e = Assert.Throws<InvalidDataException>(() => PretrainedCheckpoint.MatchHome(c, relu, out _));
        Assert.Contains(Path.Combine(relu, "config.json"), e.Message);
        Assert.Contains("'relu'", e.Message);
        string broken = Folder("broken", HomeLayouts.HfSiglip(m.state_dict(), c, textTower: false), """{"vision_config": """);
        e = Assert.Throws<InvalidDataException>(() => PretrainedCheckpoint.MatchHome(c, broken, out _));
        Assert.Contains("is not valid JSON", e.Message);
    }

    [Fact]
    public void Hugging_Face_CLIP_with_projection_loads_with_pre_norm_and_a_zero_head_bias()
    {
        var c = Classic with { PreNorm = true, Act = Activation.QuickGelu, NormEps = 1e-5, NumClasses = 6 };
        using var m = Random(c, 6);
        using (var noGrad = torch.no_grad()) m.state_dict()["head.bias"].zero_();   // CLIP's projection has no bias
        string path = Save("hf-clip.safetensors", HomeLayouts.HfClip(m.state_dict(), c, projection: true));
        var report = AssertLoadsAs(m, c, path, "Hugging Face CLIP");
        Assert.Contains(report.Converted, n => n.Key == "head.bias" && n.Note.StartsWith("zeros", StringComparison.Ordinal));
        Assert.Contains(report.Converted, n => n.Key == "norm_pre.weight" && n.Note == "from vision_model.pre_layrnorm.weight");
    }

    [Fact]
    public void OpenCLIP_visual_tower_loads_and_the_text_tower_is_skipped()
    {
        var c = Classic with { PreNorm = true, Act = Activation.QuickGelu, NormEps = 1e-5, NumClasses = 4 };
        using var m = Random(c, 7);
        using (var noGrad = torch.no_grad()) m.state_dict()["head.bias"].zero_();
        string path = Save("openclip.safetensors", HomeLayouts.OpenClip(m.state_dict(), c));
        var report = AssertLoadsAs(m, c, path, "OpenCLIP");
        Assert.Contains(report.Converted, n => n.Key == "head.weight" && n.Note == "from visual.proj");
        Assert.Equal(4, report.Skipped.Count);   // token_embedding, positional_embedding, text_projection, logit_scale
    }

    [Theory]
    [InlineData("", false, false)]
    [InlineData("params/img/", true, false)]
    [InlineData("params/img/", false, true)]
    public void Big_vision_npz_loads_with_flax_kernels_transposed(string prefix, bool compress, bool scan)
    {
        // A SigLIP-style image tower (no class token, MAP head) with a classifier.
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 3 };
        using var m = Random(c, 8);
        var tensors = HomeLayouts.BigVision(m.state_dict(), c, prefix, scan);
        if (prefix.Length > 0) tensors["params/txt/Encoder_0/encoder_norm/scale"] = torch.ones(3, dtype: ScalarType.Float64);
        string path = PathOf("bv.npz");
        HomeLayouts.SaveNpz(path, tensors, compress);
        var report = AssertLoadsAs(m, c, path, "big_vision");
        Assert.Contains(report.Converted, n => n.Key == "blocks.1.attn.qkv.weight");
        Assert.Contains(report.Converted, n => n.Key == "attn_pool.kv.weight");
        if (prefix.Length > 0) Assert.Contains(report.Skipped, n => n.Key == "params/txt/Encoder_0/encoder_norm/scale");
    }

    [Fact]
    public void Big_vision_class_token_without_a_position_slot_loads_into_either_convention()
    {
        // big_vision adds no position embedding to its class token: a timm model without prefix slots takes the
        // weights as they are; one with a class slot gets that slot as zeros, which computes the same.
        var bv = Classic with { NoEmbedClass = true, NumClasses = 3 };
        using var m = Random(bv, 9);
        string path = PathOf("bv-cls.npz");
        HomeLayouts.SaveNpz(path, HomeLayouts.BigVision(m.state_dict(), bv, ""));
        AssertLoadsAs(m, bv, path, "big_vision");

        var slotted = bv with { NoEmbedClass = false };
        using var loaded = new VisionTransformer(slotted, torch.CPU, ScalarType.Float64);
        var report = PretrainedCheckpoint.Load(loaded, path);
        Assert.Contains(report.Resampled, n => n.Key == "pos_embed" && n.Note.Contains("zeros", StringComparison.Ordinal));
        using var scope = torch.NewDisposeScope();
        Assert.Equal(0.0, loaded.state_dict()["pos_embed"].narrow(1, 0, 1).abs().max().item<double>());
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(bv, 2, seed: 10);
        Assert.True(TestUtil.MaxAbs(loaded.call(images), m.call(images)) < 1e-12);
    }

    [Fact]
    public void Hugging_Face_sharded_checkpoint_loads_like_one_file()
    {
        var c = Classic with { NumClasses = 5 };
        using var m = Random(c, 11);
        string index = HomeLayouts.SaveSharded(HomeLayouts.HfVit(m.state_dict(), c, classifier: true), PathOf("sharded"), shards: 3);
        AssertLoadsAs(m, c, index, "Hugging Face ViT");
        AssertLoadsAs(m, c, PathOf("sharded"), "Hugging Face ViT");   // the folder, as downloaded
    }

    [Theory]
    [InlineData(0, false)]
    [InlineData(1, false)]
    [InlineData(1, true)]
    public void Position_embedding_is_resampled_to_another_image_size(int regTokens, bool noEmbedClass)
    {
        var c = Classic with { RegTokens = regTokens, NoEmbedClass = noEmbedClass };   // 4×4 grid
        using var m = Random(c, 12);
        string path = Save("timm.safetensors", m.state_dict());
        foreach (int size in new[] { 28, 12 })   // 7×7 (up) and 3×3 (down)
        {
            var c2 = c with { ImgSize = size };
            using var loaded = new VisionTransformer(c2, torch.CPU, ScalarType.Float64);
            var report = PretrainedCheckpoint.Load(loaded, path);
            int prefix = noEmbedClass ? 0 : 1 + regTokens;
            var expected = ReferenceResampling.PositionEmbedding(m.state_dict()["pos_embed"], prefix, 4, size / 4);
            Assert.True(TestUtil.MaxAbs(loaded.state_dict()["pos_embed"], expected) < 1e-12);
            Assert.Contains(report.Resampled, n => n.Key == "pos_embed" && n.Note.Contains($"grid 4×4 → {size / 4}×{size / 4}", StringComparison.Ordinal));
            foreach (var (k, v) in loaded.state_dict().Where(kv => kv.Key != "pos_embed"))
                Assert.True(TensorAssert.Same(v, m.state_dict()[k]), k);
        }
    }

    [Fact]
    public void Dynamic_size_forward_resamples_like_the_reference()
    {
        var c = Classic with { DynamicImgSize = true };
        using var m = Random(c, 13);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        // At 24×24 the dynamic model equals a 24-px model whose position embedding is the reference resample.
        var fixedSize = c with { ImgSize = 24, DynamicImgSize = false };
        var sd = m.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        sd["pos_embed"] = ReferenceResampling.PositionEmbedding(sd["pos_embed"], 1, 4, 6);
        var images = TestUtil.RandomImages(fixedSize, 2, seed: 14);
        var expected = new Reference(sd, fixedSize).Model(images).Logits!;
        Assert.True(TestUtil.MaxAbs(m.call(images), expected) < 1e-10);
    }

    [Fact]
    public void Patch_embedding_is_resized_on_request_so_resized_patches_meet_it_as_before()
    {
        var c = Classic;                                    // patch 4
        using var m = Random(c, 15);
        string path = Save("timm.safetensors", m.state_dict());
        var c6 = c with { PatchSize = 6, ImgSize = 24 };    // 4×4 grid again
        using var loaded = new VisionTransformer(c6, torch.CPU, ScalarType.Float64);
        var refused = Assert.Throws<CheckpointMismatchException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains("ResizePatchEmbed", refused.Message, StringComparison.Ordinal);

        var report = PretrainedCheckpoint.Load(loaded, path, new PretrainedLoadOptions { ResizePatchEmbed = true });
        Assert.Contains(report.Resampled, n => n.Key == "patch_embed.proj.weight" && n.Note.Contains("4×4 → 6×6", StringComparison.Ordinal));
        // FlexiViT's property: for any 4×4 patch x, the 6×6 resize R x meets the new kernel as x met the old one
        // (upsampling: R has full column rank). R from the float64 reference resampler.
        using var scope = torch.NewDisposeScope();
        var w4 = m.state_dict()["patch_embed.proj.weight"];
        var w6 = loaded.state_dict()["patch_embed.proj.weight"];
        var x = torch.randn(new long[] { 5, 3, 4, 4 }, dtype: ScalarType.Float64, generator: new torch.Generator(16));
        var x6 = ReferenceResampling.Resize(x, 6, 6);
        var before = x.reshape(5, -1).matmul(w4.reshape(w4.shape[0], -1).t());
        var after = x6.reshape(5, -1).matmul(w6.reshape(w6.shape[0], -1).t());
        Assert.True(TestUtil.MaxAbs(after, before) < 1e-10, $"{TestUtil.MaxAbs(after, before):E2}");
    }

    [Fact]
    public void FlexiViT_checkpoints_resample_bilinearly_on_request()
    {
        // timm loads Google's FlexiViT weights with bilinear, non-antialiased resampling of both embeddings: a
        // 4-px-patch, 4×4-grid checkpoint into a 6-px-patch model at 30 px (5×5 grid).
        var c = Classic;
        using var m = Random(c, 24);
        string path = Save("flexi.safetensors", m.state_dict());
        var c6 = c with { PatchSize = 6, ImgSize = 30 };
        using var loaded = new VisionTransformer(c6, torch.CPU, ScalarType.Float64);
        var report = PretrainedCheckpoint.Load(loaded, path, new PretrainedLoadOptions { ResizePatchEmbed = true, Resampling = ResampleFilter.Bilinear });
        Assert.Contains(report.Resampled, n => n.Key == "pos_embed" && n.Note.Contains("4×4 → 5×5 (bilinear)", StringComparison.Ordinal));
        Assert.Contains(report.Resampled, n => n.Key == "patch_embed.proj.weight" && n.Note.Contains("bilinear", StringComparison.Ordinal));
        using var scope = torch.NewDisposeScope();
        var expected = ReferenceResampling.PositionEmbedding(m.state_dict()["pos_embed"], 1, 4, 5, 5, bilinear: true);
        Assert.True(TestUtil.MaxAbs(loaded.state_dict()["pos_embed"], expected) < 1e-12);
        // The patch embedding by FlexiViT's property, with the bilinear resize of the reference.
        var w4 = m.state_dict()["patch_embed.proj.weight"];
        var w6 = loaded.state_dict()["patch_embed.proj.weight"];
        var x = torch.randn(new long[] { 5, 3, 4, 4 }, dtype: ScalarType.Float64, generator: new torch.Generator(25));
        var x6 = ReferenceResampling.Resize(x, 6, 6, bilinear: true);
        var before = x.reshape(5, -1).matmul(w4.reshape(w4.shape[0], -1).t());
        var after = x6.reshape(5, -1).matmul(w6.reshape(w6.shape[0], -1).t());
        Assert.True(TestUtil.MaxAbs(after, before) < 1e-10, $"{TestUtil.MaxAbs(after, before):E2}");
        // A value that is no filter is refused, not taken for the default.
        var bad = Assert.Throws<ArgumentOutOfRangeException>(() => PretrainedCheckpoint.Load(loaded, path, new PretrainedLoadOptions { Resampling = (ResampleFilter)7 }));
        Assert.Contains("Resampling is 7", bad.Message, StringComparison.Ordinal);
        // And the default is not bilinear: the same load without the option gives another embedding.
        using var bicubic = new VisionTransformer(c6, torch.CPU, ScalarType.Float64);
        PretrainedCheckpoint.Load(bicubic, path, new PretrainedLoadOptions { ResizePatchEmbed = true });
        Assert.True(TestUtil.MaxAbs(bicubic.state_dict()["pos_embed"], expected) > 1e-6);
    }

    [Fact]
    public void A_classifier_of_another_class_count_is_reinitialised_only_on_request()
    {
        var c = Classic with { NumClasses = 5 };
        using var m = Random(c, 17);
        string path = Save("timm.safetensors", m.state_dict());
        var c10 = c with { NumClasses = 10 };
        using var loaded = new VisionTransformer(c10, torch.CPU, ScalarType.Float64);
        var before = loaded.state_dict()["head.weight"].clone();
        var refused = Assert.Throws<CheckpointMismatchException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains("ResetHead", refused.Message, StringComparison.Ordinal);
        Assert.True(TensorAssert.Same(before, loaded.state_dict()["head.weight"]));   // nothing copied

        var report = PretrainedCheckpoint.Load(loaded, path, new PretrainedLoadOptions { ResetHead = true });
        Assert.Equal(new[] { "head.bias", "head.weight" }, report.Reinitialized.Select(n => n.Key).Order(StringComparer.Ordinal));
        Assert.True(TensorAssert.Same(before, loaded.state_dict()["head.weight"]));
        Assert.True(TensorAssert.Same(m.state_dict()["blocks.1.mlp.fc2.weight"], loaded.state_dict()["blocks.1.mlp.fc2.weight"]));

        // A checkpoint's classifier is skipped by a model without one.
        using var headless = new VisionTransformer(c with { NumClasses = 0 }, torch.CPU, ScalarType.Float64);
        var r0 = PretrainedCheckpoint.Load(headless, path);
        Assert.Contains(r0.Skipped, n => n.Key == "head.weight" && n.Note.Contains("no classifier", StringComparison.Ordinal));
    }

    [Fact]
    public void An_unknown_layout_lists_the_first_keys_and_the_known_layouts()
    {
        string path = Save("odd.safetensors", new Dictionary<string, Tensor> { ["encoder.weird.weight"] = torch.ones(2), ["other"] = torch.ones(1) });
        using var model = new VisionTransformer(Classic, torch.CPU, ScalarType.Float64);
        var e = Assert.Throws<CheckpointLayoutException>(() => PretrainedCheckpoint.Load(model, path));
        Assert.Contains("encoder.weird.weight", e.Message, StringComparison.Ordinal);
        Assert.Contains("Hugging Face SigLIP", e.Message, StringComparison.Ordinal);
        Assert.Contains("big_vision", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_tensor_of_the_wrong_rank_is_a_mismatch_naming_it_not_a_crash()
    {
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 3 };
        using var m = Random(c, 19);
        var tensors = HomeLayouts.BigVision(m.state_dict(), c, "");
        tensors["embedding/kernel"] = torch.ones(4, 4, dtype: ScalarType.Float64);                              // should be HWIO, 4-D
        tensors["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"] = torch.ones(Array.Empty<long>(), dtype: ScalarType.Float64);
        string path = PathOf("rank.npz");
        HomeLayouts.SaveNpz(path, tensors);
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var e = Assert.Throws<CheckpointMismatchException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains(e.Report.Mismatched, x => x.Key.StartsWith("patch_embed.proj.weight (from embedding/kernel", StringComparison.Ordinal));
        Assert.Contains(e.Report.Mismatched, x => x.Key.StartsWith("blocks.0.attn.proj.weight (from Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel", StringComparison.Ordinal));
    }

    [Fact]
    public void A_scanned_tensor_of_the_wrong_rank_is_a_mismatch_naming_it_not_a_crash()
    {
        // As above, in a checkpoint whose blocks are stacked (scan=True): the per-block name the report gives is not a
        // key of the file, so its shape must come from the stacked tensor.
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 3 };
        using var m = Random(c, 19);
        var tensors = HomeLayouts.BigVision(m.state_dict(), c, "", scan: true);
        tensors["Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel"] = torch.ones(c.Depth, dtype: ScalarType.Float64);
        string path = PathOf("rank-scanned.npz");
        HomeLayouts.SaveNpz(path, tensors);
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var e = Assert.Throws<CheckpointMismatchException>(() => PretrainedCheckpoint.Load(loaded, path));
        var x = Assert.Single(e.Report.Mismatched, x => x.Key.StartsWith("blocks.0.attn.proj.weight (from Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel", StringComparison.Ordinal));
        Assert.Empty(x.Found);      // one block's slice of a [depth] stack: a scalar
    }

    [Fact]
    public async Task A_scanned_stack_with_an_empty_dimension_or_another_depth_is_refused_at_once()
    {
        // A stacked tensor of 10^18 blocks of nothing holds no data, so its size cannot give it away: the layout must
        // refuse it before listing its blocks (it was expanded one block at a time, a hang and then out of memory).
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 3 };
        using var m = Random(c, 22);
        var tensors = HomeLayouts.BigVision(m.state_dict(), c, "", scan: true);
        var members = tensors.ToDictionary(kv => kv.Key, kv => HomeLayouts.Npy(kv.Value));
        members["Transformer/encoderblock/LayerNorm_0/scale"] = HomeLayouts.Npy(torch.empty(0, dtype: ScalarType.Float32), shapeText: "(1000000000000000000, 0)");
        string path = PathOf("deep.npz");
        HomeLayouts.SaveNpz(path, members, compress: false);
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var load = Task.Run(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Same(load, await Task.WhenAny(load, Task.Delay(TimeSpan.FromSeconds(30))));     // not still expanding blocks
        var e = await Assert.ThrowsAsync<CheckpointLayoutException>(() => load);
        Assert.Contains("Transformer/encoderblock/LayerNorm_0/scale", e.Message, StringComparison.Ordinal);

        // Stacks of different depths.
        members["Transformer/encoderblock/LayerNorm_0/scale"] = HomeLayouts.Npy(torch.ones(c.Depth + 1, c.EmbedDim, dtype: ScalarType.Float64));
        HomeLayouts.SaveNpz(path, members, compress: false);
        var deeper = Assert.Throws<CheckpointLayoutException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains("Transformer/encoderblock/LayerNorm_0/scale", deeper.Message, StringComparison.Ordinal);

        // Stacks that agree, of more blocks than the model has: refused before they are split.
        var d = c with { Depth = c.Depth + 1 };
        using var deep = Random(d, 22);
        HomeLayouts.SaveNpz(path, HomeLayouts.BigVision(deep.state_dict(), d, "", scan: true));
        var more = Assert.Throws<CheckpointLayoutException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains($"stacks {d.Depth} blocks, more than the model's {c.Depth}", more.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Two_checkpoint_keys_for_one_model_key_are_refused_naming_both()
    {
        // big_vision's and the original vision_transformer's names for one norm, and a block both stacked and unstacked.
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 3 };
        using var m = Random(c, 23);
        var tensors = HomeLayouts.BigVision(m.state_dict(), c, "");
        var norm = tensors.Keys.Single(k => k.StartsWith("Transformer/encoderblock_0/LayerNorm_", StringComparison.Ordinal) && k.EndsWith("/scale", StringComparison.Ordinal) && !k.Contains("LayerNorm_0", StringComparison.Ordinal));
        string other = norm.Contains("LayerNorm_1", StringComparison.Ordinal) ? norm.Replace("LayerNorm_1", "LayerNorm_2", StringComparison.Ordinal) : norm.Replace("LayerNorm_2", "LayerNorm_1", StringComparison.Ordinal);
        tensors[other] = tensors[norm].neg();
        string path = PathOf("twice.npz");
        HomeLayouts.SaveNpz(path, tensors);
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var e = Assert.Throws<CheckpointLayoutException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains(norm, e.Message, StringComparison.Ordinal);
        Assert.Contains(other, e.Message, StringComparison.Ordinal);

        var stacked = HomeLayouts.BigVision(m.state_dict(), c, "", scan: true);
        stacked["Transformer/encoderblock_0/LayerNorm_0/scale"] = torch.ones(c.EmbedDim, dtype: ScalarType.Float64);
        HomeLayouts.SaveNpz(path, stacked);
        e = Assert.Throws<CheckpointLayoutException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains("Transformer/encoderblock_0/LayerNorm_0/scale", e.Message, StringComparison.Ordinal);
        Assert.Contains("Transformer/encoderblock/LayerNorm_0/scale", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void An_incomplete_qkv_group_reports_the_pieces_it_has()
    {
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0 };
        using var m = Random(c, 20);
        var hf = HomeLayouts.HfSiglip(m.state_dict(), c, textTower: false);
        hf.Remove("vision_model.encoder.layers.0.self_attn.k_proj.weight");
        string path = Save("siglip-no-k.safetensors", hf);
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var report = PretrainedCheckpoint.Load(loaded, path, new PretrainedLoadOptions { Strict = false });
        Assert.Contains("blocks.0.attn.qkv.weight", report.Missing);
        Assert.Contains(report.Unexpected, u => u.StartsWith("vision_model.encoder.layers.0.self_attn.q_proj.weight (its blocks.0.attn.qkv.weight group lacks blocks.0.attn.k.weight)", StringComparison.Ordinal));
        Assert.Contains(report.Unexpected, u => u.StartsWith("vision_model.encoder.layers.0.self_attn.v_proj.weight", StringComparison.Ordinal));
    }

    [Fact]
    public void A_timm_file_loads_its_own_keys_as_loaded_not_converted()
    {
        var c = Classic with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 3 };
        using var m = Random(c, 21);
        string path = Save("timm-map.safetensors", m.state_dict());
        var report = AssertLoadsAs(m, c, path, "timm");
        Assert.Empty(report.Converted);
        Assert.Contains("attn_pool.q.weight", report.Loaded);
    }

    [Fact]
    public void A_recognised_but_incomplete_layout_names_the_missing_keys()
    {
        var c = Classic with { NumClasses = 5 };
        using var m = Random(c, 18);
        var hf = HomeLayouts.HfVit(m.state_dict(), c, classifier: true);
        hf.Remove("vit.encoder.layer.1.attention.attention.key.weight");
        hf.Remove("vit.layernorm.bias");
        string path = Save("hf-incomplete.safetensors", hf);
        using var loaded = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        var before = loaded.state_dict()["blocks.0.attn.qkv.weight"].clone();
        var e = Assert.Throws<CheckpointMismatchException>(() => PretrainedCheckpoint.Load(loaded, path));
        Assert.Contains("blocks.1.attn.qkv.weight", e.Report.Missing);
        Assert.Contains("norm.bias", e.Report.Missing);
        Assert.Contains("Hugging Face ViT", e.Message, StringComparison.Ordinal);
        Assert.True(TensorAssert.Same(before, loaded.state_dict()["blocks.0.attn.qkv.weight"]));   // nothing copied
    }
}
