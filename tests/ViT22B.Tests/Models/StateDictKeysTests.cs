using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>State-dict keys and shapes equal timm's <c>VisionTransformer</c> for the same options (timm
/// <c>vision_transformer.py</c>, <c>attention_pool.py</c>; docs/model.md#state-dict-keys). D = 16, H = 2 (d = 8), F = 24, P = 4,
/// 16×16 images (16 patches), 2 blocks.</summary>
public class StateDictKeysTests
{
    private static Dictionary<string, long[]> Keys(ViTConfig c)
    {
        using var m = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        return m.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.shape);
    }

    private static void AssertKeys(Dictionary<string, long[]> expected, Dictionary<string, long[]> actual)
    {
        Assert.Equal(expected.Keys.OrderBy(k => k, StringComparer.Ordinal), actual.Keys.OrderBy(k => k, StringComparer.Ordinal));
        foreach (var (k, shape) in expected) Assert.True(shape.SequenceEqual(actual[k]), $"{k}: timm [{string.Join(",", shape)}], ours [{string.Join(",", actual[k])}]");
    }

    private static void AddBlocks(Dictionary<string, long[]> d, int depth, Dictionary<string, long[]> perBlock)
    {
        for (int i = 0; i < depth; i++)
            foreach (var (k, s) in perBlock) d[$"blocks.{i}.{k}"] = s;
    }

    [Fact]
    public void Classic_block_with_class_token_matches_timm_vit_patch16_224()
    {
        var c = TestUtil.Tiny(BlockKind.Sequential) with
        {
            QkvBias = true, QkNorm = false, NormBias = true, ClassToken = true, GlobalPool = GlobalPool.Token, Act = Activation.Gelu,
        };
        var e = new Dictionary<string, long[]>
        {
            ["cls_token"] = new long[] { 1, 1, 16 }, ["pos_embed"] = new long[] { 1, 17, 16 },
            ["patch_embed.proj.weight"] = new long[] { 16, 3, 4, 4 }, ["patch_embed.proj.bias"] = new long[] { 16 },
            ["norm.weight"] = new long[] { 16 }, ["norm.bias"] = new long[] { 16 },
            ["head.weight"] = new long[] { 5, 16 }, ["head.bias"] = new long[] { 5 },
        };
        AddBlocks(e, 2, new()
        {
            ["norm1.weight"] = new long[] { 16 }, ["norm1.bias"] = new long[] { 16 },
            ["attn.qkv.weight"] = new long[] { 48, 16 }, ["attn.qkv.bias"] = new long[] { 48 },
            ["attn.proj.weight"] = new long[] { 16, 16 }, ["attn.proj.bias"] = new long[] { 16 },
            ["norm2.weight"] = new long[] { 16 }, ["norm2.bias"] = new long[] { 16 },
            ["mlp.fc1.weight"] = new long[] { 24, 16 }, ["mlp.fc1.bias"] = new long[] { 24 },
            ["mlp.fc2.weight"] = new long[] { 16, 24 }, ["mlp.fc2.bias"] = new long[] { 16 },
        });
        AssertKeys(e, Keys(c));
    }

    [Fact]
    public void Classic_block_with_qk_norm_and_map_head_matches_timm_siglip_style()
    {
        var c = TestUtil.Tiny(BlockKind.Sequential) with
        {
            QkvBias = true, QkNorm = true, NormBias = true, ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0,
        };
        var e = new Dictionary<string, long[]>
        {
            ["pos_embed"] = new long[] { 1, 16, 16 },
            ["patch_embed.proj.weight"] = new long[] { 16, 3, 4, 4 }, ["patch_embed.proj.bias"] = new long[] { 16 },
            ["norm.weight"] = new long[] { 16 }, ["norm.bias"] = new long[] { 16 },
            ["attn_pool.latent"] = new long[] { 1, 1, 16 },
            ["attn_pool.q.weight"] = new long[] { 16, 16 }, ["attn_pool.q.bias"] = new long[] { 16 },
            ["attn_pool.kv.weight"] = new long[] { 32, 16 }, ["attn_pool.kv.bias"] = new long[] { 32 },
            ["attn_pool.proj.weight"] = new long[] { 16, 16 }, ["attn_pool.proj.bias"] = new long[] { 16 },
            ["attn_pool.norm.weight"] = new long[] { 16 }, ["attn_pool.norm.bias"] = new long[] { 16 },
            ["attn_pool.mlp.fc1.weight"] = new long[] { 24, 16 }, ["attn_pool.mlp.fc1.bias"] = new long[] { 24 },
            ["attn_pool.mlp.fc2.weight"] = new long[] { 16, 24 }, ["attn_pool.mlp.fc2.bias"] = new long[] { 16 },
        };
        AddBlocks(e, 2, new()
        {
            ["norm1.weight"] = new long[] { 16 }, ["norm1.bias"] = new long[] { 16 },
            ["attn.qkv.weight"] = new long[] { 48, 16 }, ["attn.qkv.bias"] = new long[] { 48 },
            ["attn.q_norm.weight"] = new long[] { 8 }, ["attn.q_norm.bias"] = new long[] { 8 },
            ["attn.k_norm.weight"] = new long[] { 8 }, ["attn.k_norm.bias"] = new long[] { 8 },
            ["attn.proj.weight"] = new long[] { 16, 16 }, ["attn.proj.bias"] = new long[] { 16 },
            ["norm2.weight"] = new long[] { 16 }, ["norm2.bias"] = new long[] { 16 },
            ["mlp.fc1.weight"] = new long[] { 24, 16 }, ["mlp.fc1.bias"] = new long[] { 24 },
            ["mlp.fc2.weight"] = new long[] { 16, 24 }, ["mlp.fc2.bias"] = new long[] { 16 },
        });
        AssertKeys(e, Keys(c));
    }

    [Fact]
    public void Parallel_block_matches_timm_vit_patch16_xp_224()
    {
        // timm vit_*_xp_224: ParallelScalingBlock, RmsNorm, qkv_bias=False, qk_norm=True, pre_norm=True,
        // no_embed_class=True, class token, unfused out-projection.
        var c = TestUtil.Tiny(BlockKind.Parallel) with
        {
            Norm = NormKind.RmsNorm, NormBias = false, QkvBias = false, QkNorm = true, PreNorm = true, NoEmbedClass = true,
            ClassToken = true, GlobalPool = GlobalPool.Token, FuseOutProj = false,
        };
        var e = new Dictionary<string, long[]>
        {
            ["cls_token"] = new long[] { 1, 1, 16 }, ["pos_embed"] = new long[] { 1, 16, 16 },
            ["patch_embed.proj.weight"] = new long[] { 16, 3, 4, 4 }, ["norm_pre.weight"] = new long[] { 16 },
            ["norm.weight"] = new long[] { 16 }, ["head.weight"] = new long[] { 5, 16 }, ["head.bias"] = new long[] { 5 },
        };
        AddBlocks(e, 2, new()
        {
            ["in_norm.weight"] = new long[] { 16 }, ["in_proj.weight"] = new long[] { 24 + 48, 16 }, ["mlp_bias"] = new long[] { 24 },
            ["q_norm.weight"] = new long[] { 8 }, ["k_norm.weight"] = new long[] { 8 },
            ["attn_out_proj.weight"] = new long[] { 16, 16 }, ["attn_out_proj.bias"] = new long[] { 16 },
            ["mlp_out_proj.weight"] = new long[] { 16, 24 }, ["mlp_out_proj.bias"] = new long[] { 16 },
        });
        AssertKeys(e, Keys(c));
    }

    [Fact]
    public void Parallel_block_with_qkv_bias_and_gap_matches_timm_pwee_style()
    {
        // timm vit_pwee_*: LayerNorm with bias, qkv_bias=True (in_proj.bias, no mlp_bias), global_pool='avg' (fc_norm).
        var c = TestUtil.Tiny(BlockKind.Parallel) with
        {
            NormBias = true, QkvBias = true, QkNorm = false, GlobalPool = GlobalPool.Gap, FuseOutProj = false, ClassToken = false,
        };
        var e = new Dictionary<string, long[]>
        {
            ["pos_embed"] = new long[] { 1, 16, 16 },
            ["patch_embed.proj.weight"] = new long[] { 16, 3, 4, 4 }, ["patch_embed.proj.bias"] = new long[] { 16 },
            ["fc_norm.weight"] = new long[] { 16 }, ["fc_norm.bias"] = new long[] { 16 },
            ["head.weight"] = new long[] { 5, 16 }, ["head.bias"] = new long[] { 5 },
        };
        AddBlocks(e, 2, new()
        {
            ["in_norm.weight"] = new long[] { 16 }, ["in_norm.bias"] = new long[] { 16 },
            ["in_proj.weight"] = new long[] { 72, 16 }, ["in_proj.bias"] = new long[] { 72 },
            ["attn_out_proj.weight"] = new long[] { 16, 16 }, ["attn_out_proj.bias"] = new long[] { 16 },
            ["mlp_out_proj.weight"] = new long[] { 16, 24 }, ["mlp_out_proj.bias"] = new long[] { 16 },
        });
        AssertKeys(e, Keys(c));
    }

    [Fact]
    public void Fused_vit22b_block_has_one_out_projection_and_no_qkv_or_norm_bias()
    {
        var c = ViTConfig.Parse("22B/14") with { EmbedDim = 16, NumHeads = 2, MlpDim = 24, Depth = 1, ImgSize = 28 };
        var keys = Keys(c);
        Assert.Equal(new long[] { 16, 16 + 24 }, keys["blocks.0.out_proj.weight"]);
        Assert.Equal(new long[] { 16 }, keys["blocks.0.out_proj.bias"]);
        Assert.Equal(new long[] { 24 }, keys["blocks.0.mlp_bias"]);
        Assert.DoesNotContain("blocks.0.in_proj.bias", keys.Keys);
        Assert.DoesNotContain(keys.Keys, k => k.Contains("norm") && k.EndsWith(".bias", StringComparison.Ordinal) && !k.StartsWith("attn_pool.mlp", StringComparison.Ordinal));
    }

    [Fact]
    public void LayerScale_keys_are_timms_and_start_at_init_values()
    {
        // timm Block: ls1, ls2 (LayerScale, parameter gamma [D]); ParallelScalingBlock: one ls after the summed branches.
        var seq = TestUtil.Tiny(BlockKind.Sequential) with { InitValues = 1e-5 };
        var par = TestUtil.Tiny(BlockKind.Parallel) with { InitValues = 1e-5 };
        var seqKeys = Keys(seq);
        var parKeys = Keys(par);
        Assert.Equal(new long[] { seq.EmbedDim }, seqKeys["blocks.0.ls1.gamma"]);
        Assert.Equal(new long[] { seq.EmbedDim }, seqKeys["blocks.0.ls2.gamma"]);
        Assert.Equal(new long[] { par.EmbedDim }, parKeys["blocks.0.ls.gamma"]);
        Assert.DoesNotContain(parKeys.Keys, k => k.Contains(".ls1.") || k.Contains(".ls2."));
        Assert.DoesNotContain(Keys(TestUtil.Tiny(BlockKind.Sequential)).Keys, k => k.Contains("gamma"));
        using var model = new VisionTransformer(seq, torch.CPU, ScalarType.Float64);
        using var scope = torch.NewDisposeScope();
        foreach (var (key, p) in model.named_parameters().Where(p => p.name.EndsWith("gamma", StringComparison.Ordinal)))
            Assert.True(TensorAssert.AllEqual(p, 1e-5), $"{key} is not initialized to init_values");
    }

    [Theory]
    [InlineData(false, 1 + 4 + 16)]
    [InlineData(true, 16)]
    public void Register_tokens_are_timms_reg_token_with_position_slots_unless_no_embed_class(bool noEmbedClass, int slots)
    {
        // timm VisionTransformer: reg_token [1, R, D]; pos_embed covers the prefix tokens unless no_embed_class.
        var c = TestUtil.Tiny(BlockKind.Sequential) with { ClassToken = true, RegTokens = 4, NoEmbedClass = noEmbedClass };
        var keys = Keys(c);
        Assert.Equal(new long[] { 1, 4, c.EmbedDim }, keys["reg_token"]);
        Assert.Equal(new long[] { 1, slots, c.EmbedDim }, keys["pos_embed"]);
        Assert.Equal(16, c.NumPatches);
        Assert.Equal(5, c.NumPrefixTokens);
    }

    [Fact]
    public void Bias_free_variant_has_no_bias_parameters_at_all()
    {
        foreach (var block in new[] { BlockKind.Parallel, BlockKind.Sequential })
        {
            var c = TestUtil.Tiny(block) with
            {
                QkvBias = false, MlpBias = false, ProjBias = false, NormBias = false, PreNorm = true, QkNorm = true,
                GlobalPool = GlobalPool.Gap, NumClasses = 0,
            };
            var keys = Keys(c);
            Assert.DoesNotContain(keys.Keys, k => k.Contains("bias"));
            Assert.Contains(keys.Keys, k => k.EndsWith("q_norm.weight", StringComparison.Ordinal));
        }
    }

    [Fact]
    public void Model_built_inside_a_dispose_scope_keeps_its_parameters()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        long expected;
        using (var outside = new VisionTransformer(c, torch.CPU, ScalarType.Float32)) expected = outside.parameters().Count();
        VisionTransformer inside;
        using (torch.NewDisposeScope()) inside = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        using (inside)
        {
            Assert.Equal(expected, inside.parameters().Count());
            using var scope = torch.NewDisposeScope();
            using var noGrad = torch.no_grad();
            Assert.Equal(new long[] { 1, 5 }, inside.call(torch.zeros(1, 3, 16, 16)).shape);
        }
    }
}
