using System.Reflection;
using Google.Protobuf;
using TorchSharp.Modules;
using ViT22B.Data;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Onnx.Proto;
using static TorchSharp.torch;

namespace ViT22B.Onnx;

/// <summary>How an exported model stores its weights.</summary>
public enum OnnxWeights
{
    /// <summary>float32 weights.</summary>
    F32,
    /// <summary>IEEE half-precision weights, cast to float32 once when ONNX Runtime loads the model: half the file, the
    /// float32 model's speed and memory at run time.</summary>
    F16,
    /// <summary>bfloat16 weights, cast to float32 once when ONNX Runtime loads the model.</summary>
    BF16,
    /// <summary>Linear layers in int8 (symmetric, one scale per output channel) with inputs quantized per call to
    /// uint8 (<c>DynamicQuantizeLinear</c> + <c>MatMulInteger</c>, the pattern ONNX Runtime's <c>quantize_dynamic</c>
    /// writes with <c>per_channel=True</c> as read from its quantization tools; not compared with a file it wrote); the
    /// other weights float32.</summary>
    DynamicInt8,
}

/// <summary>What <see cref="OnnxExport.Save"/> writes besides the graph.</summary>
public sealed record OnnxExportOptions
{
    /// <summary>Weight storage (default float32).</summary>
    public OnnxWeights Weights { get; init; } = OnnxWeights.F32;

    /// <summary>The preprocessing the model expects, stored in the model's metadata under
    /// <see cref="Preprocessing.MetadataKey"/> (null: none stored).</summary>
    public Preprocessing? Preprocessing { get; init; }

    /// <summary>Write the weights (each of 1 KiB or more) to an ONNX external-data file <c>&lt;path&gt;.data</c> beside the
    /// model. <see cref="OnnxExport.Save"/> does so anyway when the weights would not fit in one protobuf message
    /// (2 GB: float32 models above about 500 M parameters).</summary>
    public bool ExternalData { get; init; }
}

/// <summary>
/// Exports a <see cref="VisionTransformer"/> to a standard ONNX model (opset 18, default-domain operators only, IR
/// version 8) that computes what <see cref="VisionTransformer.Encode"/> computes: input <c>images</c> float32
/// [batch, C, H, W] (H and W symbolic when the model has <see cref="ViTConfig.DynamicImgSize"/>), outputs
/// <c>features</c> [batch, D] (the pooled embedding), <c>tokens</c> [batch, N, D] (patch tokens) and, with a
/// classifier, <c>logits</c> [batch, classes]. The model's config (<see cref="ViTConfigJson"/>) is stored in the
/// metadata under <see cref="ConfigMetadataKey"/>, its preprocessing under <see cref="Preprocessing.MetadataKey"/>.
/// Run the file with <c>ViT22B.OnnxRuntime.OnnxVisionTransformer</c> or any ONNX runtime. docs/onnx.md has the graph.
/// </summary>
public static class OnnxExport
{
    /// <summary>The ONNX operator set the graph uses (18: <c>Resize</c> with antialiasing, <c>ReduceMean</c> with
    /// axes as an input).</summary>
    public const int Opset = 18;

    /// <summary>The ONNX IR version written (the one that goes with opset 18).</summary>
    public const int IrVersion = 8;

    /// <summary>The metadata key of the config JSON (as in checkpoints).</summary>
    public const string ConfigMetadataKey = PretrainedCheckpoint.ConfigMetadataKey;

    /// <summary>Protobuf's limit on one message: a model whose weights come near it cannot be written as one file.</summary>
    internal const long MaxModelBytes = int.MaxValue - (64L << 20);

    // The module types whose forward pass ViTGraph writes; anything else in a model (a sharded encoder, a module a
    // caller swapped in) has no ONNX form here.
    private static readonly HashSet<Type> Supported = new()
    {
        typeof(VisionTransformer), typeof(PatchEmbed), typeof(Conv2d), typeof(Linear), typeof(Norm), typeof(Encoder),
        typeof(ParallelBlock), typeof(SequentialBlock), typeof(Attention), typeof(Mlp), typeof(MapHead), typeof(LayerScale),
    };

    /// <summary>
    /// Writes <paramref name="model"/> to <paramref name="path"/>, and with external data its weights to
    /// <c>&lt;path&gt;.data</c> (<see cref="OnnxExportOptions.ExternalData"/>), streamed one tensor at a time. Each file is
    /// written atomically (an existing one is replaced only when the new one is complete); with external data the data
    /// file is replaced first, so a failure while writing the small model file after it leaves a pair that does not
    /// match: export again.
    /// </summary>
    /// <exception cref="NotSupportedException">The model contains a module without an ONNX form (named).</exception>
    public static void Save(VisionTransformer model, string path, OnnxExportOptions? options = null) => SaveWithLimit(model, path, options, MaxModelBytes);

    internal static void SaveWithLimit(VisionTransformer model, string path, OnnxExportOptions? options, long maxBytes)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(path);
        options ??= new OnnxExportOptions();
        CheckModules(model);
        // One file when the weights fit one message, as a dry run of the graph that stores no weight data says exactly.
        if (!options.ExternalData && WeightBytes(model, options) <= maxBytes)
        {
            var proto = Build(model, options, new OnnxGraph());
            AtomicFile.Write(path, s => proto.WriteTo(s));
            return;
        }
        string dataName = Path.GetFileName(path) + ".data";
        AtomicFile.Write(path, modelStream =>
        {
            ModelProto? built = null;
            AtomicFile.Write(path + ".data", dataStream => built = Build(model, options, new OnnxGraph(dataStream, dataName)));
            built.WriteTo(modelStream);
        });
    }

    /// <summary>The ONNX model of <paramref name="model"/> as protobuf bytes (weights inside).</summary>
    /// <exception cref="NotSupportedException">A module without an ONNX form, or weights beyond one protobuf message
    /// (use <see cref="Save"/>, which writes them as external data).</exception>
    public static byte[] ToBytes(VisionTransformer model, OnnxExportOptions? options = null) => Build(model, options).ToByteArray();

    // The dtype the weights are stored in (int8 keeps its other weights in float32).
    private static ScalarType Storage(OnnxWeights weights) => weights switch
    {
        OnnxWeights.F16 => ScalarType.Float16,
        OnnxWeights.BF16 => ScalarType.BFloat16,
        _ => ScalarType.Float32,
    };

    /// <summary>The bytes of weight data an export of <paramref name="model"/> stores (every initializer's raw data),
    /// from a dry run of the graph that stores no weight data.</summary>
    internal static long WeightBytes(VisionTransformer model, OnnxExportOptions options)
    {
        var graph = OnnxGraph.SizeOnly();
        ViTGraph.Emit(graph, model, Storage(options.Weights), options.Weights == OnnxWeights.DynamicInt8);
        return graph.InitializerBytes;
    }

    // The model with its weights inside, refused before any weight is copied when they take more than maxBytes.
    internal static ModelProto Build(VisionTransformer model, OnnxExportOptions? options, long maxBytes = MaxModelBytes)
    {
        ArgumentNullException.ThrowIfNull(model);
        options ??= new OnnxExportOptions();
        CheckModules(model);
        if (WeightBytes(model, options) is var bytes && bytes > maxBytes) throw TooLarge(bytes, maxBytes);
        return Build(model, options, new OnnxGraph());
    }

    private static ModelProto Build(VisionTransformer model, OnnxExportOptions options, OnnxGraph graph)
    {
        ViTGraph.Emit(graph, model, Storage(options.Weights), options.Weights == OnnxWeights.DynamicInt8);
        var proto = new ModelProto
        {
            IrVersion = IrVersion,
            ProducerName = "ViT22B",
            ProducerVersion = typeof(OnnxExport).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "",
            Domain = "vit22b",
            DocString = $"ViT22B VisionTransformer ({model.Config.Block} blocks, D = {model.Config.EmbedDim}, depth {model.Config.Depth}), weights {options.Weights}.",
            Graph = graph.Proto,
        };
        proto.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = Opset });
        proto.MetadataProps.Add(new StringStringEntryProto { Key = ConfigMetadataKey, Value = ViTConfigJson.ToJson(model.Config) });
        proto.MetadataProps.Add(new StringStringEntryProto { Key = "weights", Value = options.Weights.ToString() });
        if (options.Preprocessing is { } p)
            proto.MetadataProps.Add(new StringStringEntryProto { Key = Preprocessing.MetadataKey, Value = p.Validate().ToJson() });
        return proto;
    }

    private static NotSupportedException TooLarge(long bytes, long maxBytes) =>
        new($"ONNX export: the weights take {bytes:N0} bytes, more than one protobuf message can hold ({maxBytes:N0}); save to a file (OnnxExport.Save writes them as external data), or export 16-bit or int8 weights.");

    private static void CheckModules(VisionTransformer model)
    {
        foreach (var (name, module) in model.named_modules())
        {
            if (Supported.Contains(module.GetType())) continue;
            string where = name.Length == 0 ? "the model" : $"'{name}'";
            throw new NotSupportedException($"ONNX export: {where} is a {module.GetType().Name}, which has no ONNX form (supported: {string.Join(", ", Supported.Select(t => t.Name).Order(StringComparer.Ordinal))}).");
        }
    }
}
