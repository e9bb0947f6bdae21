using System.Globalization;
using System.Text;
using System.Text.Json;
using TorchSharp;
using ViT22B.Layers;
using ViT22B.Interop;

namespace ViT22B.Models;

/// <summary>
/// JSON form of <see cref="ViTConfig"/> with timm-style snake_case keys (<c>img_size, patch_size, in_chans,
/// embed_dim, depth, num_heads, mlp_dim, block, qkv_bias, qk_norm, norm, norm_bias, mlp_bias, proj_bias,
/// fuse_out_proj, act, init_values, class_token, reg_tokens, no_embed_class, pre_norm, global_pool, pos_embed, num_classes,
/// norm_eps, dynamic_img_size, dtype</c>). Missing keys keep the <see cref="ViTConfig"/> defaults; unknown keys, values of
/// the wrong type and unknown enum values are errors that name the key (and the file, when read from one).
/// </summary>
public static class ViTConfigJson
{
    private static readonly string[] Keys =
    {
        "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim", "block", "qkv_bias",
        "qk_norm", "norm", "norm_bias", "mlp_bias", "proj_bias", "fuse_out_proj", "act", "init_values", "class_token",
        "reg_tokens", "no_embed_class", "pre_norm", "global_pool", "pool_include_prefix", "pos_embed", "num_classes", "norm_eps", "dynamic_img_size", "fc_norm", "dtype",
    };

    /// <summary>Serializes every knob (indented).</summary>
    public static string ToJson(ViTConfig c)
    {
        ArgumentNullException.ThrowIfNull(c);
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            if (c.ImgWidth is int width && width != c.ImgSize)
            {
                w.WriteStartArray("img_size");
                w.WriteNumberValue(c.ImgSize);
                w.WriteNumberValue(width);
                w.WriteEndArray();
            }
            else w.WriteNumber("img_size", c.ImgSize);
            w.WriteNumber("patch_size", c.PatchSize);
            w.WriteNumber("in_chans", c.InChans);
            w.WriteNumber("embed_dim", c.EmbedDim);
            w.WriteNumber("depth", c.Depth);
            w.WriteNumber("num_heads", c.NumHeads);
            w.WriteNumber("mlp_dim", c.MlpDim);
            w.WriteString("block", c.Block == BlockKind.Parallel ? "parallel" : "sequential");
            w.WriteBoolean("qkv_bias", c.QkvBias);
            w.WriteBoolean("qk_norm", c.QkNorm);
            w.WriteString("norm", c.Norm == NormKind.LayerNorm ? "layernorm" : "rmsnorm");
            w.WriteBoolean("norm_bias", c.NormBias);
            w.WriteBoolean("mlp_bias", c.MlpBias);
            w.WriteBoolean("proj_bias", c.ProjBias);
            w.WriteBoolean("fuse_out_proj", c.FuseOutProj);
            w.WriteString("act", Name(c.Act, Activations));
            if (c.InitValues is { } iv) w.WriteNumber("init_values", iv);
            else w.WriteNull("init_values");
            w.WriteBoolean("class_token", c.ClassToken);
            w.WriteNumber("reg_tokens", c.RegTokens);
            w.WriteBoolean("no_embed_class", c.NoEmbedClass);
            w.WriteBoolean("pre_norm", c.PreNorm);
            w.WriteString("global_pool", c.GlobalPool switch { GlobalPool.Map => "map", GlobalPool.Gap => "gap", _ => "token" });
            w.WriteBoolean("pool_include_prefix", c.PoolIncludePrefix);
            w.WriteString("pos_embed", c.PosEmbed == PosEmbedKind.Learn ? "learn" : "sincos2d");
            w.WriteNumber("num_classes", c.NumClasses);
            w.WriteNumber("norm_eps", c.NormEps);
            w.WriteBoolean("dynamic_img_size", c.DynamicImgSize);
            if (c.FcNorm is bool fcNorm) w.WriteBoolean("fc_norm", fcNorm);
            else w.WriteNull("fc_norm");
            w.WriteString("dtype", DTypeName(c.DType));
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray());
    }

    /// <summary>Parses and validates a config. <paramref name="source"/> (a file name) is named in errors.</summary>
    /// <exception cref="FormatException">Malformed JSON, unknown key, wrong value type or unknown value.</exception>
    /// <exception cref="ArgumentException">A well-formed config whose values are inconsistent (see <see cref="ViTConfig.Validate"/>).</exception>
    public static ViTConfig FromJson(string json, string? source = null)
    {
        ArgumentNullException.ThrowIfNull(json);
        string where = source is null ? "ViT config JSON" : $"ViT config '{source}'";
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(json, new JsonDocumentOptions { AllowTrailingCommas = false, CommentHandling = JsonCommentHandling.Skip });
        }
        catch (JsonException e)
        {
            throw new FormatException($"{where} is not valid JSON: {e.Message}", e);
        }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new FormatException($"{where}: expected a JSON object, found {doc.RootElement.ValueKind}.");
            var c = new ViTConfig();
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                var v = p.Value;
                c = p.Name switch
                {
                    "img_size" when v.ValueKind == JsonValueKind.Array => ImageSize(where, p, c),
                    "img_size" => c with { ImgSize = Int(where, p), ImgWidth = null },
                    "patch_size" => c with { PatchSize = Int(where, p) },
                    "in_chans" => c with { InChans = Int(where, p) },
                    "embed_dim" => c with { EmbedDim = Int(where, p) },
                    "depth" => c with { Depth = Int(where, p) },
                    "num_heads" => c with { NumHeads = Int(where, p) },
                    "mlp_dim" => c with { MlpDim = Int(where, p) },
                    "block" => c with { Block = Choice(where, p, Blocks) },
                    "qkv_bias" => c with { QkvBias = Bool(where, p) },
                    "qk_norm" => c with { QkNorm = Bool(where, p) },
                    "norm" => c with { Norm = Choice(where, p, ("layernorm", NormKind.LayerNorm), ("rmsnorm", NormKind.RmsNorm)) },
                    "norm_bias" => c with { NormBias = Bool(where, p) },
                    "mlp_bias" => c with { MlpBias = Bool(where, p) },
                    "proj_bias" => c with { ProjBias = Bool(where, p) },
                    "fuse_out_proj" => c with { FuseOutProj = Bool(where, p) },
                    "act" => c with { Act = Choice(where, p, Activations) },
                    "init_values" => c with { InitValues = v.ValueKind == JsonValueKind.Null ? null : Number(where, p) },
                    "class_token" => c with { ClassToken = Bool(where, p) },
                    "reg_tokens" => c with { RegTokens = Int(where, p) },
                    "no_embed_class" => c with { NoEmbedClass = Bool(where, p) },
                    "pre_norm" => c with { PreNorm = Bool(where, p) },
                    "global_pool" => c with { GlobalPool = Choice(where, p, ("map", GlobalPool.Map), ("gap", GlobalPool.Gap), ("token", GlobalPool.Token)) },
                    "pool_include_prefix" => c with { PoolIncludePrefix = Bool(where, p) },
                    "pos_embed" => c with { PosEmbed = Choice(where, p, ("learn", PosEmbedKind.Learn), ("sincos2d", PosEmbedKind.SinCos2d)) },
                    "num_classes" => c with { NumClasses = Int(where, p) },
                    "norm_eps" => c with { NormEps = Number(where, p) },
                    "dynamic_img_size" => c with { DynamicImgSize = Bool(where, p) },
                    "fc_norm" => c with { FcNorm = v.ValueKind == JsonValueKind.Null ? null : Bool(where, p) },
                    "dtype" => c with { DType = Choice(where, p, DTypes) },
                    _ => throw new FormatException($"{where}: unknown key '{p.Name}'; known keys: {string.Join(", ", Keys)}."),
                };
            }
            return c.Validate();
        }
    }

    // img_size as [height, width] (timm's tuple form).
    private static ViTConfig ImageSize(string where, JsonProperty p, ViTConfig c)
    {
        var items = p.Value.EnumerateArray().ToArray();
        if (items.Length != 2 || items.Any(i => i.ValueKind != JsonValueKind.Number || !i.TryGetInt32(out _)))
            throw new FormatException($"{where}: 'img_size' must be a number or [height, width], found {p.Value.GetRawText()}.");
        int h = items[0].GetInt32(), w = items[1].GetInt32();
        return c with { ImgSize = h, ImgWidth = w == h ? null : w };
    }

    private static readonly (string Name, BlockKind Value)[] Blocks = { ("parallel", BlockKind.Parallel), ("sequential", BlockKind.Sequential) };

    private static readonly (string Name, Activation Value)[] Activations =
        { ("gelu", Activation.Gelu), ("gelu_tanh", Activation.GeluTanh), ("quick_gelu", Activation.QuickGelu) };

    private static string Name<T>(T value, (string Name, T Value)[] options) where T : struct, Enum =>
        options.First(o => EqualityComparer<T>.Default.Equals(o.Value, value)).Name;

    private static readonly (string Name, torch.ScalarType Value)[] DTypes =
    {
        ("float32", torch.ScalarType.Float32), ("bfloat16", torch.ScalarType.BFloat16),
        ("float16", torch.ScalarType.Float16), ("float64", torch.ScalarType.Float64),
    };

    /// <summary>Parses a dtype as spelled in the JSON (<c>float32</c>, <c>bfloat16</c>, <c>float16</c>, <c>float64</c>).</summary>
    /// <exception cref="FormatException">Any other value.</exception>
    public static torch.ScalarType ParseDType(string value) => Lookup("dtype", value, DTypes);

    /// <summary>Parses a block kind as spelled in the JSON (<c>parallel</c>, <c>sequential</c>).</summary>
    /// <exception cref="FormatException">Any other value.</exception>
    public static BlockKind ParseBlock(string value) => Lookup("block", value, Blocks);

    private static T Lookup<T>(string key, string value, (string Name, T Value)[] options)
    {
        foreach (var (name, v) in options)
            if (name == value) return v;
        throw new FormatException($"Unknown {key} '{value}'; expected one of {string.Join(", ", options.Select(o => '"' + o.Name + '"'))}.");
    }

    /// <summary>Reads and validates a config file.</summary>
    public static ViTConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"ViT config file '{path}' does not exist.", path);
        return FromJson(File.ReadAllText(path), path);
    }

    /// <summary>Writes a config file atomically (temporary file, flush, rename).</summary>
    public static void Save(ViTConfig config, string path) =>
        AtomicFile.Write(path, s =>
        {
            var bytes = Encoding.UTF8.GetBytes(ToJson(config) + "\n");
            s.Write(bytes, 0, bytes.Length);
        });

    /// <summary>The JSON spelling of a dtype ("float32", "bfloat16", "float16", "float64").</summary>
    public static string DTypeName(torch.ScalarType t) => t switch
    {
        torch.ScalarType.Float32 => "float32",
        torch.ScalarType.BFloat16 => "bfloat16",
        torch.ScalarType.Float16 => "float16",
        torch.ScalarType.Float64 => "float64",
        _ => t.ToString().ToLowerInvariant(),
    };

    private static int Int(string where, JsonProperty p)
    {
        if (p.Value.ValueKind == JsonValueKind.Number && p.Value.TryGetInt32(out int i)) return i;
        throw new FormatException($"{where}: key '{p.Name}' must be an integer, found {Show(p.Value)}.");
    }

    private static double Number(string where, JsonProperty p)
    {
        if (p.Value.ValueKind == JsonValueKind.Number) return p.Value.GetDouble();
        throw new FormatException($"{where}: key '{p.Name}' must be a number, found {Show(p.Value)}.");
    }

    private static bool Bool(string where, JsonProperty p) => p.Value.ValueKind switch
    {
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        _ => throw new FormatException($"{where}: key '{p.Name}' must be true or false, found {Show(p.Value)}."),
    };

    private static T Choice<T>(string where, JsonProperty p, params (string Name, T Value)[] options)
    {
        if (p.Value.ValueKind == JsonValueKind.String)
        {
            string s = p.Value.GetString()!;
            foreach (var (name, value) in options)
                if (name == s) return value;
        }
        throw new FormatException($"{where}: key '{p.Name}' has unknown value {Show(p.Value)}; expected one of {string.Join(", ", options.Select(o => '"' + o.Name + '"'))}.");
    }

    private static string Show(JsonElement e) => e.ValueKind == JsonValueKind.String
        ? '"' + e.GetString() + '"'
        : e.GetRawText().Length > 40 ? e.GetRawText()[..40] + "…" : e.GetRawText().ToString(CultureInfo.InvariantCulture);
}
