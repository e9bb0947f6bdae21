using System.Globalization;
using System.Text.Json;

namespace ViT22B.Data;

/// <summary>How an evaluation image is brought to the model's square input size.</summary>
public enum ResizeMode
{
    /// <summary>Resize the shorter side to ⌊size / crop⌋ (aspect ratio kept), then center-crop size × size (timm's and
    /// torchvision's usual evaluation transform).</summary>
    CenterCrop,
    /// <summary>Resize both sides to ⌊size / crop⌋ (aspect ratio not kept), then center-crop size × size; with crop 1 a
    /// plain resize to size × size (OpenCLIP's and Hugging Face's SigLIP preprocessing; big_vision's too, bilinear).</summary>
    Squash,
}

/// <summary>
/// The evaluation preprocessing a checkpoint expects (timm's <c>pretrained_cfg</c> data config: mean, std,
/// interpolation, crop percentage, crop mode). <see cref="EvalTransform"/> turns an image in [0, 1] into the model's
/// input; <see cref="ToJson"/>/<see cref="FromJson"/> store it in a checkpoint's metadata under
/// <see cref="MetadataKey"/>.
/// </summary>
/// <param name="Mean">Per-channel mean (R, G, B) of [0, 1] pixels.</param>
/// <param name="Std">Per-channel standard deviation.</param>
/// <param name="Resize">Center crop or squash.</param>
/// <param name="CropPct">The crop's share of the resized image side, in (0, 1].</param>
/// <param name="Interpolation">Resize filter (antialiased).</param>
public sealed record Preprocessing((double R, double G, double B) Mean, (double R, double G, double B) Std, ResizeMode Resize,
    double CropPct, Resampling Interpolation)
{
    /// <summary>The safetensors metadata key a checkpoint stores its preprocessing under.</summary>
    public const string MetadataKey = "preprocessing";

    /// <summary>ImageNet statistics (timm <c>IMAGENET_DEFAULT_MEAN/STD</c>).</summary>
    public static readonly (double R, double G, double B) ImageNetMean = (0.485, 0.456, 0.406), ImageNetStd = (0.229, 0.224, 0.225);

    /// <summary>0.5 / 0.5: pixels to [−1, 1] (timm <c>IMAGENET_INCEPTION_MEAN/STD</c>, big_vision's <c>value_range(-1, 1)</c>).</summary>
    public static readonly (double R, double G, double B) Half = (0.5, 0.5, 0.5);

    /// <summary>OpenAI CLIP's statistics (timm <c>OPENAI_CLIP_MEAN/STD</c>).</summary>
    public static readonly (double R, double G, double B) OpenAiClipMean = (0.48145466, 0.4578275, 0.40821073), OpenAiClipStd = (0.26862954, 0.26130258, 0.27577711);

    /// <summary>The evaluation transform of a <see cref="PixelNormalization"/> (<c>ImageTensors</c>' overloads that take one):
    /// shorter side to the input size, center crop, bicubic, the given normalisation.</summary>
    public static Preprocessing FromNormalization(PixelNormalization normalization) => normalization == PixelNormalization.ImageNet
        ? new Preprocessing(ImageNetMean, ImageNetStd, ResizeMode.CenterCrop, 1.0, Resampling.Bicubic)
        : new Preprocessing(Half, Half, ResizeMode.CenterCrop, 1.0, Resampling.Bicubic);

    /// <summary>Throws <see cref="ArgumentException"/> naming the first invalid value.</summary>
    public Preprocessing Validate()
    {
        if (!(CropPct > 0 && CropPct <= 1)) throw new ArgumentException($"Preprocessing: crop_pct must be in (0, 1], found {CropPct}.");
        foreach (double s in new[] { Std.R, Std.G, Std.B })
            if (!(s > 0) || !double.IsFinite(s)) throw new ArgumentException($"Preprocessing: std must be positive, found {Std}.");
        foreach (double m in new[] { Mean.R, Mean.G, Mean.B })
            if (!double.IsFinite(m)) throw new ArgumentException($"Preprocessing: mean must be finite, found {Mean}.");
        return this;
    }

    /// <summary>The side an image is resized to before cropping <paramref name="size"/> (timm:
    /// <c>floor(size / crop_pct)</c>).</summary>
    public int ScaleSize(int size) => (int)Math.Floor(size / CropPct + 1e-9);

    /// <summary>Resize (shorter side or both), center-crop <paramref name="size"/>², normalise.</summary>
    public ImageTransform EvalTransform(int size)
    {
        Validate();
        int scale = ScaleSize(size);
        var resize = Resize == ResizeMode.Squash ? Transforms.Resize(scale, scale, Interpolation) : Transforms.ResizeShorterSide(scale, Interpolation);
        return Transforms.Compose(resize, Transforms.CenterCrop(size), Transforms.Normalize(Mean, Std));
    }

    /// <summary>The JSON stored in checkpoint metadata:
    /// <c>{"mean":[r,g,b],"std":[r,g,b],"resize":"center_crop"|"squash","crop_pct":0.9,"interpolation":"bicubic"|"bilinear"}</c>.</summary>
    public string ToJson() => JsonSerializer.Serialize(new Dictionary<string, object>
    {
        ["mean"] = new[] { Mean.R, Mean.G, Mean.B },
        ["std"] = new[] { Std.R, Std.G, Std.B },
        ["resize"] = Resize == ResizeMode.Squash ? "squash" : "center_crop",
        ["crop_pct"] = CropPct,
        ["interpolation"] = Interpolation == Resampling.Bilinear ? "bilinear" : "bicubic",
    });

    /// <summary>Parses <see cref="ToJson"/>'s form.</summary>
    /// <exception cref="FormatException">Malformed JSON or a missing or invalid field (named).</exception>
    public static Preprocessing FromJson(string json)
    {
        ArgumentNullException.ThrowIfNull(json);
        try
        {
            using var doc = JsonDocument.Parse(json);
            var r = doc.RootElement;
            (double, double, double) Triple(string name)
            {
                if (!r.TryGetProperty(name, out var a) || a.ValueKind != JsonValueKind.Array || a.GetArrayLength() != 3)
                    throw new FormatException($"Preprocessing JSON: '{name}' must be an array of 3 numbers.");
                var v = a.EnumerateArray().Select(e => e.GetDouble()).ToArray();
                return (v[0], v[1], v[2]);
            }
            string Text(string name) => r.TryGetProperty(name, out var e) && e.ValueKind == JsonValueKind.String ? e.GetString()!
                : throw new FormatException($"Preprocessing JSON: '{name}' must be a string.");
            var resize = Text("resize") switch
            {
                "center_crop" => ResizeMode.CenterCrop,
                "squash" => ResizeMode.Squash,
                var other => throw new FormatException($"Preprocessing JSON: resize '{other}' is not \"center_crop\" or \"squash\"."),
            };
            var interpolation = Text("interpolation") switch
            {
                "bicubic" => Resampling.Bicubic,
                "bilinear" => Resampling.Bilinear,
                var other => throw new FormatException($"Preprocessing JSON: interpolation '{other}' is not \"bicubic\" or \"bilinear\"."),
            };
            double crop = r.TryGetProperty("crop_pct", out var c) && c.ValueKind == JsonValueKind.Number ? c.GetDouble()
                : throw new FormatException("Preprocessing JSON: 'crop_pct' must be a number.");
            var p = new Preprocessing(Triple("mean"), Triple("std"), resize, crop, interpolation);
            try
            {
                return p.Validate();
            }
            catch (ArgumentException e)
            {
                throw new FormatException(e.Message, e);
            }
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            throw new FormatException($"Preprocessing JSON is malformed: {e.Message}", e);
        }
    }

    /// <summary>The preprocessing stored in checkpoint metadata, or null when there is none.</summary>
    public static Preprocessing? FromMetadata(IReadOnlyDictionary<string, string> metadata)
    {
        ArgumentNullException.ThrowIfNull(metadata);
        return metadata.TryGetValue(MetadataKey, out var json) ? FromJson(json) : null;
    }

    /// <inheritdoc />
    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"mean {Mean}, std {Std}, {(Resize == ResizeMode.Squash ? "squash" : "center crop")} {CropPct}, {Interpolation}");
}
