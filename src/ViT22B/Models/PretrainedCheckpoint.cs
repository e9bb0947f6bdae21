using System.Runtime.InteropServices;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>How <see cref="PretrainedCheckpoint.Load(VisionTransformer, string, PretrainedLoadOptions?)"/> adapts a
/// checkpoint to a model of another resolution, patch size or class count.</summary>
public sealed record PretrainedLoadOptions
{
    /// <summary>Keep the model's freshly initialised classifier (<c>head.*</c>) when the checkpoint's has another class
    /// count or the checkpoint has none (timm drops the classifier the same way when <c>num_classes</c> differs). Off:
    /// such a checkpoint is refused. A checkpoint's classifier is always skipped for a model without one.</summary>
    public bool ResetHead { get; init; }

    /// <summary>Resize a patch-embedding kernel of another patch size to the model's (FlexiViT's pseudo-inverse resize,
    /// timm <c>resample_patch_embed</c>). Off: such a checkpoint is refused.</summary>
    public bool ResizePatchEmbed { get; init; }

    /// <summary>Refuse a checkpoint that leaves model keys missing or has keys the model does not have (default). Off:
    /// load what fits and report the rest. Shapes that cannot be adapted are refused either way.</summary>
    public bool Strict { get; init; } = true;

    /// <summary>The filter that resamples the position embedding to another grid and defines the patch-embedding resize
    /// (timm's <c>checkpoint_filter_fn</c> <c>interpolation</c> and <c>antialias</c>).</summary>
    public ResampleFilter Resampling { get; init; } = ResampleFilter.BicubicAntialiased;
}

/// <summary>How a checkpoint's position embedding (and, on request, its patch embedding) is resampled.</summary>
public enum ResampleFilter
{
    /// <summary>Bicubic with antialiasing: timm's default for every checkpoint but FlexiViT's.</summary>
    BicubicAntialiased,
    /// <summary>Bilinear without antialiasing: what timm uses for Google's FlexiViT checkpoints (which, its code notes,
    /// "have a strong preference" for it) and what big_vision's FlexiViT resizes with.</summary>
    Bilinear,
}

/// <summary>
/// Loads the checkpoints people have into a <see cref="VisionTransformer"/>: timm's (this library's own keys), Hugging
/// Face <c>transformers</c> ViT, DINOv2 (with registers), SigLIP and CLIP vision towers, OpenAI/OpenCLIP visual towers and
/// big_vision <c>.npz</c> files, as one safetensors file, a Hugging Face sharded checkpoint or a folder
/// (<see cref="TensorSources.Open"/>). The layout is detected from the keys (<see cref="CheckpointLayout"/>) and converted
/// on the fly, one tensor at a time. As timm's <c>checkpoint_filter_fn</c> does, a position embedding for another image
/// size is resampled (bicubic, antialiased; prefix slots kept), and on request a patch embedding of another patch size
/// is resized and a classifier of another class count re-initialised. Nothing is copied unless every key fits (an I/O
/// error while copying, such as a corrupt archive member, can still leave the tensors before it copied); the
/// <see cref="LoadReport"/> names every key converted, resampled, re-initialised or skipped.
/// </summary>
public static class PretrainedCheckpoint
{
    /// <summary>Opens <paramref name="path"/> and loads it (see the class summary).</summary>
    /// <exception cref="CheckpointMismatchException">Shapes that cannot be adapted, or (strict) missing or unexpected keys.</exception>
    /// <exception cref="CheckpointLayoutException">Keys of no known layout.</exception>
    public static LoadReport Load(VisionTransformer model, string path, PretrainedLoadOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        using var source = TensorSources.Open(path);
        return Load(model, source, options);
    }

    /// <summary>The metadata key holding the model's config JSON (<see cref="ViTConfigJson"/>).</summary>
    public const string ConfigMetadataKey = "config";

    /// <summary>Writes the model's weights (timm keys) atomically, with its config and, when given, the evaluation
    /// preprocessing its weights expect in the file's metadata (<see cref="ConfigMetadataKey"/>,
    /// <see cref="Preprocessing.MetadataKey"/>), so that whoever loads the file can feed it as it was fed.</summary>
    public static void Save(VisionTransformer model, string path, Preprocessing? preprocessing = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        var metadata = new Dictionary<string, string> { [ConfigMetadataKey] = ViTConfigJson.ToJson(model.Config) };
        if (preprocessing is not null) metadata[Preprocessing.MetadataKey] = preprocessing.Validate().ToJson();
        SafetensorsCheckpoint.Save(model, path, metadata);
    }

    /// <summary>The layout of an open checkpoint.</summary>
    /// <exception cref="CheckpointLayoutException">Keys of no known layout (the message lists the first keys and the known layouts).</exception>
    public static CheckpointLayout DetectLayout(ITensorSource source)
    {
        ArgumentNullException.ThrowIfNull(source);
        return CheckpointLayouts.Detect(source).Layout;
    }

    /// <summary>Loads an open checkpoint (see the class summary).</summary>
    public static LoadReport Load(VisionTransformer model, ITensorSource source, PretrainedLoadOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(source);
        options ??= new PretrainedLoadOptions();
        if (!Enum.IsDefined(options.Resampling))
            throw new ArgumentOutOfRangeException(nameof(options), $"PretrainedLoadOptions.Resampling is {(int)options.Resampling}, not a ResampleFilter ({string.Join(", ", Enum.GetNames<ResampleFilter>())}).");
        var c = model.Config;
        var map = CheckpointLayouts.Map(source, c.Depth);
        var target = model.state_dict();
        var mapped = FuseOutProjections(map.Recipes, target);
        var recipes = mapped.ToDictionary(r => r.Target, StringComparer.Ordinal);

        var plans = new Dictionary<string, Func<Tensor>>(StringComparer.Ordinal);
        var loaded = new List<string>();
        var converted = new List<KeyNote>();
        var resampled = new List<KeyNote>();
        var reinitialized = new List<KeyNote>();
        var skipped = new List<KeyNote>(map.Skipped);
        var unexpected = new List<string>(map.Unknown);
        var mismatched = new List<ShapeMismatch>();

        Tensor Read(string name) => source.Read(name);
        Tensor Meta(string name) => torch.empty(source.ShapeOf(name), dtype: ScalarType.Float32, device: torch.META);
        long[] ShapeOf(Recipe r)
        {
            using var scope = torch.NewDisposeScope();
            return r.Build(Meta).shape;
        }
        static bool IsHead(string key) => key is "head.weight" or "head.bias";

        // The position embedding last: adapting it may rewrite the class token's plan.
        foreach (var r in mapped.OrderBy(r => r.Target == "pos_embed"))
        {
            long[] shape;
            try
            {
                shape = ShapeOf(r);
            }
            catch (Exception e) when (e is ExternalException or ArgumentException or IndexOutOfRangeException or InvalidOperationException)
            {
                // A source tensor of another rank than its layout has (a 2-D conv kernel, a scalar Flax kernel).
                var found = r.Sources.Count > 0 ? map.SourceShape(r.Sources[0]) : Array.Empty<long>();
                var expected = target.TryGetValue(r.Target, out var m) ? m.shape : Array.Empty<long>();
                mismatched.Add(new ShapeMismatch($"{r.Target} (from {string.Join(" + ", r.Sources)}, whose shape cannot be converted: {e.Message.Split('\n')[0]})", expected, found));
                continue;
            }
            if (!target.TryGetValue(r.Target, out var t))
            {
                if (IsHead(r.Target) && c.NumClasses == 0) skipped.Add(new KeyNote(r.Target, "the model has no classifier (num_classes 0)"));
                else unexpected.Add(r.Changed ? $"{r.Target} ({r.Note})" : r.Target);
                continue;
            }
            if (r.Target == "pos_embed")
            {
                // Always planned by grid, not by shape: a square 12×12 embedding has the shape of a 16×9 one.
                if (!PlanPositions(c, t.shape, r, shape, recipes, SourceGrid(source), options.Resampling, Read, plans, resampled, converted, loaded))
                    mismatched.Add(new ShapeMismatch(r.Changed ? $"{r.Target} ({r.Note})" : r.Target, t.shape, shape));
            }
            else if (t.shape.SequenceEqual(shape))
            {
                plans[r.Target] = () => r.Build(Read);
                if (r.Changed) converted.Add(new KeyNote(r.Target, r.Note));
                else loaded.Add(r.Target);
            }
            else if (r.Target == "patch_embed.proj.weight" && options.ResizePatchEmbed && shape.Length == 4 && shape[0] == t.shape[0] && shape[1] == t.shape[1])
            {
                plans[r.Target] = () =>
                {
                    using var w = r.Build(Read);
                    return EmbeddingResampling.PatchEmbedding(w, t.shape[2], t.shape[3], options.Resampling);
                };
                resampled.Add(new KeyNote(r.Target, $"patch {shape[2]}×{shape[3]} → {t.shape[2]}×{t.shape[3]} (FlexiViT pseudo-inverse resize, {EmbeddingResampling.Describe(options.Resampling)}){(r.Changed ? "; " + r.Note : "")}"));
            }
            else if (IsHead(r.Target) && options.ResetHead)
            {
                reinitialized.Add(new KeyNote(r.Target, $"checkpoint classifier [{string.Join(", ", shape)}], model [{string.Join(", ", t.shape)}]"));
            }
            else
            {
                mismatched.Add(new ShapeMismatch(r.Changed ? $"{r.Target} ({r.Note})" : r.Target, t.shape, shape));
            }
        }
        var missing = new List<string>();
        foreach (string key in target.Keys.Where(k => !plans.ContainsKey(k) && !reinitialized.Any(n => n.Key == k) && !mismatched.Any(m => m.Key.Split(' ')[0] == k)))
        {
            if (IsHead(key) && options.ResetHead) reinitialized.Add(new KeyNote(key, "the checkpoint has no classifier"));
            else missing.Add(key);
        }
        var report = new LoadReport(source.Path, loaded, missing, unexpected, mismatched)
        {
            Layout = LayoutName(map.Layout), Converted = converted, Resampled = resampled, Reinitialized = reinitialized, Skipped = skipped,
        };
        if (mismatched.Count > 0 || (options.Strict && (missing.Count > 0 || unexpected.Count > 0)))
            throw new CheckpointMismatchException(report, HintFor(report, options));
        using var noGrad = torch.no_grad();
        foreach (var (key, plan) in plans)
        {
            // The scope holds every temporary of the conversion until the copy is done (a tensor referenced only by a
            // native call's argument could otherwise be finalized during that call).
            using var scope = torch.NewDisposeScope();
            target[key].copy_(plan());
        }
        return report;
    }

    /// <summary>The name of the Hugging Face configuration file beside a checkpoint.</summary>
    public const string HuggingFaceConfigFileName = "config.json";

    /// <summary>
    /// <paramref name="config"/> with the MLP activation and norm ε that the checkpoint at <paramref name="path"/>
    /// computes with in its home library, where the checkpoint says: a Hugging Face layout by its
    /// <c>config.json</c> (in the folder, or beside the file or index; <c>hidden_act</c> and <c>layer_norm_eps</c>,
    /// from <c>vision_config</c> for a text-and-vision model), and where that file is absent or leaves them out, by the
    /// defaults of <c>transformers</c>' config class (ViT: exact GELU, ε 1e-12; DINOv2: exact GELU, 1e-6; SigLIP:
    /// tanh GELU, 1e-6; CLIP: QuickGELU, 1e-5); a big_vision <c>.npz</c> by big_vision's MLP (Flax's <c>nn.gelu</c>,
    /// the tanh approximation). timm and OpenCLIP files do not say, and the config stays as it is (timm's names
    /// already carry timm's choices). <paramref name="changes"/> names every setting changed and why.
    /// </summary>
    /// <exception cref="InvalidDataException"><c>config.json</c> is not JSON, or names an activation this library
    /// does not have (the message names the file and the value).</exception>
    public static ViTConfig MatchHome(ViTConfig config, string path, out IReadOnlyList<string> changes)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(path);
        CheckpointLayout layout;
        using (var source = TensorSources.Open(path)) layout = DetectLayout(source);
        var (defaultAct, defaultEps, configClass) = layout switch
        {
            CheckpointLayout.HuggingFaceViT => ((Activation?)Activation.Gelu, (double?)1e-12, "ViTConfig"),
            CheckpointLayout.HuggingFaceDinov2 => (Activation.Gelu, 1e-6, "Dinov2Config"),
            CheckpointLayout.HuggingFaceSiglip => (Activation.GeluTanh, 1e-6, "SiglipVisionConfig"),
            CheckpointLayout.HuggingFaceClip => (Activation.QuickGelu, 1e-5, "CLIPVisionConfig"),
            _ => (null, null, null),
        };
        var found = new List<string>();
        var result = config;
        if (layout == CheckpointLayout.BigVision)
        {
            result = Set(result, Activation.GeluTanh, null, "big_vision's MLP uses Flax's nn.gelu, the tanh approximation", found);
        }
        else if (configClass is not null)
        {
            string folder = Directory.Exists(path) ? path : Path.GetDirectoryName(Path.GetFullPath(path))!;
            string file = Path.Combine(folder, HuggingFaceConfigFileName);
            string? actName = null;
            double? eps = null;
            if (File.Exists(file)) (actName, eps) = ReadHuggingFaceVision(file);
            var act = actName is null ? defaultAct : HuggingFaceActivation(actName, file);
            string Why(bool fromFile, string what) => fromFile ? $"{file}: {what}" : $"transformers' {configClass} default{(File.Exists(file) ? $" ({file} leaves it out)" : $" (no {HuggingFaceConfigFileName} beside the checkpoint)")}";
            result = Set(result, act, null, Why(actName is not null, $"hidden_act {actName}"), found);
            result = Set(result, null, eps ?? defaultEps, Why(eps is not null, $"layer_norm_eps {eps}"), found);
        }
        changes = found;
        return result.Validate();

        static ViTConfig Set(ViTConfig c, Activation? act, double? eps, string why, List<string> notes)
        {
            if (act is Activation a && a != c.Act)
            {
                notes.Add($"activation {c.Act} → {a} ({why})");
                c = c with { Act = a };
            }
            if (eps is double e && e != c.NormEps)
            {
                notes.Add($"norm ε {c.NormEps:G} → {e:G} ({why})");
                c = c with { NormEps = e };
            }
            return c;
        }
    }

    // hidden_act and layer_norm_eps of a Hugging Face config.json (its vision_config when it has one); null when absent.
    private static (string? Act, double? Eps) ReadHuggingFaceVision(string file)
    {
        try
        {
            using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllBytes(file));
            var root = doc.RootElement;
            if (root.ValueKind != System.Text.Json.JsonValueKind.Object)
                throw new InvalidDataException($"'{file}' is not a Hugging Face configuration (a JSON object).");
            if (root.TryGetProperty("vision_config", out var vision) && vision.ValueKind == System.Text.Json.JsonValueKind.Object) root = vision;
            string? act = root.TryGetProperty("hidden_act", out var a) ? a.ValueKind == System.Text.Json.JsonValueKind.String ? a.GetString()
                : throw new InvalidDataException($"'{file}': hidden_act must be a string, found {a.ValueKind}.") : null;
            double? eps = root.TryGetProperty("layer_norm_eps", out var e) ? e.ValueKind == System.Text.Json.JsonValueKind.Number && e.GetDouble() > 0 ? e.GetDouble()
                : throw new InvalidDataException($"'{file}': layer_norm_eps must be a positive number, found {e}.") : null;
            return (act, eps);
        }
        catch (System.Text.Json.JsonException ex)
        {
            throw new InvalidDataException($"'{file}' is not valid JSON: {ex.Message}", ex);
        }
    }

    // transformers' ACT2FN names of the GELU family this library has.
    private static Activation HuggingFaceActivation(string name, string file) => name switch
    {
        "gelu" or "gelu_python" => Activation.Gelu,
        "gelu_pytorch_tanh" or "gelu_new" or "gelu_fast" => Activation.GeluTanh,
        "quick_gelu" => Activation.QuickGelu,
        _ => throw new InvalidDataException($"'{file}': hidden_act '{name}' is not an activation this library has (gelu, gelu_python, gelu_new, gelu_fast, gelu_pytorch_tanh, quick_gelu)."),
    };

    /// <summary>The report's name for a layout.</summary>
    public static string LayoutName(CheckpointLayout layout) => layout switch
    {
        CheckpointLayout.Timm => "timm",
        CheckpointLayout.HuggingFaceViT => "Hugging Face ViT",
        CheckpointLayout.HuggingFaceDinov2 => "Hugging Face DINOv2",
        CheckpointLayout.HuggingFaceSiglip => "Hugging Face SigLIP",
        CheckpointLayout.HuggingFaceClip => "Hugging Face CLIP",
        CheckpointLayout.OpenClip => "OpenCLIP",
        CheckpointLayout.BigVision => "big_vision",
        _ => layout.ToString(),
    };

    private static string HintFor(LoadReport report, PretrainedLoadOptions options)
    {
        var hints = new List<string>();
        if (!options.ResetHead && (report.Mismatched.Any(m => m.Key.StartsWith("head.", StringComparison.Ordinal)) || report.Missing.Any(k => k.StartsWith("head.", StringComparison.Ordinal))))
            hints.Add("the classifier differs: pass ResetHead = true to keep a freshly initialised one");
        if (!options.ResizePatchEmbed && report.Mismatched.Any(m => m.Key.StartsWith("patch_embed.proj.weight", StringComparison.Ordinal)))
            hints.Add("the patch size differs: pass ResizePatchEmbed = true to resize the patch embedding, or build the model with the checkpoint's patch size");
        if (report.Missing.Count > 0 && report.Layout != "timm")
            hints.Add($"the {report.Layout} checkpoint lacks keys the model needs: is the model's architecture (depth, options) the checkpoint's?");
        return hints.Count == 0 ? "" : " Hint: " + string.Join("; ", hints) + ".";
    }

    // The position embedding of another grid or prefix-slot convention; false when it cannot be adapted.
    // The checkpoint's own grid and prefix slots, when its metadata holds this library's config (PretrainedCheckpoint.Save).
    private static (int Prefix, long H, long W)? SourceGrid(ITensorSource source)
    {
        if (!source.Metadata.TryGetValue(ConfigMetadataKey, out var json)) return null;
        try
        {
            var c = ViTConfigJson.FromJson(json);
            return (c.NoEmbedClass ? 0 : c.NumPrefixTokens, c.GridHeight, c.GridWidth);
        }
        catch (Exception e) when (e is FormatException or ArgumentException)
        {
            return null;   // not our config: infer the grid as timm does
        }
    }

    // timm's ParallelScalingBlock keeps its out-projections apart by default (attn_out_proj, mlp_out_proj); a model with
    // the fused out_proj takes them as ParallelBlock.FuseOutProjection does, through FusedLayout's FuseOutWeight and
    // FuseOutBias.
    private static List<Recipe> FuseOutProjections(List<Recipe> recipes, IReadOnlyDictionary<string, Tensor> target)
    {
        var byTarget = recipes.ToDictionary(r => r.Target, StringComparer.Ordinal);
        var result = new List<Recipe>(recipes);
        foreach (var key in target.Keys.Where(k => k.EndsWith(".out_proj.weight", StringComparison.Ordinal) && k.StartsWith("blocks.", StringComparison.Ordinal)))
        {
            string block = key[..^"out_proj.weight".Length];
            if (byTarget.ContainsKey(key) || !byTarget.TryGetValue(block + "attn_out_proj.weight", out var attn) || !byTarget.TryGetValue(block + "mlp_out_proj.weight", out var mlp))
                continue;
            result.Remove(attn);
            result.Remove(mlp);
            result.Add(new Recipe(key, attn.Sources.Concat(mlp.Sources).ToArray(), read =>
            {
                using var scope = torch.NewDisposeScope();
                return FusedLayout.FuseOutWeight(attn.Build(read), mlp.Build(read)).MoveToOuterDisposeScope();
            }, true));
            var attnBias = byTarget.GetValueOrDefault(block + "attn_out_proj.bias");
            var mlpBias = byTarget.GetValueOrDefault(block + "mlp_out_proj.bias");
            if (!target.ContainsKey(block + "out_proj.bias") || (attnBias is null && mlpBias is null)) continue;
            var biases = new[] { attnBias, mlpBias }.OfType<Recipe>().ToList();
            foreach (var bias in biases) result.Remove(bias);
            result.Add(new Recipe(block + "out_proj.bias", biases.SelectMany(b => b.Sources).ToArray(), read =>
            {
                using var scope = torch.NewDisposeScope();
                return FusedLayout.FuseOutBias(attnBias?.Build(read), mlpBias?.Build(read))!.MoveToOuterDisposeScope();
            }, true));
        }
        return result;
    }

    private static bool PlanPositions(ViTConfig c, long[] modelShape, Recipe r, long[] shape, Dictionary<string, Recipe> recipes, (int Prefix, long H, long W)? known,
        ResampleFilter filter, Func<string, Tensor> read, Dictionary<string, Func<Tensor>> plans, List<KeyNote> resampled, List<KeyNote> converted, List<string> loaded)
    {
        if (shape.Length != 3 || shape[0] != 1 || shape[2] != modelShape[2]) return false;
        long slots = shape[1];
        int modelPrefix = (int)(modelShape[1] - (long)c.GridHeight * c.GridWidth);
        // The source grid: from the checkpoint's config when it has one, else square as timm infers it without one.
        int ps;
        long h0, w0;
        if (known is { } k && slots == k.Prefix + k.H * k.W) (ps, h0, w0) = (k.Prefix, k.H, k.W);
        else if (slots == modelShape[1] && !IsSquare(slots - modelPrefix)) (ps, h0, w0) = (modelPrefix, c.GridHeight, c.GridWidth);   // cannot be square: the model's own grid
        else
        {
            ps = new[] { modelPrefix, 0, 1 }.Distinct().Where(p => IsSquare(slots - p)).DefaultIfEmpty(-1).First();
            h0 = w0 = ps < 0 ? 0 : (long)Math.Round(Math.Sqrt(slots - ps));
        }
        bool foldIntoClass = ps == 1 && modelPrefix == 0 && c.ClassToken && recipes.ContainsKey("cls_token");
        if (ps < 0 || (ps != modelPrefix && !(ps == 0 && modelPrefix > 0) && !foldIntoClass)) return false;
        long gh = c.GridHeight, gw = c.GridWidth;
        bool same = h0 == gh && w0 == gw;
        if (same && ps == modelPrefix)
        {
            plans["pos_embed"] = () => r.Build(read);
            if (r.Changed) converted.Add(new KeyNote("pos_embed", r.Note));
            else loaded.Add("pos_embed");
            return true;
        }
        var how = new List<string>();
        if (!same) how.Add($"grid {h0}×{w0} → {gh}×{gw} ({EmbeddingResampling.Describe(filter)})");
        Tensor Grid(Tensor src, int prefix) => same ? src.alias() : EmbeddingResampling.PositionEmbedding(src, prefix, (h0, w0), (gh, gw), filter);
        if (ps == modelPrefix)
        {
            plans["pos_embed"] = () =>
            {
                using var src = r.Build(read);
                return Grid(src, ps);
            };
        }
        else if (ps == 0)
        {
            how.Add($"{modelPrefix} prefix slot(s) added as zeros (the checkpoint's prefix tokens had no position embedding)");
            plans["pos_embed"] = () =>
            {
                using var scope = torch.NewDisposeScope();
                var src = r.Build(read);
                return torch.cat(new[] { torch.zeros(1, modelPrefix, src.shape[2], dtype: src.dtype), Grid(src, 0) }, 1).MoveToOuterDisposeScope();
            };
        }
        else
        {
            // The model gives prefix tokens no position slot: the checkpoint's class slot is added to the class token
            // once, which is exact (the class token only ever appears with that embedding added).
            how.Add("class slot folded into cls_token (the model gives prefix tokens no slot)");
            var cls = recipes["cls_token"];
            plans["pos_embed"] = () =>
            {
                using var scope = torch.NewDisposeScope();
                var src = r.Build(read);
                return Grid(src.narrow(1, 1, slots - 1), 0).MoveToOuterDisposeScope();
            };
            plans["cls_token"] = () =>
            {
                using var scope = torch.NewDisposeScope();
                var token = cls.Build(read);
                var src = r.Build(read);
                return token.Plus(src.narrow(1, 0, 1).to(token.dtype)).MoveToOuterDisposeScope();
            };
            converted.RemoveAll(n => n.Key == "cls_token");
            loaded.Remove("cls_token");
            converted.Add(new KeyNote("cls_token", $"{cls.Note} + the class slot of {string.Join(" + ", r.Sources)}"));
        }
        resampled.Add(new KeyNote("pos_embed", $"[{string.Join(", ", shape)}] → [{string.Join(", ", modelShape)}]: {string.Join("; ", how)}{(r.Changed ? "; " + r.Note : "")}"));
        return true;
    }

    private static bool IsSquare(long n)
    {
        if (n <= 0) return false;
        long s = (long)Math.Round(Math.Sqrt(n));
        return s * s == n;
    }
}
