using ViT22B.Layers;

namespace ViT22B.Models;

/// <summary>
/// The architectures timm's <c>timm.create_model(name)</c> builds for the ViT names this library knows, as configs.
/// Read from timm's <c>vision_transformer.py</c> and <c>deit.py</c> (huggingface/pytorch-image-models): the
/// <c>VisionTransformer</c> defaults (qkv and MLP biases, LayerNorm with bias and ε = 1e-6, exact GELU, class token,
/// token pooling), each name's <c>model_args</c>, and, as timm's builder does, the image size and class count of the
/// name's default pretrained tag (DINOv2 at 518 px and SigLIP without a classifier, for example).
/// </summary>
internal static class TimmArchitectures
{
    // timm VisionTransformer defaults with a size.
    private static ViTConfig Vit(int dim, int depth, int heads, int mlp, int patch) => new()
    {
        EmbedDim = dim, Depth = depth, NumHeads = heads, MlpDim = mlp, PatchSize = patch, ImgSize = 224,
        Block = BlockKind.Sequential, QkvBias = true, QkNorm = false, Norm = NormKind.LayerNorm, NormBias = true, NormEps = 1e-6,
        MlpBias = true, ProjBias = true, Act = Activation.Gelu, ClassToken = true, GlobalPool = GlobalPool.Token,
        PosEmbed = PosEmbedKind.Learn, NumClasses = 1000,
    };

    private static ViTConfig Dinov2(int dim, int depth, int heads) =>
        Vit(dim, depth, heads, 4 * dim, 14) with { ImgSize = 518, InitValues = 1e-5, NumClasses = 0 };

    private static ViTConfig Siglip(int dim, int depth, int heads, int mlp, int patch) =>
        Vit(dim, depth, heads, mlp, patch) with { ClassToken = false, GlobalPool = GlobalPool.Map, NumClasses = 0 };

    private static ViTConfig Clip(int dim, int depth, int heads, int patch) =>
        Vit(dim, depth, heads, 4 * dim, patch) with { PreNorm = true, NormEps = 1e-5 };

    /// <summary>Name → config.</summary>
    public static readonly IReadOnlyDictionary<string, ViTConfig> Configs = new Dictionary<string, ViTConfig>(StringComparer.Ordinal)
    {
        ["vit_tiny_patch16_224"] = Vit(192, 12, 3, 768, 16),
        ["vit_small_patch16_224"] = Vit(384, 12, 6, 1536, 16),
        ["vit_base_patch16_224"] = Vit(768, 12, 12, 3072, 16),
        ["vit_large_patch16_224"] = Vit(1024, 24, 16, 4096, 16),
        // DeiT-3: LayerScale 1e-6, position embedding over the patches only.
        ["deit3_small_patch16_224"] = Vit(384, 12, 6, 1536, 16) with { NoEmbedClass = true, InitValues = 1e-6 },
        ["deit3_base_patch16_224"] = Vit(768, 12, 12, 3072, 16) with { NoEmbedClass = true, InitValues = 1e-6 },
        // DINOv2: patch 14 at 518 px, LayerScale 1e-5, no classifier; "reg4": four register tokens, no prefix slots.
        ["vit_small_patch14_dinov2"] = Dinov2(384, 12, 6),
        ["vit_base_patch14_dinov2"] = Dinov2(768, 12, 12),
        ["vit_large_patch14_dinov2"] = Dinov2(1024, 24, 16),
        ["vit_small_patch14_reg4_dinov2"] = Dinov2(384, 12, 6) with { RegTokens = 4, NoEmbedClass = true },
        ["vit_base_patch14_reg4_dinov2"] = Dinov2(768, 12, 12) with { RegTokens = 4, NoEmbedClass = true },
        ["vit_large_patch14_reg4_dinov2"] = Dinov2(1024, 24, 16) with { RegTokens = 4, NoEmbedClass = true },
        // CLIP image towers: a norm before the blocks (no patch-embedding bias), LayerNorm ε = 1e-5. The QuickGELU
        // name's default tag (metaclip_2pt5b) has a 512-wide projection head.
        ["vit_base_patch16_clip_224"] = Clip(768, 12, 12, 16),
        ["vit_base_patch16_clip_quickgelu_224"] = Clip(768, 12, 12, 16) with { Act = Activation.QuickGelu, NumClasses = 512 },
        // SigLIP: no class token, MAP head, no classifier; timm builds these with exact GELU.
        ["vit_base_patch16_siglip_224"] = Siglip(768, 12, 12, 3072, 16),
        ["vit_so400m_patch14_siglip_224"] = Siglip(1152, 27, 16, 4304, 14),
        ["vit_so400m_patch14_siglip_378"] = Siglip(1152, 27, 16, 4304, 14) with { ImgSize = 378 },
    };
}
