using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>
/// Writes a timm-layout state dict in the layouts of other projects, key by key from those projects' sources (written
/// for the tests, independently of the library's converter):
/// Hugging Face transformers <c>models/vit/modeling_vit.py</c> (ViTEmbeddings, ViTSelfAttention query/key/value,
/// ViTSelfOutput dense, ViTIntermediate, ViTOutput, layernorm_before/after, classifier), <c>models/dinov2/modeling_dinov2.py</c>
/// and <c>models/dinov2_with_registers/modeling_dinov2_with_registers.py</c> (norm1/norm2, layer_scale1/2.lambda1,
/// mlp.fc1/fc2, register_tokens, mask_token [1, D], position_embeddings with one class slot and none for registers),
/// <c>models/siglip/modeling_siglip.py</c> (vision_model.embeddings.patch_embedding / position_embedding [N, D],
/// encoder.layers.N.self_attn.q_proj…, post_layernorm, head.probe / attention.in_proj_weight (rows q | k | v) /
/// out_proj / layernorm / mlp), <c>models/clip/modeling_clip.py</c> (class_embedding [D], patch_embedding without
/// bias, position_embedding [N+1, D], pre_layrnorm, visual_projection [P, D] without bias); OpenAI CLIP's
/// <c>model.py</c> VisionTransformer (visual.conv1, class_embedding, positional_embedding, ln_pre,
/// transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj [D, P]);
/// big_vision <c>models/vit.py</c> (embedding/kernel HWIO, cls, pos_embedding without a class slot,
/// Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value}/kernel [D, H, d], out/kernel
/// [H, d, D], LayerNorm_1, MlpBlock_0/Dense_0|1/kernel [in, out]}, encoder_norm, MAPHead_0, head/kernel [D, C]).
/// </summary>
internal static class HomeLayouts
{
    private static Tensor Row(Tensor t, int part, int parts)
    {
        using var rows = t.narrow(0, t.shape[0] / parts * part, t.shape[0] / parts);   // reachable until clone returns (docs/torchsharp-notes.md)
        return rows.clone();
    }

    private static IEnumerable<int> Blocks(ViTConfig c) => Enumerable.Range(0, c.Depth);

    // ViTSelfAttention's separate query/key/value and ViTSelfOutput's dense, as HF ViT and DINOv2 both name them.
    private static void HfViTAttention(Dictionary<string, Tensor> o, string h, string b, string s, IDictionary<string, Tensor> sd)
    {
        o[$"{h}attention.attention.query.{s}"] = Row(sd[$"{b}attn.qkv.{s}"], 0, 3);
        o[$"{h}attention.attention.key.{s}"] = Row(sd[$"{b}attn.qkv.{s}"], 1, 3);
        o[$"{h}attention.attention.value.{s}"] = Row(sd[$"{b}attn.qkv.{s}"], 2, 3);
        o[$"{h}attention.output.dense.{s}"] = sd[$"{b}attn.proj.{s}"];
    }

    /// <summary>HF ViTForImageClassification (prefix "vit.", classifier) or ViTModel (no prefix, pooler).</summary>
    public static Dictionary<string, Tensor> HfVit(IDictionary<string, Tensor> sd, ViTConfig c, bool classifier)
    {
        string p = classifier ? "vit." : "";
        var o = new Dictionary<string, Tensor>
        {
            [p + "embeddings.cls_token"] = sd["cls_token"],
            [p + "embeddings.position_embeddings"] = sd["pos_embed"],
            [p + "embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"],
            [p + "embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"],
            [p + "layernorm.weight"] = sd["norm.weight"], [p + "layernorm.bias"] = sd["norm.bias"],
        };
        foreach (int i in Blocks(c))
        {
            string h = $"{p}encoder.layer.{i}.", b = $"blocks.{i}.";
            foreach (string s in new[] { "weight", "bias" })
            {
                o[$"{h}layernorm_before.{s}"] = sd[$"{b}norm1.{s}"];
                HfViTAttention(o, h, b, s, sd);
                o[$"{h}layernorm_after.{s}"] = sd[$"{b}norm2.{s}"];
                o[$"{h}intermediate.dense.{s}"] = sd[$"{b}mlp.fc1.{s}"];
                o[$"{h}output.dense.{s}"] = sd[$"{b}mlp.fc2.{s}"];
            }
        }
        if (classifier)
        {
            o["classifier.weight"] = sd["head.weight"];
            o["classifier.bias"] = sd["head.bias"];
        }
        else
        {
            o["pooler.dense.weight"] = torch.ones(c.EmbedDim, c.EmbedDim, dtype: sd["norm.weight"].dtype);
            o["pooler.dense.bias"] = torch.zeros(c.EmbedDim, dtype: sd["norm.weight"].dtype);
        }
        return o;
    }

    /// <summary>HF Dinov2Model, or Dinov2WithRegistersModel when the config has registers. With registers HF keeps one
    /// class slot in position_embeddings (the timm model has none): <paramref name="classSlot"/> goes there and is
    /// taken off the class token, so the HF model computes what the timm one does.</summary>
    public static Dictionary<string, Tensor> HfDinov2(IDictionary<string, Tensor> sd, ViTConfig c, Tensor? classSlot = null)
    {
        var o = new Dictionary<string, Tensor>
        {
            ["embeddings.mask_token"] = torch.zeros(1, c.EmbedDim, dtype: sd["cls_token"].dtype),
            ["embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"],
            ["embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"],
            ["layernorm.weight"] = sd["norm.weight"], ["layernorm.bias"] = sd["norm.bias"],
        };
        if (c.RegTokens > 0)
        {
            var slot = classSlot ?? torch.zeros(1, 1, c.EmbedDim, dtype: sd["cls_token"].dtype);
            o["embeddings.cls_token"] = sd["cls_token"] - slot;
            o["embeddings.position_embeddings"] = torch.cat(new[] { slot, sd["pos_embed"] }, 1);
            GC.KeepAlive(slot);   // possibly a caller's temporary: reachable until cat returns (docs/torchsharp-notes.md)
            o["embeddings.register_tokens"] = sd["reg_token"];
        }
        else
        {
            o["embeddings.cls_token"] = sd["cls_token"];
            o["embeddings.position_embeddings"] = sd["pos_embed"];
        }
        foreach (int i in Blocks(c))
        {
            string h = $"encoder.layer.{i}.", b = $"blocks.{i}.";
            foreach (string s in new[] { "weight", "bias" })
            {
                o[$"{h}norm1.{s}"] = sd[$"{b}norm1.{s}"];
                HfViTAttention(o, h, b, s, sd);
                o[$"{h}norm2.{s}"] = sd[$"{b}norm2.{s}"];
                o[$"{h}mlp.fc1.{s}"] = sd[$"{b}mlp.fc1.{s}"];
                o[$"{h}mlp.fc2.{s}"] = sd[$"{b}mlp.fc2.{s}"];
            }
            o[$"{h}layer_scale1.lambda1"] = sd[$"{b}ls1.gamma"];
            o[$"{h}layer_scale2.lambda1"] = sd[$"{b}ls2.gamma"];
        }
        return o;
    }

    private static void HfEncoder(Dictionary<string, Tensor> o, IDictionary<string, Tensor> sd, ViTConfig c)
    {
        foreach (int i in Blocks(c))
        {
            string h = $"vision_model.encoder.layers.{i}.", b = $"blocks.{i}.";
            foreach (string s in new[] { "weight", "bias" })
            {
                o[$"{h}layer_norm1.{s}"] = sd[$"{b}norm1.{s}"];
                o[$"{h}self_attn.q_proj.{s}"] = Row(sd[$"{b}attn.qkv.{s}"], 0, 3);
                o[$"{h}self_attn.k_proj.{s}"] = Row(sd[$"{b}attn.qkv.{s}"], 1, 3);
                o[$"{h}self_attn.v_proj.{s}"] = Row(sd[$"{b}attn.qkv.{s}"], 2, 3);
                o[$"{h}self_attn.out_proj.{s}"] = sd[$"{b}attn.proj.{s}"];
                o[$"{h}layer_norm2.{s}"] = sd[$"{b}norm2.{s}"];
                o[$"{h}mlp.fc1.{s}"] = sd[$"{b}mlp.fc1.{s}"];
                o[$"{h}mlp.fc2.{s}"] = sd[$"{b}mlp.fc2.{s}"];
            }
        }
        o["vision_model.post_layernorm.weight"] = sd["norm.weight"];
        o["vision_model.post_layernorm.bias"] = sd["norm.bias"];
    }

    /// <summary>HF SiglipVisionModel (or, with <paramref name="textTower"/>, SiglipModel with a small text tower and
    /// logit scale/bias).</summary>
    public static Dictionary<string, Tensor> HfSiglip(IDictionary<string, Tensor> sd, ViTConfig c, bool textTower)
    {
        var o = new Dictionary<string, Tensor>
        {
            ["vision_model.embeddings.patch_embedding.weight"] = sd["patch_embed.proj.weight"],
            ["vision_model.embeddings.patch_embedding.bias"] = sd["patch_embed.proj.bias"],
            ["vision_model.embeddings.position_embedding.weight"] = sd["pos_embed"].squeeze(0),
            ["vision_model.head.probe"] = sd["attn_pool.latent"],
            ["vision_model.head.attention.in_proj_weight"] = torch.cat(new[] { sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"] }, 0),
            ["vision_model.head.attention.in_proj_bias"] = torch.cat(new[] { sd["attn_pool.q.bias"], sd["attn_pool.kv.bias"] }, 0),
            ["vision_model.head.attention.out_proj.weight"] = sd["attn_pool.proj.weight"],
            ["vision_model.head.attention.out_proj.bias"] = sd["attn_pool.proj.bias"],
            ["vision_model.head.layernorm.weight"] = sd["attn_pool.norm.weight"],
            ["vision_model.head.layernorm.bias"] = sd["attn_pool.norm.bias"],
            ["vision_model.head.mlp.fc1.weight"] = sd["attn_pool.mlp.fc1.weight"],
            ["vision_model.head.mlp.fc1.bias"] = sd["attn_pool.mlp.fc1.bias"],
            ["vision_model.head.mlp.fc2.weight"] = sd["attn_pool.mlp.fc2.weight"],
            ["vision_model.head.mlp.fc2.bias"] = sd["attn_pool.mlp.fc2.bias"],
        };
        HfEncoder(o, sd, c);
        if (textTower)
        {
            var dt = sd["pos_embed"].dtype;
            o["text_model.embeddings.token_embedding.weight"] = torch.ones(7, c.EmbedDim, dtype: dt);
            o["text_model.final_layer_norm.weight"] = torch.ones(c.EmbedDim, dtype: dt);
            o["logit_scale"] = torch.ones(1, dtype: dt);
            o["logit_bias"] = torch.zeros(1, dtype: dt);
        }
        return o;
    }

    /// <summary>HF CLIPVisionModel, or CLIPVisionModelWithProjection when the config has a classifier (timm's head is
    /// the projection, with a zero bias).</summary>
    public static Dictionary<string, Tensor> HfClip(IDictionary<string, Tensor> sd, ViTConfig c, bool projection)
    {
        var o = new Dictionary<string, Tensor>
        {
            ["vision_model.embeddings.class_embedding"] = sd["cls_token"].reshape(-1),
            ["vision_model.embeddings.patch_embedding.weight"] = sd["patch_embed.proj.weight"],
            ["vision_model.embeddings.position_embedding.weight"] = sd["pos_embed"].squeeze(0),
            ["vision_model.pre_layrnorm.weight"] = sd["norm_pre.weight"],
            ["vision_model.pre_layrnorm.bias"] = sd["norm_pre.bias"],
        };
        HfEncoder(o, sd, c);
        if (projection) o["visual_projection.weight"] = sd["head.weight"];
        return o;
    }

    /// <summary>OpenAI CLIP / OpenCLIP's own ViT under "visual.", with a text tower beside it.</summary>
    public static Dictionary<string, Tensor> OpenClip(IDictionary<string, Tensor> sd, ViTConfig c)
    {
        var dt = sd["pos_embed"].dtype;
        using var proj = sd["head.weight"].t();   // reachable until contiguous returns (docs/torchsharp-notes.md)
        var o = new Dictionary<string, Tensor>
        {
            ["visual.conv1.weight"] = sd["patch_embed.proj.weight"],
            ["visual.class_embedding"] = sd["cls_token"].reshape(-1),
            ["visual.positional_embedding"] = sd["pos_embed"].squeeze(0),
            ["visual.ln_pre.weight"] = sd["norm_pre.weight"], ["visual.ln_pre.bias"] = sd["norm_pre.bias"],
            ["visual.ln_post.weight"] = sd["norm.weight"], ["visual.ln_post.bias"] = sd["norm.bias"],
            ["visual.proj"] = proj.contiguous(),
            ["positional_embedding"] = torch.ones(5, c.EmbedDim, dtype: dt),
            ["token_embedding.weight"] = torch.ones(7, c.EmbedDim, dtype: dt),
            ["text_projection"] = torch.ones(c.EmbedDim, 4, dtype: dt),
            ["logit_scale"] = torch.ones(Array.Empty<long>(), dtype: dt),
        };
        foreach (int i in Blocks(c))
        {
            string h = $"visual.transformer.resblocks.{i}.", b = $"blocks.{i}.";
            o[$"{h}attn.in_proj_weight"] = sd[$"{b}attn.qkv.weight"];
            o[$"{h}attn.in_proj_bias"] = sd[$"{b}attn.qkv.bias"];
            foreach (string s in new[] { "weight", "bias" })
            {
                o[$"{h}ln_1.{s}"] = sd[$"{b}norm1.{s}"];
                o[$"{h}attn.out_proj.{s}"] = sd[$"{b}attn.proj.{s}"];
                o[$"{h}ln_2.{s}"] = sd[$"{b}norm2.{s}"];
                o[$"{h}mlp.c_fc.{s}"] = sd[$"{b}mlp.fc1.{s}"];
                o[$"{h}mlp.c_proj.{s}"] = sd[$"{b}mlp.fc2.{s}"];
            }
        }
        return o;
    }

    /// <summary>big_vision's param tree flattened with "/" (as its .npz checkpoints are), under <paramref name="prefix"/>.
    /// big_vision's pos_embedding has no class slot: the timm model must give prefix tokens none
    /// (<see cref="ViTConfig.NoEmbedClass"/>) or have no class token. With <paramref name="scan"/>, the blocks are
    /// stacked along a leading axis under Transformer/encoderblock/ (big_vision's scan=True).</summary>
    public static Dictionary<string, Tensor> BigVision(IDictionary<string, Tensor> sd, ViTConfig c, string prefix, bool scan = false)
    {
        using var scope = torch.NewDisposeScope();   // keeps the temporaries (Row's copies that In and Bias take among them) reachable through each native call
        long d = c.EmbedDim, h = c.NumHeads, hd = d / h;
        Tensor In(Tensor w) => w.t().reshape(d, h, hd).contiguous();          // [H·d, D] → [D, H, d]
        Tensor Bias(Tensor b) => b.reshape(h, hd).contiguous();
        Tensor Out(Tensor w) => w.t().reshape(h, hd, d).contiguous();         // [D, H·d] → [H, d, D]
        var o = new Dictionary<string, Tensor>
        {
            ["embedding/kernel"] = sd["patch_embed.proj.weight"].permute(2, 3, 1, 0).contiguous(),   // OIHW → HWIO
            ["embedding/bias"] = sd["patch_embed.proj.bias"],
            ["pos_embedding"] = sd["pos_embed"],
            ["Transformer/encoder_norm/scale"] = sd["norm.weight"], ["Transformer/encoder_norm/bias"] = sd["norm.bias"],
        };
        if (c.ClassToken) o["cls"] = sd["cls_token"];
        var blocks = new List<Dictionary<string, Tensor>>();
        foreach (int i in Blocks(c))
        {
            string b = $"blocks.{i}.";
            var qkv = sd[$"{b}attn.qkv.weight"];
            var qkvb = sd[$"{b}attn.qkv.bias"];
            blocks.Add(new Dictionary<string, Tensor>
            {
                ["LayerNorm_0/scale"] = sd[$"{b}norm1.weight"], ["LayerNorm_0/bias"] = sd[$"{b}norm1.bias"],
                ["MultiHeadDotProductAttention_0/query/kernel"] = In(Row(qkv, 0, 3)),
                ["MultiHeadDotProductAttention_0/key/kernel"] = In(Row(qkv, 1, 3)),
                ["MultiHeadDotProductAttention_0/value/kernel"] = In(Row(qkv, 2, 3)),
                ["MultiHeadDotProductAttention_0/query/bias"] = Bias(Row(qkvb, 0, 3)),
                ["MultiHeadDotProductAttention_0/key/bias"] = Bias(Row(qkvb, 1, 3)),
                ["MultiHeadDotProductAttention_0/value/bias"] = Bias(Row(qkvb, 2, 3)),
                ["MultiHeadDotProductAttention_0/out/kernel"] = Out(sd[$"{b}attn.proj.weight"]),
                ["MultiHeadDotProductAttention_0/out/bias"] = sd[$"{b}attn.proj.bias"],
                ["LayerNorm_1/scale"] = sd[$"{b}norm2.weight"], ["LayerNorm_1/bias"] = sd[$"{b}norm2.bias"],
                ["MlpBlock_0/Dense_0/kernel"] = sd[$"{b}mlp.fc1.weight"].t().contiguous(),
                ["MlpBlock_0/Dense_0/bias"] = sd[$"{b}mlp.fc1.bias"],
                ["MlpBlock_0/Dense_1/kernel"] = sd[$"{b}mlp.fc2.weight"].t().contiguous(),
                ["MlpBlock_0/Dense_1/bias"] = sd[$"{b}mlp.fc2.bias"],
            });
        }
        if (scan)
            foreach (string k in blocks[0].Keys) o[$"Transformer/encoderblock/{k}"] = torch.stack(blocks.Select(x => x[k]).ToArray(), 0);
        else
            for (int i = 0; i < blocks.Count; i++)
                foreach (var (k, v) in blocks[i]) o[$"Transformer/encoderblock_{i}/{k}"] = v;
        if (c.GlobalPool == GlobalPool.Map)
        {
            string m = "MAPHead_0/";
            var kv = sd["attn_pool.kv.weight"];
            var kvb = sd["attn_pool.kv.bias"];
            o[m + "probe"] = sd["attn_pool.latent"];
            o[m + "MultiHeadDotProductAttention_0/query/kernel"] = In(sd["attn_pool.q.weight"]);
            o[m + "MultiHeadDotProductAttention_0/query/bias"] = Bias(sd["attn_pool.q.bias"]);
            o[m + "MultiHeadDotProductAttention_0/key/kernel"] = In(Row(kv, 0, 2));
            o[m + "MultiHeadDotProductAttention_0/key/bias"] = Bias(Row(kvb, 0, 2));
            o[m + "MultiHeadDotProductAttention_0/value/kernel"] = In(Row(kv, 1, 2));
            o[m + "MultiHeadDotProductAttention_0/value/bias"] = Bias(Row(kvb, 1, 2));
            o[m + "MultiHeadDotProductAttention_0/out/kernel"] = Out(sd["attn_pool.proj.weight"]);
            o[m + "MultiHeadDotProductAttention_0/out/bias"] = sd["attn_pool.proj.bias"];
            o[m + "LayerNorm_0/scale"] = sd["attn_pool.norm.weight"];
            o[m + "LayerNorm_0/bias"] = sd["attn_pool.norm.bias"];
            o[m + "MlpBlock_0/Dense_0/kernel"] = sd["attn_pool.mlp.fc1.weight"].t().contiguous();
            o[m + "MlpBlock_0/Dense_0/bias"] = sd["attn_pool.mlp.fc1.bias"];
            o[m + "MlpBlock_0/Dense_1/kernel"] = sd["attn_pool.mlp.fc2.weight"].t().contiguous();
            o[m + "MlpBlock_0/Dense_1/bias"] = sd["attn_pool.mlp.fc2.bias"];
        }
        if (c.NumClasses > 0)
        {
            o["head/kernel"] = sd["head.weight"].t().contiguous();
            o["head/bias"] = sd["head.bias"];
        }
        foreach (var t in o.Values) scope.MoveToOuter(t);   // the new tensors outlive the scope; sd's own are not in it
        return o.ToDictionary(kv => prefix + kv.Key, kv => kv.Value);
    }

    /// <summary>A Hugging Face sharded checkpoint: <paramref name="shards"/> safetensors files and the index naming them.</summary>
    public static string SaveSharded(IDictionary<string, Tensor> tensors, string folder, int shards)
    {
        Directory.CreateDirectory(folder);
        var keys = tensors.Keys.ToList();
        var weightMap = new Dictionary<string, string>();
        for (int s = 0; s < shards; s++)
        {
            string file = $"model-{s + 1:00000}-of-{shards:00000}.safetensors";
            var part = keys.Where((_, i) => i % shards == s).ToList();
            Safetensors.Save(part.Select(k => new KeyValuePair<string, Tensor>(k, tensors[k])), Path.Combine(folder, file));
            foreach (string k in part) weightMap[k] = file;
        }
        string index = Path.Combine(folder, SafetensorsIndex.DefaultFileName);
        File.WriteAllText(index, System.Text.Json.JsonSerializer.Serialize(new { metadata = new { total_size = 0 }, weight_map = weightMap }));
        return index;
    }

    /// <summary>One .npy file's bytes (format 1.0: magic, version, 2-byte header length, the dict literal padded with
    /// spaces to a multiple of 64 and ended by a newline, then the little-endian data in C order).</summary>
    public static byte[] Npy(Tensor t, string? descr = null, string? shapeText = null, bool fortran = false)
    {
        using var scope = torch.NewDisposeScope();   // keeps the temporaries reachable through each native call (docs/torchsharp-notes.md)
        var x = t.detach().cpu().contiguous();
        descr ??= x.dtype switch { ScalarType.Float32 => "<f4", ScalarType.Float64 => "<f8", ScalarType.Float16 => "<f2", _ => throw new ArgumentException(x.dtype.ToString()) };
        shapeText ??= x.shape.Length == 1 ? $"({x.shape[0]},)" : "(" + string.Join(", ", x.shape) + ")";
        string dict = $"{{'descr': '{descr}', 'fortran_order': {(fortran ? "True" : "False")}, 'shape': {shapeText}, }}";
        int total = 10 + dict.Length + 1;
        dict = dict.PadRight(dict.Length + (64 - total % 64) % 64) + "\n";
        using var ms = new MemoryStream();
        ms.Write(new byte[] { 0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', 1, 0 });
        var len = new byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(len, (ushort)dict.Length);
        ms.Write(len);
        ms.Write(Encoding.ASCII.GetBytes(dict));
        if (x.numel() > 0) x.WriteBytesToStream(ms);
        return ms.ToArray();
    }

    /// <summary>Writes an .npz with <see cref="ZipArchive"/> (as np.savez / np.savez_compressed).</summary>
    public static void SaveNpz(string path, IEnumerable<KeyValuePair<string, byte[]>> members, bool compress)
    {
        using var fs = File.Create(path);
        using var zip = new ZipArchive(fs, ZipArchiveMode.Create);
        foreach (var (name, bytes) in members)
        {
            var e = zip.CreateEntry(name + ".npy", compress ? CompressionLevel.Optimal : CompressionLevel.NoCompression);
            using var s = e.Open();
            s.Write(bytes);
        }
    }

    public static void SaveNpz(string path, IDictionary<string, Tensor> tensors, bool compress = false) =>
        SaveNpz(path, tensors.Select(kv => new KeyValuePair<string, byte[]>(kv.Key, Npy(kv.Value))), compress);
}
