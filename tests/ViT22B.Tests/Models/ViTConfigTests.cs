using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

public class ViTConfigTests
{
    [Theory]
    [InlineData("Ti/16", 192, 12, 768, 3, 16)]
    [InlineData("S/16", 384, 12, 1536, 6, 16)]
    [InlineData("B/16", 768, 12, 3072, 12, 16)]
    [InlineData("L/16", 1024, 24, 4096, 16, 16)]
    [InlineData("H/14", 1280, 32, 5120, 16, 14)]
    [InlineData("g/14", 1408, 40, 6144, 16, 14)]
    [InlineData("G/14", 1664, 48, 8192, 16, 14)]
    [InlineData("e/14", 1792, 56, 15360, 16, 14)]
    [InlineData("22B/14", 6144, 48, 24576, 48, 14)]
    [InlineData("So400m/14", 1152, 27, 4304, 16, 14)]
    [InlineData("So150m/14", 880, 18, 2320, 16, 14)]
    public void Presets_have_the_spec_shapes(string name, int d, int l, int f, int h, int p)
    {
        var c = ViTConfig.Parse(name);
        Assert.Equal((d, l, f, h, p), (c.EmbedDim, c.Depth, c.MlpDim, c.NumHeads, c.PatchSize));
        Assert.Contains(name, ViTConfig.PresetNames);
    }

    [Fact]
    public void Vit22B_preset_is_the_paper_block()
    {
        var c = ViTConfig.Parse("22B/14");
        Assert.Equal(BlockKind.Parallel, c.Block);
        Assert.True(c.QkNorm);
        Assert.False(c.QkvBias);
        Assert.False(c.NormBias);
        Assert.True(c.MlpBias);
        Assert.Equal(GlobalPool.Map, c.GlobalPool);
        Assert.Equal(256, c.NumTokens);
        Assert.Equal(128, c.HeadDim);
    }

    [Theory]
    [InlineData("X/16")]
    [InlineData("B")]
    [InlineData("B/abc")]
    [InlineData("b/16")]
    [InlineData("")]
    public void Unknown_preset_names_are_rejected_with_the_known_list(string name)
    {
        var e = Assert.Throws<ArgumentException>(() => ViTConfig.Parse(name));
        Assert.Contains($"'{name}'", e.Message);
        Assert.Contains("22B/14", e.Message);
    }

    [Fact]
    public void Json_round_trip_preserves_every_knob()
    {
        var c = new ViTConfig
        {
            ImgSize = 64, PatchSize = 8, InChans = 1, EmbedDim = 32, Depth = 3, NumHeads = 4, MlpDim = 50, Block = BlockKind.Sequential,
            QkvBias = true, QkNorm = false, Norm = NormKind.LayerNorm, NormBias = true, MlpBias = false, ProjBias = false,
            FuseOutProj = false, Act = Activation.Gelu, ClassToken = true, NoEmbedClass = true, PreNorm = true, GlobalPool = GlobalPool.Token,
            PosEmbed = PosEmbedKind.SinCos2d, NumClasses = 9, NormEps = 1e-5, DynamicImgSize = true, DType = ScalarType.BFloat16,
        };
        string json = ViTConfigJson.ToJson(c);
        foreach (var key in new[] { "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim", "block", "qkv_bias", "qk_norm",
                     "norm", "norm_bias", "mlp_bias", "proj_bias", "fuse_out_proj", "act", "init_values", "class_token", "global_pool", "pos_embed",
                     "num_classes", "norm_eps" })
            Assert.Contains($"\"{key}\"", json);
        Assert.Equal(c, ViTConfigJson.FromJson(json));
        var scaled = c with { InitValues = 1e-6, Act = Activation.QuickGelu, RegTokens = 4, FcNorm = false };
        string scaledJson = ViTConfigJson.ToJson(scaled);
        Assert.Contains("\"quick_gelu\"", scaledJson);
        Assert.Contains("\"reg_tokens\": 4", scaledJson);
        Assert.Contains("\"fc_norm\": false", scaledJson);
        Assert.Equal(scaled, ViTConfigJson.FromJson(scaledJson));
        foreach (var preset in ViTConfig.PresetNames)
            Assert.Equal(ViTConfig.Parse(preset), ViTConfigJson.FromJson(ViTConfigJson.ToJson(ViTConfig.Parse(preset))));
    }

    [Fact]
    public void Init_values_is_a_positive_number_or_null()
    {
        Assert.Null(ViTConfigJson.FromJson("{\"init_values\": null}").InitValues);
        Assert.Equal(1e-5, ViTConfigJson.FromJson("{\"init_values\": 1e-5}").InitValues);
        Assert.Contains("init_values must be a positive number or null, found 0", Assert.Throws<ArgumentException>(() => ViTConfigJson.FromJson("{\"init_values\": 0}")).Message);
        Assert.Contains("init_values", Assert.Throws<FormatException>(() => ViTConfigJson.FromJson("{\"init_values\": \"small\"}")).Message);
    }

    [Fact]
    public void Json_file_save_and_load()
    {
        string path = Path.Combine(Path.GetTempPath(), $"vit22b-cfg-{Guid.NewGuid():N}.json");
        try
        {
            var c = ViTConfig.Parse("So400m/14");
            ViTConfigJson.Save(c, path);
            Assert.Equal(c, ViTConfigJson.Load(path));
        }
        finally { File.Delete(path); }
    }

    [Theory]
    [InlineData("{\"embed_dim\": 32,", "not valid JSON")]
    [InlineData("[1, 2]", "expected a JSON object")]
    [InlineData("{\"embed_dimm\": 32}", "unknown key 'embed_dimm'")]
    [InlineData("{\"block\": \"diagonal\"}", "key 'block' has unknown value \"diagonal\"")]
    [InlineData("{\"norm\": \"batchnorm\"}", "key 'norm' has unknown value \"batchnorm\"")]
    [InlineData("{\"global_pool\": \"avg\"}", "key 'global_pool' has unknown value \"avg\"")]
    [InlineData("{\"act\": \"relu\"}", "key 'act' has unknown value \"relu\"")]
    [InlineData("{\"pos_embed\": 3}", "key 'pos_embed' has unknown value 3")]
    [InlineData("{\"depth\": \"12\"}", "key 'depth' must be an integer")]
    [InlineData("{\"depth\": 1.5}", "key 'depth' must be an integer")]
    [InlineData("{\"qk_norm\": 1}", "key 'qk_norm' must be true or false")]
    [InlineData("{\"dtype\": \"int8\"}", "key 'dtype' has unknown value \"int8\"")]
    public void Malformed_json_is_rejected_naming_the_key(string json, string expected)
    {
        var e = Assert.Throws<FormatException>(() => ViTConfigJson.FromJson(json, "cfg.json"));
        Assert.Contains(expected, e.Message);
        Assert.Contains("cfg.json", e.Message);
    }

    [Theory]
    [InlineData("{\"embed_dim\": 30, \"num_heads\": 4}", "embed_dim 30 is not divisible by num_heads 4")]
    [InlineData("{\"img_size\": 12, \"patch_size\": 16}", "img_size 12 is smaller than patch_size 16")]
    [InlineData("{\"norm\": \"rmsnorm\", \"norm_bias\": true}", "norm_bias requires norm \"layernorm\"")]
    [InlineData("{\"global_pool\": \"token\", \"class_token\": false}", "global_pool \"token\" requires class_token")]
    [InlineData("{\"embed_dim\": 18, \"num_heads\": 3, \"pos_embed\": \"sincos2d\"}", "divisible by 4")]
    [InlineData("{\"qkv_bias\": true, \"mlp_bias\": false}", "mlp_bias must be true")]
    [InlineData("{\"num_classes\": -1}", "num_classes must be >= 0")]
    public void Inconsistent_values_are_rejected(string json, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => ViTConfigJson.FromJson(json));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void A_parallel_block_built_from_layer_options_refuses_qkv_bias_without_mlp_bias_as_the_config_does()
    {
        var options = new BlockOptions(32, 4, 64) { QkvBias = true, MlpBias = false };
        var e = Assert.Throws<ArgumentException>(() => new ParallelBlock(options, CPU, ScalarType.Float32));
        Assert.Contains("mlp_bias must be true", e.Message);
        using var classic = new SequentialBlock(options, CPU, ScalarType.Float32);   // separate biases: fine
        using var parallel = new ParallelBlock(options with { MlpBias = true }, CPU, ScalarType.Float32);
    }

    [Fact]
    public void Dtype_and_block_names_parse_as_in_json()
    {
        Assert.Equal(ScalarType.BFloat16, ViTConfigJson.ParseDType("bfloat16"));
        Assert.Equal(BlockKind.Sequential, ViTConfigJson.ParseBlock("sequential"));
        Assert.Contains("Unknown dtype 'fp8'", Assert.Throws<FormatException>(() => ViTConfigJson.ParseDType("fp8")).Message);
        Assert.Contains("\"parallel\"", Assert.Throws<FormatException>(() => ViTConfigJson.ParseBlock("diagonal")).Message);
    }

    [Fact]
    public void Missing_config_file_names_the_path()
    {
        var e = Assert.Throws<FileNotFoundException>(() => ViTConfigJson.Load("/nonexistent/dir/cfg.json"));
        Assert.Contains("/nonexistent/dir/cfg.json", e.Message);
    }
}
