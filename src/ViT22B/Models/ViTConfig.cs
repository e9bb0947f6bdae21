using TorchSharp;
using ViT22B.Layers;

namespace ViT22B.Models;

/// <summary>How the token sequence becomes one embedding.</summary>
public enum GlobalPool
{
    /// <summary>Multi-head attention pooling with a learned probe (big_vision <c>MAPHead</c>, timm
    /// <c>AttentionPoolLatent</c>), after the final norm.</summary>
    Map,
    /// <summary>Mean over patch tokens, then <c>fc_norm</c> unless <see cref="ViTConfig.FcNorm"/> is false (timm
    /// <c>global_pool='avg'</c>).</summary>
    Gap,
    /// <summary>The final-normed class token.</summary>
    Token,
}

/// <summary>Position embedding kind.</summary>
public enum PosEmbedKind
{
    /// <summary>Learned absolute embedding, parameter <c>pos_embed</c>.</summary>
    Learn,
    /// <summary>Fixed 2-D sine-cosine table, big_vision <c>posemb_sincos_2d</c>: [sin x, cos x, sin y, cos y],
    /// temperature 10,000; no parameters.</summary>
    SinCos2d,
}

/// <summary>
/// Immutable architecture description of a <see cref="VisionTransformer"/>. Every knob is listed in docs/model.md#configuration; the
/// defaults describe a ViT-22B-style model (parallel block, QK-norm, no QKV or norm bias, MAP head) with ViT-B/16
/// shapes. Use <see cref="Parse"/> for named presets and <c>with</c> to change knobs:
/// <code>var cfg = ViTConfig.Parse("So400m/14") with { NumClasses = 1000 };</code>
/// JSON read/write lives in <see cref="ViTConfigJson"/>. Call <see cref="Validate"/> (models do) to get a clear
/// exception for inconsistent values.
/// </summary>
public sealed record ViTConfig
{
    /// <summary>Input image height in pixels, and its width unless <see cref="ImgWidth"/> is set. JSON <c>img_size</c>: a
    /// number, or <c>[height, width]</c> as timm's <c>img_size=(h, w)</c>.</summary>
    public int ImgSize { get; init; } = 224;
    /// <summary>Input image width when it differs from <see cref="ImgSize"/> (non-square images); null = square. Written
    /// to JSON as <c>img_size: [height, width]</c>.</summary>
    public int? ImgWidth { get; init; }
    /// <summary>Patch side in pixels. JSON <c>patch_size</c>.</summary>
    public int PatchSize { get; init; } = 16;
    /// <summary>Input channels. JSON <c>in_chans</c>.</summary>
    public int InChans { get; init; } = 3;
    /// <summary>Width D. JSON <c>embed_dim</c>.</summary>
    public int EmbedDim { get; init; } = 768;
    /// <summary>Number of blocks L. JSON <c>depth</c>.</summary>
    public int Depth { get; init; } = 12;
    /// <summary>Attention heads H (also used by the MAP head). JSON <c>num_heads</c>.</summary>
    public int NumHeads { get; init; } = 12;
    /// <summary>MLP hidden size F (also used by the MAP head's MLP). JSON <c>mlp_dim</c>.</summary>
    public int MlpDim { get; init; } = 3072;
    /// <summary>Block kind. JSON <c>block</c>: "parallel" | "sequential".</summary>
    public BlockKind Block { get; init; } = BlockKind.Parallel;
    /// <summary>Bias on the Q, K, V projections. In a parallel block this is timm's <c>in_proj.bias</c> over
    /// all F+3D rows (then <see cref="MlpBias"/> must be true). JSON <c>qkv_bias</c>.</summary>
    public bool QkvBias { get; init; }
    /// <summary>Normalize queries and keys per head over the head dimension before the dot product.
    /// JSON <c>qk_norm</c>.</summary>
    public bool QkNorm { get; init; } = true;
    /// <summary>Norm kind of every norm in the model. JSON <c>norm</c>: "layernorm" | "rmsnorm".</summary>
    public NormKind Norm { get; init; } = NormKind.LayerNorm;
    /// <summary>Bias (shift) on every norm; LayerNorm only. JSON <c>norm_bias</c>.</summary>
    public bool NormBias { get; init; }
    /// <summary>Biases of the MLP in- and out-projections (parallel block: timm's <c>mlp_bias</c> on the MLP
    /// slice of <c>in_proj</c>, and the MLP part of the out-projection bias). JSON <c>mlp_bias</c>.</summary>
    public bool MlpBias { get; init; } = true;
    /// <summary>Bias of the attention out-projection. JSON <c>proj_bias</c>.</summary>
    public bool ProjBias { get; init; } = true;
    /// <summary>Parallel block: one fused out-projection <c>out_proj</c> [D, D+F] (columns attention | MLP)
    /// instead of timm's default <c>attn_out_proj</c> + <c>mlp_out_proj</c>. JSON <c>fuse_out_proj</c>.</summary>
    public bool FuseOutProj { get; init; } = true;
    /// <summary>MLP activation. JSON <c>act</c>: "gelu" | "gelu_tanh" | "quick_gelu".</summary>
    public Activation Act { get; init; } = Activation.GeluTanh;
    /// <summary>LayerScale's initial value (timm <c>init_values</c>): each residual branch of a classic block is
    /// scaled per channel (<c>ls1.gamma</c>, <c>ls2.gamma</c>), a parallel block's summed branches once
    /// (<c>ls.gamma</c>); null = no LayerScale. JSON <c>init_values</c> (a number or null).</summary>
    public double? InitValues { get; init; }
    /// <summary>Prepend a learned class token. JSON <c>class_token</c>.</summary>
    public bool ClassToken { get; init; }
    /// <summary>Register tokens (Darcet et al. 2023, DINOv2 "reg4"): learned tokens after the class token that take part
    /// in attention and are dropped from the outputs (parameter <c>reg_token</c> [1, R, D]). JSON <c>reg_tokens</c>.</summary>
    public int RegTokens { get; init; }
    /// <summary>With prefix tokens (class, registers) and a learned position embedding: add the embedding to the
    /// patch tokens only (big_vision order, timm <c>no_embed_class=True</c>) instead of giving each prefix token a
    /// slot of its own (timm default). JSON <c>no_embed_class</c>.</summary>
    public bool NoEmbedClass { get; init; }
    /// <summary>timm <c>pre_norm</c>: a norm (<c>norm_pre</c>) after the position embedding, and no patch-embedding
    /// bias. JSON <c>pre_norm</c>.</summary>
    public bool PreNorm { get; init; }
    /// <summary>Pooling head. JSON <c>global_pool</c>: "map" | "gap" | "token".</summary>
    public GlobalPool GlobalPool { get; init; } = GlobalPool.Map;

    /// <summary>Whether the MAP head and average pooling also see the class and register tokens (timm's
    /// <c>pool_include_prefix</c>; default false: they pool the patch tokens only, as timm and big_vision do).</summary>
    public bool PoolIncludePrefix { get; init; }
    /// <summary>timm's <c>fc_norm</c>: true = the final norm comes after pooling (<c>fc_norm</c>, tokens un-normed),
    /// false = before pooling (<c>norm</c>); null = timm's default, after pooling for <see cref="GlobalPool.Gap"/> only.
    /// JSON <c>fc_norm</c> (true, false or null).</summary>
    public bool? FcNorm { get; init; }
    /// <summary>Whether the final norm follows the pooling (<see cref="FcNorm"/> resolved).</summary>
    public bool UsesFcNorm => FcNorm ?? GlobalPool == GlobalPool.Gap;
    /// <summary>Position embedding. JSON <c>pos_embed</c>: "learn" | "sincos2d".</summary>
    public PosEmbedKind PosEmbed { get; init; } = PosEmbedKind.Learn;
    /// <summary>Classifier outputs; 0 = no classifier (the model returns the pooled embedding).
    /// JSON <c>num_classes</c>.</summary>
    public int NumClasses { get; init; }
    /// <summary>Epsilon of every norm. JSON <c>norm_eps</c>.</summary>
    public double NormEps { get; init; } = 1e-6;
    /// <summary>Accept inputs of other sizes (multiples of the patch size): a learned position embedding is
    /// resampled bicubically with antialiasing (timm <c>dynamic_img_size</c>). JSON <c>dynamic_img_size</c>.</summary>
    public bool DynamicImgSize { get; init; }
    /// <summary>Parameter dtype used when a model is built without an explicit dtype. JSON <c>dtype</c>:
    /// "float32" | "bfloat16" | "float16" | "float64".</summary>
    public torch.ScalarType DType { get; init; } = torch.ScalarType.Float32;

    /// <summary>Head dimension d = D / H.</summary>
    public int HeadDim => EmbedDim / NumHeads;
    /// <summary>The input image (height, width) in pixels.</summary>
    public (int Height, int Width) ImageShape => (ImgSize, ImgWidth ?? ImgSize);
    /// <summary>Patch rows: the patch convolution drops a remainder, as timm and big_vision do (So400m/14 at 384 px sees
    /// 27 × 27 patches and ignores the last 6 pixels).</summary>
    public int GridHeight => ImgSize / PatchSize;
    /// <summary>Patch columns (see <see cref="GridHeight"/>).</summary>
    public int GridWidth => (ImgWidth ?? ImgSize) / PatchSize;
    /// <summary>Patch tokens at <see cref="ImageShape"/>.</summary>
    public int NumPatches => GridHeight * GridWidth;
    /// <summary>Tokens before the patch tokens: the class token, then the register tokens.</summary>
    public int NumPrefixTokens => (ClassToken ? 1 : 0) + RegTokens;
    /// <summary>Sequence length the encoder sees at <see cref="ImgSize"/>.</summary>
    public int NumTokens => NumPatches + NumPrefixTokens;

    /// <summary>What the blocks and the MAP head are built from: width, heads, MLP size, biases, norms, activation.</summary>
    public BlockOptions BlockOptions => new(EmbedDim, NumHeads, MlpDim)
    {
        QkvBias = QkvBias, QkNorm = QkNorm, Norm = Norm, NormBias = NormBias, NormEps = NormEps, MlpBias = MlpBias,
        ProjBias = ProjBias, FuseOutProj = FuseOutProj, Act = Act, InitValues = InitValues,
    };

    /// <summary>Throws <see cref="ArgumentException"/> naming the first inconsistent knob.</summary>
    public ViTConfig Validate()
    {
        static void Require(bool ok, string message)
        {
            if (!ok) throw new ArgumentException($"Invalid ViT config: {message}");
        }
        Require(ImgSize > 0 && PatchSize > 0 && InChans > 0, $"img_size ({ImgSize}), patch_size ({PatchSize}) and in_chans ({InChans}) must be positive.");
        Require(EmbedDim > 0 && Depth >= 0 && NumHeads > 0 && MlpDim > 0, $"embed_dim ({EmbedDim}), num_heads ({NumHeads}) and mlp_dim ({MlpDim}) must be positive and depth ({Depth}) non-negative.");
        Require(ImgSize >= PatchSize, $"img_size {ImgSize} is smaller than patch_size {PatchSize}.");
        Require(ImgWidth is null || ImgWidth >= PatchSize, $"image width {ImgWidth} (img_size [height, width]) is smaller than patch_size {PatchSize}.");
        Require(EmbedDim % NumHeads == 0, $"embed_dim {EmbedDim} is not divisible by num_heads {NumHeads}.");
        Require(NumClasses >= 0, $"num_classes must be >= 0, found {NumClasses}.");
        Require(NormEps > 0 && double.IsFinite(NormEps), $"norm_eps must be a positive number, found {NormEps}.");
        Require(InitValues is null || InitValues > 0 && double.IsFinite(InitValues.Value), $"init_values must be a positive number or null, found {InitValues}.");
        Require(!(Norm == NormKind.RmsNorm && NormBias), "norm_bias requires norm \"layernorm\" (RMSNorm has no bias).");
        Require(!(GlobalPool == GlobalPool.Token && !ClassToken), "global_pool \"token\" requires class_token = true.");
        Require(RegTokens >= 0, $"reg_tokens must be >= 0, found {RegTokens}.");
        Require(Block != BlockKind.Parallel || new FusedLayout(EmbedDim, MlpDim, QkvBias, MlpBias, ProjBias, FuseOutProj).ParallelBiasesAgree,
            FusedLayout.ParallelBiasRule);
        Require(PosEmbed != PosEmbedKind.SinCos2d || EmbedDim % 4 == 0, $"pos_embed \"sincos2d\" needs embed_dim divisible by 4, found {EmbedDim}.");
        Require(PosEmbed != PosEmbedKind.SinCos2d || EmbedDim >= 8, $"pos_embed \"sincos2d\" needs embed_dim >= 8, found {EmbedDim}.");
        Require(DType is torch.ScalarType.Float32 or torch.ScalarType.BFloat16 or torch.ScalarType.Float16 or torch.ScalarType.Float64,
            $"dtype must be float32, bfloat16, float16 or float64, found {DType}.");
        return this;
    }

    // Shapes: big_vision decode_variant (arXiv:2106.04560 Table 2) for Ti..e; ViT-22B Table 1 (arXiv:2302.05442);
    // SoViT §4.1 / App. B.2 (arXiv:2305.13035). See docs/model.md#presets.
    private static readonly (string Name, int D, int L, int F, int H, Family Family)[] Sizes =
    {
        ("Ti", 192, 12, 768, 3, Family.Timm),
        ("S", 384, 12, 1536, 6, Family.Timm),
        ("B", 768, 12, 3072, 12, Family.Timm),
        ("L", 1024, 24, 4096, 16, Family.Timm),
        ("H", 1280, 32, 5120, 16, Family.Timm),
        ("g", 1408, 40, 6144, 16, Family.BigVision),
        ("G", 1664, 48, 8192, 16, Family.BigVision),
        ("e", 1792, 56, 15360, 16, Family.BigVision),
        ("22B", 6144, 48, 24576, 48, Family.Vit22B),
        ("So400m", 1152, 27, 4304, 16, Family.BigVision),
        ("So150m", 880, 18, 2320, 16, Family.BigVision),
    };

    private enum Family { Timm, BigVision, Vit22B }

    /// <summary>The preset names with their canonical patch size: Ti/16 … 22B/14, So400m/14, So150m/14.</summary>
    public static IReadOnlyList<string> PresetNames { get; } =
        Sizes.Select(s => $"{s.Name}/{(s.Name is "Ti" or "S" or "B" or "L" ? 16 : 14)}").ToArray();

    /// <summary>
    /// Parses a preset such as <c>"B/16"</c>, <c>"22B/14"</c> or <c>"So400m/14"</c> (size names are
    /// case-sensitive, as in big_vision: "g" and "G" differ; any positive patch size that divides 224 is accepted).
    /// Ti…H follow timm's <c>vit_*_patch*_224</c> (classic block, biases, LayerNorm with bias, class token,
    /// token pooling, exact GELU, 1000 classes). g, G, e, So400m, So150m follow big_vision (classic block, biases,
    /// no class token, MAP head, tanh-GELU, no classifier). 22B is the ViT-22B block: parallel, QK-norm, no QKV
    /// bias, scale-only RMSNorm ("without bias and centering"), MLP biases, fused projections, MAP head.
    /// </summary>
    /// <exception cref="ArgumentException">Unknown size name or malformed string.</exception>
    public static ViTConfig Parse(string preset)
    {
        ArgumentNullException.ThrowIfNull(preset);
        string known = string.Join(", ", PresetNames);
        var parts = preset.Trim().Split('/');
        if (parts.Length != 2 || !int.TryParse(parts[1], out int patch) || patch <= 0)
            throw new ArgumentException($"Unknown ViT preset '{preset}': expected <size>/<patch>, one of {known}.", nameof(preset));
        int i = Array.FindIndex(Sizes, s => s.Name == parts[0]);
        if (i < 0)
            throw new ArgumentException($"Unknown ViT preset '{preset}': size '{parts[0]}' is not one of {string.Join(", ", Sizes.Select(s => s.Name))} (known presets: {known}).", nameof(preset));
        var (_, d, l, f, h, family) = Sizes[i];
        var shape = new ViTConfig { EmbedDim = d, Depth = l, MlpDim = f, NumHeads = h, PatchSize = patch, ImgSize = 224 };
        var cfg = family switch
        {
            Family.Timm => shape with
            {
                Block = BlockKind.Sequential, QkvBias = true, QkNorm = false, Norm = NormKind.LayerNorm, NormBias = true,
                MlpBias = true, ProjBias = true, Act = Activation.Gelu, ClassToken = true, GlobalPool = GlobalPool.Token,
                NumClasses = 1000,
            },
            Family.BigVision => shape with
            {
                Block = BlockKind.Sequential, QkvBias = true, QkNorm = false, Norm = NormKind.LayerNorm, NormBias = true,
                MlpBias = true, ProjBias = true, Act = Activation.GeluTanh, ClassToken = false, GlobalPool = GlobalPool.Map,
            },
            _ => shape with
            {
                Block = BlockKind.Parallel, QkvBias = false, QkNorm = true, Norm = NormKind.RmsNorm, NormBias = false,
                MlpBias = true, ProjBias = true, FuseOutProj = true, Act = Activation.GeluTanh, ClassToken = false,
                GlobalPool = GlobalPool.Map,
            },
        };
        if (224 % patch != 0)
            throw new ArgumentException($"ViT preset '{preset}': patch size {patch} does not divide the preset image size 224; set ImgSize with 'with {{ ImgSize = … }}' after parsing a supported patch size.", nameof(preset));
        return cfg.Validate();
    }

    /// <summary>The timm model names <see cref="FromTimm"/> knows.</summary>
    public static IReadOnlyList<string> TimmNames { get; } = TimmArchitectures.Configs.Keys.ToArray();

    /// <summary>
    /// The architecture timm builds for <paramref name="name"/> (<c>timm.create_model(name)</c> without weights), e.g.
    /// <c>"vit_so400m_patch14_siglip_224"</c>, <c>"vit_base_patch14_reg4_dinov2"</c> or <c>"deit3_base_patch16_224"</c>:
    /// the same shapes, options and state-dict keys, the image size and class count of the name's default pretrained
    /// tag (DINOv2 at 518 px without a classifier; SigLIP without a classifier). Change them with <c>with</c>.
    /// </summary>
    /// <exception cref="ArgumentException">A name this library does not know (the message lists the known ones).</exception>
    public static ViTConfig FromTimm(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return TimmArchitectures.Configs.TryGetValue(name.Trim(), out var c) ? c.Config.Validate()
            : throw new ArgumentException($"Unknown timm model '{name}'; known: {string.Join(", ", TimmNames)}.", nameof(name));
    }

    /// <summary>
    /// The evaluation preprocessing the weights of <paramref name="name"/> expect, as their home library feeds them:
    /// AugReg ViTs 0.5 / 0.5 with a 0.9 center crop; DeiT-3 ImageNet statistics, crop 0.9; DINOv2 ImageNet statistics,
    /// crop 0.875 (DINOv2's evaluation transform); CLIP OpenAI's statistics, bicubic, center crop (0.95 for timm's
    /// ImageNet fine-tune, 1.0 for the QuickGELU tower); SigLIP 0.5 / 0.5 squashed to the square size (OpenCLIP, Hugging Face; big_vision squashes
    /// with a bilinear filter). All bicubic. docs/checkpoints.md lists where timm's own defaults differ.
    /// </summary>
    /// <exception cref="ArgumentException">A name this library does not know.</exception>
    public static Data.Preprocessing TimmPreprocessing(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return TimmArchitectures.Configs.TryGetValue(name.Trim(), out var c) ? c.Preprocessing
            : throw new ArgumentException($"Unknown timm model '{name}'; known: {string.Join(", ", TimmNames)}.", nameof(name));
    }
}
