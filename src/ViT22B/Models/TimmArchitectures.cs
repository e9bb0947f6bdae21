using ViT22B.Data;
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

    // Evaluation preprocessing of each family: what the weights' home library feeds them (see docs/checkpoints.md).
    private static readonly Preprocessing AugReg = new(Preprocessing.Half, Preprocessing.Half, ResizeMode.CenterCrop, 0.9, Resampling.Bicubic);
    private static readonly Preprocessing Deit3 = new(Preprocessing.ImageNetMean, Preprocessing.ImageNetStd, ResizeMode.CenterCrop, 0.9, Resampling.Bicubic);
    private static readonly Preprocessing DinoV2 = new(Preprocessing.ImageNetMean, Preprocessing.ImageNetStd, ResizeMode.CenterCrop, 0.875, Resampling.Bicubic);
    private static readonly Preprocessing ClipFineTuned = new(Preprocessing.OpenAiClipMean, Preprocessing.OpenAiClipStd, ResizeMode.CenterCrop, 0.95, Resampling.Bicubic);
    private static readonly Preprocessing OpenAiClip = new(Preprocessing.OpenAiClipMean, Preprocessing.OpenAiClipStd, ResizeMode.CenterCrop, 1.0, Resampling.Bicubic);
    private static readonly Preprocessing SigLip = new(Preprocessing.Half, Preprocessing.Half, ResizeMode.Squash, 1.0, Resampling.Bicubic);

    /// <summary>Name → config and the evaluation preprocessing its default weights expect.</summary>
    public static readonly IReadOnlyDictionary<string, (ViTConfig Config, Preprocessing Preprocessing)> Configs =
        new Dictionary<string, (ViTConfig, Preprocessing)>(StringComparer.Ordinal)
    {
        // AugReg (timm's default tags for these names): 0.5 / 0.5, bicubic, crop 0.9.
        ["vit_tiny_patch16_224"] = (Vit(192, 12, 3, 768, 16), AugReg),
        ["vit_small_patch16_224"] = (Vit(384, 12, 6, 1536, 16), AugReg),
        ["vit_base_patch16_224"] = (Vit(768, 12, 12, 3072, 16), AugReg),
        ["vit_large_patch16_224"] = (Vit(1024, 24, 16, 4096, 16), AugReg),
        // DeiT-3: LayerScale 1e-6, position embedding over the patches only.
        ["deit3_small_patch16_224"] = (Vit(384, 12, 6, 1536, 16) with { NoEmbedClass = true, InitValues = 1e-6 }, Deit3),
        ["deit3_base_patch16_224"] = (Vit(768, 12, 12, 3072, 16) with { NoEmbedClass = true, InitValues = 1e-6 }, Deit3),
        // DINOv2: patch 14 at 518 px, LayerScale 1e-5, no classifier; "reg4": four register tokens, no prefix slots.
        ["vit_small_patch14_dinov2"] = (Dinov2(384, 12, 6), DinoV2),
        ["vit_base_patch14_dinov2"] = (Dinov2(768, 12, 12), DinoV2),
        ["vit_large_patch14_dinov2"] = (Dinov2(1024, 24, 16), DinoV2),
        ["vit_small_patch14_reg4_dinov2"] = (Dinov2(384, 12, 6) with { RegTokens = 4, NoEmbedClass = true }, DinoV2),
        ["vit_base_patch14_reg4_dinov2"] = (Dinov2(768, 12, 12) with { RegTokens = 4, NoEmbedClass = true }, DinoV2),
        ["vit_large_patch14_reg4_dinov2"] = (Dinov2(1024, 24, 16) with { RegTokens = 4, NoEmbedClass = true }, DinoV2),
        // CLIP image towers: a norm before the blocks (no patch-embedding bias), LayerNorm ε = 1e-5. The plain name's
        // default tag is timm's ImageNet fine-tune (1000 classes, crop 0.95); the QuickGELU name's (metaclip_2pt5b) has a
        // 512-wide projection head.
        ["vit_base_patch16_clip_224"] = (Clip(768, 12, 12, 16), ClipFineTuned),
        ["vit_base_patch16_clip_quickgelu_224"] = (Clip(768, 12, 12, 16) with { Act = Activation.QuickGelu, NumClasses = 512 }, OpenAiClip),
        // SigLIP: no class token, MAP head, no classifier; timm builds these with exact GELU.
        ["vit_base_patch16_siglip_224"] = (Siglip(768, 12, 12, 3072, 16), SigLip),
        ["vit_so400m_patch14_siglip_224"] = (Siglip(1152, 27, 16, 4304, 14), SigLip),
        ["vit_so400m_patch14_siglip_378"] = (Siglip(1152, 27, 16, 4304, 14) with { ImgSize = 378 }, SigLip),
    };
}
