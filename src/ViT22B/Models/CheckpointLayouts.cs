using System.Text.RegularExpressions;
using TorchSharp;
using ViT22B.Interop;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>The key layouts <see cref="PretrainedCheckpoint"/> reads, told apart by their keys.</summary>
public enum CheckpointLayout
{
    /// <summary>timm's <c>VisionTransformer</c> state dict, which is also this library's (optionally under an OpenCLIP
    /// <c>visual.trunk.</c> prefix).</summary>
    Timm,
    /// <summary>Hugging Face <c>transformers</c> <c>ViTModel</c> / <c>ViTForImageClassification</c> (<c>vit.</c>).</summary>
    HuggingFaceViT,
    /// <summary>Hugging Face <c>Dinov2Model</c> / <c>Dinov2WithRegistersModel</c> (and their classifiers).</summary>
    HuggingFaceDinov2,
    /// <summary>Hugging Face <c>SiglipVisionModel</c> or the vision tower of <c>SiglipModel</c> (<c>vision_model.</c>).</summary>
    HuggingFaceSiglip,
    /// <summary>Hugging Face <c>CLIPVisionModel</c>, <c>CLIPVisionModelWithProjection</c> or the vision tower of <c>CLIPModel</c>.</summary>
    HuggingFaceClip,
    /// <summary>OpenAI CLIP / OpenCLIP with its own ViT (<c>visual.conv1</c>, <c>visual.transformer.resblocks.N</c>).</summary>
    OpenClip,
    /// <summary>big_vision / Google <c>vision_transformer</c> <c>.npz</c> (<c>Transformer/encoderblock_N/…</c>, optionally
    /// under <c>params/img/</c>, <c>params/</c> or <c>opt/target/</c>; scanned <c>encoderblock</c> stacks too).</summary>
    BigVision,
}

/// <summary>How one model tensor is made from checkpoint tensors.</summary>
/// <param name="Target">The model's state-dict key.</param>
/// <param name="Sources">The checkpoint keys read.</param>
/// <param name="Build">Builds the tensor from a reader of checkpoint keys (also run on meta tensors for the shape).</param>
/// <param name="Changed">False for a tensor copied under its own name.</param>
internal sealed record Recipe(string Target, IReadOnlyList<string> Sources, Func<Func<string, Tensor>, Tensor> Build, bool Changed)
{
    public string Note => Sources.Count == 0 ? "zeros: the checkpoint has no such tensor (as timm's converter)" : "from " + string.Join(" + ", Sources);
}

/// <summary>What a checkpoint's keys map to: recipes for model keys, keys skipped with a reason, keys not understood,
/// and the shape of any recipe's source (for a scanned block's name, its block's slice of the stacked tensor).</summary>
internal sealed record LayoutMap(CheckpointLayout Layout, List<Recipe> Recipes, List<KeyNote> Skipped, List<string> Unknown, Func<string, long[]> SourceShape);

/// <summary>
/// Detects a checkpoint's layout from its keys and maps its tensors to this library's (timm's) keys. The names and
/// tensor layouts come from each home project's source: Hugging Face <c>transformers</c> <c>modeling_vit.py</c>,
/// <c>modeling_dinov2.py</c>, <c>modeling_dinov2_with_registers.py</c>, <c>modeling_siglip.py</c>,
/// <c>modeling_clip.py</c>; timm's <c>_convert_openai_clip</c> and <c>_load_weights</c> (big_vision) in
/// <c>vision_transformer.py</c>. Separate q, k, v projections are fused into <c>qkv</c> (rows q | k | v), the MAP
/// head's key and value into <c>kv</c>, Flax kernels ([in, out], per-head [D, H, d]) transposed and flattened.
/// </summary>
internal static class CheckpointLayouts
{
    private enum Op { Copy, Transpose, ConvHwio, Unsqueeze0, Vector3d, HeadsIn, HeadsBias, HeadsOut }

    private sealed record Rule(Regex Pattern, string Replacement, Op Op);

    private static Rule R(string pattern, string replacement, Op op = Op.Copy) =>
        new(new Regex("^" + pattern + "$", RegexOptions.CultureInvariant), replacement, op);

    private const string WB = "(weight|bias)";

    // What Hugging Face's ViT and DINOv2 share (modeling_vit.py, modeling_dinov2.py): the embeddings, the separate
    // query/key/value projections, the attention output and the final layernorm.
    private static readonly Rule[] HfVitFamily =
    {
        R(@"embeddings\.cls_token", "cls_token"),
        R(@"embeddings\.position_embeddings", "pos_embed"),
        R(@"embeddings\.patch_embeddings\.projection\." + WB, "patch_embed.proj.$1"),
        R(@"encoder\.layer\.(\d+)\.attention\.attention\.query\." + WB, "blocks.$1.attn.q.$2"),
        R(@"encoder\.layer\.(\d+)\.attention\.attention\.key\." + WB, "blocks.$1.attn.k.$2"),
        R(@"encoder\.layer\.(\d+)\.attention\.attention\.value\." + WB, "blocks.$1.attn.v.$2"),
        R(@"encoder\.layer\.(\d+)\.attention\.output\.dense\." + WB, "blocks.$1.attn.proj.$2"),
        R(@"layernorm\." + WB, "norm.$1"),
    };

    private static readonly Rule[] HfVit = HfVitFamily.Concat(new[]
    {
        R(@"encoder\.layer\.(\d+)\.layernorm_before\." + WB, "blocks.$1.norm1.$2"),
        R(@"encoder\.layer\.(\d+)\.layernorm_after\." + WB, "blocks.$1.norm2.$2"),
        R(@"encoder\.layer\.(\d+)\.intermediate\.dense\." + WB, "blocks.$1.mlp.fc1.$2"),
        R(@"encoder\.layer\.(\d+)\.output\.dense\." + WB, "blocks.$1.mlp.fc2.$2"),
        R(@"classifier\." + WB, "head.$1"),
    }).ToArray();

    private static readonly Rule[] HfDinov2 = HfVitFamily.Concat(new[]
    {
        R(@"embeddings\.register_tokens", "reg_token"),
        R(@"encoder\.layer\.(\d+)\.norm1\." + WB, "blocks.$1.norm1.$2"),
        R(@"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", "blocks.$1.ls1.gamma"),
        R(@"encoder\.layer\.(\d+)\.norm2\." + WB, "blocks.$1.norm2.$2"),
        R(@"encoder\.layer\.(\d+)\.mlp\.fc1\." + WB, "blocks.$1.mlp.fc1.$2"),
        R(@"encoder\.layer\.(\d+)\.mlp\.fc2\." + WB, "blocks.$1.mlp.fc2.$2"),
        R(@"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", "blocks.$1.ls2.gamma"),
    }).ToArray();

    // The encoder of SigLIP and CLIP vision towers (modeling_siglip.py, modeling_clip.py).
    private static readonly Rule[] HfEncoder =
    {
        R(@"encoder\.layers\.(\d+)\.layer_norm1\." + WB, "blocks.$1.norm1.$2"),
        R(@"encoder\.layers\.(\d+)\.self_attn\.q_proj\." + WB, "blocks.$1.attn.q.$2"),
        R(@"encoder\.layers\.(\d+)\.self_attn\.k_proj\." + WB, "blocks.$1.attn.k.$2"),
        R(@"encoder\.layers\.(\d+)\.self_attn\.v_proj\." + WB, "blocks.$1.attn.v.$2"),
        R(@"encoder\.layers\.(\d+)\.self_attn\.out_proj\." + WB, "blocks.$1.attn.proj.$2"),
        R(@"encoder\.layers\.(\d+)\.layer_norm2\." + WB, "blocks.$1.norm2.$2"),
        R(@"encoder\.layers\.(\d+)\.mlp\.fc1\." + WB, "blocks.$1.mlp.fc1.$2"),
        R(@"encoder\.layers\.(\d+)\.mlp\.fc2\." + WB, "blocks.$1.mlp.fc2.$2"),
        R(@"post_layernorm\." + WB, "norm.$1"),
    };

    private static readonly Rule[] HfSiglip = HfEncoder.Concat(new[]
    {
        R(@"embeddings\.patch_embedding\." + WB, "patch_embed.proj.$1"),
        R(@"embeddings\.position_embedding\.weight", "pos_embed", Op.Unsqueeze0),
        R(@"head\.probe", "attn_pool.latent"),
        R(@"head\.attention\.in_proj_weight", "attn_pool.in_proj.weight"),
        R(@"head\.attention\.in_proj_bias", "attn_pool.in_proj.bias"),
        R(@"head\.attention\.out_proj\." + WB, "attn_pool.proj.$1"),
        R(@"head\.layernorm\." + WB, "attn_pool.norm.$1"),
        R(@"head\.mlp\.fc1\." + WB, "attn_pool.mlp.fc1.$1"),
        R(@"head\.mlp\.fc2\." + WB, "attn_pool.mlp.fc2.$1"),
    }).ToArray();

    private static readonly Rule[] HfClip = HfEncoder.Concat(new[]
    {
        R(@"embeddings\.class_embedding", "cls_token", Op.Vector3d),
        R(@"embeddings\.patch_embedding\.weight", "patch_embed.proj.weight"),
        R(@"embeddings\.position_embedding\.weight", "pos_embed", Op.Unsqueeze0),
        R(@"pre_layrnorm\." + WB, "norm_pre.$1"),
        R(@"visual_projection\.weight", "head.weight"),
    }).ToArray();

    // timm _convert_openai_clip.
    private static readonly Rule[] OpenClip =
    {
        R(@"conv1\.weight", "patch_embed.proj.weight"),
        R(@"class_embedding", "cls_token", Op.Vector3d),
        R(@"positional_embedding", "pos_embed", Op.Unsqueeze0),
        R(@"ln_pre\." + WB, "norm_pre.$1"),
        R(@"transformer\.resblocks\.(\d+)\.ln_1\." + WB, "blocks.$1.norm1.$2"),
        R(@"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", "blocks.$1.attn.qkv.weight"),
        R(@"transformer\.resblocks\.(\d+)\.attn\.in_proj_bias", "blocks.$1.attn.qkv.bias"),
        R(@"transformer\.resblocks\.(\d+)\.attn\.out_proj\." + WB, "blocks.$1.attn.proj.$2"),
        R(@"transformer\.resblocks\.(\d+)\.ln_2\." + WB, "blocks.$1.norm2.$2"),
        R(@"transformer\.resblocks\.(\d+)\.mlp\.c_fc\." + WB, "blocks.$1.mlp.fc1.$2"),
        R(@"transformer\.resblocks\.(\d+)\.mlp\.c_proj\." + WB, "blocks.$1.mlp.fc2.$2"),
        R(@"ln_post\." + WB, "norm.$1"),
        R(@"proj", "head.weight", Op.Transpose),
    };

    // timm _load_weights: big_vision names (MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0) and the original
    // vision_transformer repository's (MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3).
    private static readonly Rule[] BigVision =
    {
        R(@"embedding/kernel", "patch_embed.proj.weight", Op.ConvHwio),
        R(@"embedding/bias", "patch_embed.proj.bias"),
        R(@"cls", "cls_token"),
        R(@"(?:Transformer/posembed_input/)?pos_embedding", "pos_embed"),
        R(@"Transformer/encoderblock_(\d+)/LayerNorm_0/scale", "blocks.$1.norm1.weight"),
        R(@"Transformer/encoderblock_(\d+)/LayerNorm_0/bias", "blocks.$1.norm1.bias"),
        R(@"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_[01]/(query|key|value)/kernel", "blocks.$1.attn.$2.weight", Op.HeadsIn),
        R(@"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_[01]/(query|key|value)/bias", "blocks.$1.attn.$2.bias", Op.HeadsBias),
        R(@"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_[01]/out/kernel", "blocks.$1.attn.proj.weight", Op.HeadsOut),
        R(@"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_[01]/out/bias", "blocks.$1.attn.proj.bias"),
        R(@"Transformer/encoderblock_(\d+)/LayerNorm_[12]/scale", "blocks.$1.norm2.weight"),
        R(@"Transformer/encoderblock_(\d+)/LayerNorm_[12]/bias", "blocks.$1.norm2.bias"),
        R(@"Transformer/encoderblock_(\d+)/MlpBlock_[03]/Dense_0/kernel", "blocks.$1.mlp.fc1.weight", Op.Transpose),
        R(@"Transformer/encoderblock_(\d+)/MlpBlock_[03]/Dense_0/bias", "blocks.$1.mlp.fc1.bias"),
        R(@"Transformer/encoderblock_(\d+)/MlpBlock_[03]/Dense_1/kernel", "blocks.$1.mlp.fc2.weight", Op.Transpose),
        R(@"Transformer/encoderblock_(\d+)/MlpBlock_[03]/Dense_1/bias", "blocks.$1.mlp.fc2.bias"),
        R(@"Transformer/encoder_norm/scale", "norm.weight"),
        R(@"Transformer/encoder_norm/bias", "norm.bias"),
        R(@"MAPHead_0/probe", "attn_pool.latent"),
        R(@"MAPHead_0/MultiHeadDotProductAttention_0/(query|key|value)/kernel", "attn_pool.$1.weight", Op.HeadsIn),
        R(@"MAPHead_0/MultiHeadDotProductAttention_0/(query|key|value)/bias", "attn_pool.$1.bias", Op.HeadsBias),
        R(@"MAPHead_0/MultiHeadDotProductAttention_0/out/kernel", "attn_pool.proj.weight", Op.HeadsOut),
        R(@"MAPHead_0/MultiHeadDotProductAttention_0/out/bias", "attn_pool.proj.bias"),
        R(@"MAPHead_0/LayerNorm_0/scale", "attn_pool.norm.weight"),
        R(@"MAPHead_0/LayerNorm_0/bias", "attn_pool.norm.bias"),
        R(@"MAPHead_0/MlpBlock_0/Dense_0/kernel", "attn_pool.mlp.fc1.weight", Op.Transpose),
        R(@"MAPHead_0/MlpBlock_0/Dense_0/bias", "attn_pool.mlp.fc1.bias"),
        R(@"MAPHead_0/MlpBlock_0/Dense_1/kernel", "attn_pool.mlp.fc2.weight", Op.Transpose),
        R(@"MAPHead_0/MlpBlock_0/Dense_1/bias", "attn_pool.mlp.fc2.bias"),
        R(@"head/kernel", "head.weight", Op.Transpose),
        R(@"head/bias", "head.bias"),
    };

    /// <summary>The layouts with a sample key of each, for messages.</summary>
    public const string Known = "timm (patch_embed.proj.weight), Hugging Face ViT (embeddings.patch_embeddings.projection.weight + "
        + "encoder.layer.0.layernorm_before), Hugging Face DINOv2 (… + encoder.layer.0.norm1), Hugging Face SigLIP "
        + "(vision_model.embeddings.patch_embedding.weight), Hugging Face CLIP (vision_model.embeddings.class_embedding), "
        + "OpenAI/OpenCLIP (visual.class_embedding), OpenCLIP with a timm trunk (visual.trunk.patch_embed.proj.weight), "
        + "big_vision .npz (embedding/kernel, optionally under params/img/, params/ or opt/target/)";

    /// <summary>The layout and the key prefix of the image tower, or throws naming the first keys seen.</summary>
    public static (CheckpointLayout Layout, string Prefix) Detect(ITensorSource source)
    {
        bool Has(string key) => source.Contains(key);
        foreach (string p in new[] { "visual.trunk.", "module.visual.trunk." })
            if (Has(p + "patch_embed.proj.weight")) return (CheckpointLayout.Timm, p);
        foreach (string p in new[] { "visual.", "module.visual." })
            if (Has(p + "class_embedding") && Has(p + "conv1.weight")) return (CheckpointLayout.OpenClip, p);
        if (Has("vision_model.embeddings.class_embedding")) return (CheckpointLayout.HuggingFaceClip, "vision_model.");
        if (Has("vision_model.embeddings.patch_embedding.weight")) return (CheckpointLayout.HuggingFaceSiglip, "vision_model.");
        string? hf = source.Names.FirstOrDefault(n => n.EndsWith("embeddings.patch_embeddings.projection.weight", StringComparison.Ordinal));
        if (hf is not null)
        {
            string p = hf[..^"embeddings.patch_embeddings.projection.weight".Length];
            if (Has(p + "encoder.layer.0.layernorm_before.weight")) return (CheckpointLayout.HuggingFaceViT, p);
            if (Has(p + "encoder.layer.0.norm1.weight")) return (CheckpointLayout.HuggingFaceDinov2, p);
        }
        foreach (string p in new[] { "", "params/img/", "params/", "opt/target/" })
            if (Has(p + "embedding/kernel")) return (CheckpointLayout.BigVision, p);
        if (Has("patch_embed.proj.weight")) return (CheckpointLayout.Timm, "");
        var first = source.Names.Take(8).ToList();
        throw new CheckpointLayoutException(
            $"Checkpoint '{source.Path}' has no layout this library knows; its first keys are: {(first.Count == 0 ? "(none: the file holds no tensors)" : string.Join(", ", first))}{(source.Names.Count > 8 ? $", … ({source.Names.Count} in all)" : "")}. Known layouts: {Known}.");
    }

    /// <summary>Maps every key of <paramref name="source"/> to this library's keys, for a model of
    /// <paramref name="depth"/> blocks (a scanned big_vision stack of more blocks is refused before it is split).</summary>
    public static LayoutMap Map(ITensorSource source, int depth)
    {
        var (layout, prefix) = Detect(source);
        var skipped = new List<KeyNote>();
        var unknown = new List<string>();
        var renamed = new List<(string Target, string Source, Op Op)>();
        var rules = layout switch
        {
            CheckpointLayout.HuggingFaceViT => HfVit,
            CheckpointLayout.HuggingFaceDinov2 => HfDinov2,
            CheckpointLayout.HuggingFaceSiglip => HfSiglip,
            CheckpointLayout.HuggingFaceClip => HfClip,
            CheckpointLayout.OpenClip => OpenClip,
            CheckpointLayout.BigVision => BigVision,
            _ => null,
        };
        var names = layout == CheckpointLayout.BigVision ? ScannedBlocks.Expand(source, prefix, depth) : null;
        foreach (string name in names?.Keys ?? (IEnumerable<string>)source.Names)
        {
            string? key = KeyInTower(layout, prefix, name);
            string? why = key is null ? SkipOutside(layout, name) : SkipReason(key);
            if (why is not null)
            {
                skipped.Add(new KeyNote(name, why));
                continue;
            }
            if (rules is null)
            {
                // timm's keys, or Meta's DINOv2 layout, which calls the registers 'register_tokens' (timm's _convert_dinov2).
                renamed.Add((key == "register_tokens" ? "reg_token" : key!, name, Op.Copy));
                continue;
            }
            var rule = rules.FirstOrDefault(r => r.Pattern.IsMatch(key!));
            if (rule is null) unknown.Add(name);
            else renamed.Add((rule.Pattern.Replace(key!, rule.Replacement), name, rule.Op));
        }
        Func<string, Func<string, Tensor>, Tensor> readSource = names is null ? (n, read) => read(n) : (n, read) => names[n](read);
        var recipes = Fuse(renamed, readSource, unknown);
        // CLIP's projection has no bias; timm's converter gives its head a zero one.
        if (recipes.Any(r => r.Target == "head.weight") && !recipes.Any(r => r.Target == "head.bias")
            && (layout is CheckpointLayout.OpenClip or CheckpointLayout.HuggingFaceClip || prefix.EndsWith("trunk.", StringComparison.Ordinal)))
        {
            var w = recipes.First(r => r.Target == "head.weight");
            recipes.Add(new Recipe("head.bias", Array.Empty<string>(), read =>
            {
                using var weight = w.Build(read);
                return torch.zeros(weight.shape[0], dtype: weight.dtype, device: weight.device);
            }, true));
        }
        Func<string, long[]> sourceShape = names is null ? source.ShapeOf : n =>
        {
            using var scope = torch.NewDisposeScope();
            return names[n](x => torch.empty(source.ShapeOf(x), dtype: ScalarType.Float32, device: torch.META)).shape;
        };
        return new LayoutMap(layout, recipes, skipped, unknown, sourceShape);
    }

    // The key under the image tower's prefix, the classifier or projection that sits beside the tower, or null.
    private static string? KeyInTower(CheckpointLayout layout, string prefix, string name)
    {
        if (name.StartsWith(prefix, StringComparison.Ordinal)) return name[prefix.Length..];
        return layout switch
        {
            CheckpointLayout.HuggingFaceViT when name.StartsWith("classifier.", StringComparison.Ordinal) => name,
            CheckpointLayout.HuggingFaceClip when name == "visual_projection.weight" => name,
            CheckpointLayout.Timm when prefix.EndsWith("trunk.", StringComparison.Ordinal)
                && name.StartsWith(prefix[..^"trunk.".Length] + "head.proj.", StringComparison.Ordinal) => "head." + name[(prefix.Length - "trunk.".Length + "head.proj.".Length)..],
            _ => null,
        };
    }

    private static string SkipOutside(CheckpointLayout layout, string name) =>
        layout == CheckpointLayout.HuggingFaceDinov2 && name.StartsWith("classifier.", StringComparison.Ordinal)
            ? "the Hugging Face DINOv2 classifier reads [class token, mean patch token] (2D inputs); timm's ViT has no such head"
            : "outside the image tower (text tower, logit scale and the like)";

    private static string? SkipReason(string key) => key switch
    {
        "embeddings.mask_token" => "masked-image-modeling token, not used by a forward pass",
        "mask_token" => "masked-image-modeling token of Meta's DINOv2 layout, not used by a forward pass",
        "embeddings.position_ids" => "index buffer, not a weight",
        _ when key.StartsWith("pooler.", StringComparison.Ordinal) => "ViTModel's pooler (dense + tanh on the class token) is not part of timm's ViT",
        _ when key.StartsWith("pre_logits/", StringComparison.Ordinal) => "big_vision's representation layer, dropped as timm does",
        _ => null,
    };

    private static Tensor Apply(Op op, Tensor t) => op switch
    {
        Op.Copy => t,
        Op.Transpose => t.t(),
        Op.ConvHwio => t.permute(3, 2, 0, 1),
        Op.Unsqueeze0 => t.unsqueeze(0),
        Op.Vector3d => t.reshape(1, 1, -1),
        Op.HeadsIn => t.reshape(t.shape[0], -1).t(),           // [D, H, d] → [H·d, D]
        Op.HeadsBias => t.reshape(-1),                          // [H, d] → [H·d]
        Op.HeadsOut => t.reshape(-1, t.shape[^1]).t(),          // [H, d, D] → [D, H·d]
        _ => throw new ArgumentOutOfRangeException(nameof(op)),
    };

    // Renamed keys → recipes; q/k/v (query/key/value) pieces fused into qkv or the MAP head's kv, the MAP head's
    // in_proj split into q and kv.
    private static List<Recipe> Fuse(List<(string Target, string Source, Op Op)> renamed, Func<string, Func<string, Tensor>, Tensor> readSource, List<string> incomplete)
    {
        Recipe Single(string target, string source, Op op) =>
            new(target, new[] { source }, read => Apply(op, readSource(source, read)), op != Op.Copy || target != source);
        static string Normalize(string target) => target.Replace(".query.", ".q.", StringComparison.Ordinal)
            .Replace(".key.", ".k.", StringComparison.Ordinal).Replace(".value.", ".v.", StringComparison.Ordinal);
        var byTarget = new Dictionary<string, (string Source, Op Op)>(StringComparer.Ordinal);
        foreach (var (t, s, op) in renamed)
        {
            if (byTarget.TryGetValue(Normalize(t), out var first))
                throw new CheckpointLayoutException($"Checkpoint keys '{first.Source}' and '{s}' both map to '{Normalize(t)}'; one of them must go (a file should hold one name for each weight).");
            byTarget[Normalize(t)] = (s, op);
        }
        var recipes = new List<Recipe>();
        var used = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (target, (source, op)) in byTarget)
        {
            if (used.Contains(target)) continue;
            var m = Regex.Match(target, @"^(?<p>blocks\.\d+\.attn|attn_pool)\.(?<w>q|k|v)\.(?<s>weight|bias)$", RegexOptions.CultureInvariant);
            var split = Regex.Match(target, @"^attn_pool\.in_proj\.(?<s>weight|bias)$", RegexOptions.CultureInvariant);
            if (m.Success)
            {
                string p = m.Groups["p"].Value, s = m.Groups["s"].Value;
                string[] parts = p == "attn_pool" && m.Groups["w"].Value == "q" ? new[] { "q" } : p == "attn_pool" ? new[] { "k", "v" } : new[] { "q", "k", "v" };
                string fused = p == "attn_pool" ? (parts.Length == 1 ? $"{p}.q.{s}" : $"{p}.kv.{s}") : $"{p}.qkv.{s}";
                var pieces = parts.Select(x => $"{p}.{x}.{s}").ToArray();
                foreach (string piece in pieces) used.Add(piece);
                if (pieces.Any(x => !byTarget.ContainsKey(x)))
                {
                    // An incomplete group: the pieces present are reported as not loaded, the fused key as missing.
                    string missingParts = string.Join(", ", pieces.Where(x => !byTarget.ContainsKey(x)));
                    foreach (string piece in pieces.Where(byTarget.ContainsKey))
                        incomplete.Add($"{byTarget[piece].Source} (its {fused} group lacks {missingParts})");
                    continue;
                }
                var src = pieces.Select(x => byTarget[x]).ToArray();
                bool changed = !(src.Length == 1 && src[0].Source == fused && src[0].Op == Op.Copy);   // timm's own attn_pool.q
                recipes.Add(new Recipe(fused, src.Select(x => x.Source).ToArray(), read =>
                {
                    using var scope = torch.NewDisposeScope();
                    var t = src.Length == 1 ? Apply(src[0].Op, readSource(src[0].Source, read))
                        : torch.cat(src.Select(x => Apply(x.Op, readSource(x.Source, read))).ToArray(), 0);
                    return t.MoveToOuterDisposeScope();
                }, changed));
            }
            else if (split.Success)
            {
                string s = split.Groups["s"].Value;
                used.Add(target);
                recipes.Add(new Recipe($"attn_pool.q.{s}", new[] { source }, read =>
                {
                    using var scope = torch.NewDisposeScope();
                    var t = readSource(source, read);
                    return t.narrow(0, 0, t.shape[0] / 3).MoveToOuterDisposeScope();
                }, true));
                recipes.Add(new Recipe($"attn_pool.kv.{s}", new[] { source }, read =>
                {
                    using var scope = torch.NewDisposeScope();
                    var t = readSource(source, read);
                    return t.narrow(0, t.shape[0] / 3, t.shape[0] - t.shape[0] / 3).MoveToOuterDisposeScope();
                }, true));
            }
            else
            {
                used.Add(target);
                recipes.Add(Single(target, source, op));
            }
        }
        return recipes;
    }

    /// <summary>big_vision checkpoints saved with <c>scan=True</c> stack the blocks along a leading axis under
    /// <c>Transformer/encoderblock/…</c>; these are presented as per-block names <c>Transformer/encoderblock_N/…</c>.</summary>
    private static class ScannedBlocks
    {
        public static Dictionary<string, Func<Func<string, Tensor>, Tensor>> Expand(ITensorSource source, string prefix, int modelDepth)
        {
            var result = new Dictionary<string, Func<Func<string, Tensor>, Tensor>>(StringComparer.Ordinal);
            string stacked = prefix + "Transformer/encoderblock/", perBlock = prefix + "Transformer/encoderblock_";
            (string Name, long Depth)? first = null;
            void Add(string key, Func<Func<string, Tensor>, Tensor> read)
            {
                if (result.TryAdd(key, read)) return;
                // Only a per-block name can be listed twice: once as a tensor of its own, once as a block of its stack.
                string stackedName = stacked + key[perBlock.Length..].Split('/', 2)[1];
                throw new CheckpointLayoutException($"Checkpoint '{source.Path}': '{key}' is both a tensor of its own and a block of the stacked '{stackedName}'; a file should hold one name for each weight.");
            }
            // The stacked tensors first, checked before any is listed block by block: each holds data (a dimension of 0
            // would let a declared depth of any size cost nothing in the file) and all hold the same number of blocks.
            foreach (string name in source.Names.Where(n => n.StartsWith(stacked, StringComparison.Ordinal)))
            {
                var shape = source.ShapeOf(name);
                if (shape.Length == 0 || shape.Contains(0))
                    throw new CheckpointLayoutException($"Checkpoint '{source.Path}': scanned block tensor '{name}' has shape [{string.Join(", ", shape)}]; expected a leading block axis and no empty dimension.");
                if (first is { } f && f.Depth != shape[0])
                    throw new CheckpointLayoutException($"Checkpoint '{source.Path}': scanned block tensor '{name}' stacks {shape[0]} blocks, '{f.Name}' {f.Depth}; every stacked tensor holds one slice per block.");
                // Blocks beyond the model's could only be unexpected keys; a stack of many is refused before it is split.
                if (shape[0] > modelDepth)
                    throw new CheckpointLayoutException($"Checkpoint '{source.Path}': scanned block tensor '{name}' stacks {shape[0]} blocks, more than the model's {modelDepth}.");
                first ??= (name, shape[0]);
            }
            foreach (string name in source.Names)
            {
                if (!name.StartsWith(stacked, StringComparison.Ordinal))
                {
                    Add(name, read => read(name));
                    continue;
                }
                for (long i = 0; i < first!.Value.Depth; i++)
                {
                    long index = i;
                    Add($"{perBlock}{i}/{name[stacked.Length..]}", read =>
                    {
                        using var all = read(name);
                        return all.select(0, index).clone();
                    });
                }
            }
            return result;
        }
    }
}

/// <summary>A checkpoint's keys match no layout this library knows, or a layout's pieces do not fit together; the
/// message names the file, the keys seen and the layouts known.</summary>
public sealed class CheckpointLayoutException : FormatException
{
    /// <summary>Creates the exception.</summary>
    public CheckpointLayoutException(string message) : base(message) { }
}
