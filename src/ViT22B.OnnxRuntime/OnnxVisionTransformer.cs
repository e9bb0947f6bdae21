using System.Globalization;
using System.Text.Json;
using Microsoft.ML.OnnxRuntime;

namespace ViT22B.OnnxRuntime;

/// <summary>A float32 array with its shape (row-major).</summary>
/// <param name="Data">The elements.</param>
/// <param name="Shape">The dimensions.</param>
public sealed record OnnxArray(float[] Data, long[] Shape)
{
    /// <summary>The <paramref name="index"/>-th entry along the first dimension (one image's values).</summary>
    public ReadOnlySpan<float> this[int index]
    {
        get
        {
            long row = Shape.Skip(1).Aggregate(1L, (a, n) => a * n);
            if (index < 0 || index >= Shape[0]) throw new ArgumentOutOfRangeException(nameof(index), $"Index {index} outside [0, {Shape[0]}).");
            return Data.AsSpan((int)(index * row), (int)row);
        }
    }
}

/// <summary>The outputs of <see cref="OnnxVisionTransformer.Encode(float[], long[])"/>, as ViT22B's <c>ViTOutput</c>.</summary>
/// <param name="Pooled">The pooled embedding [B, D] (output <c>features</c>).</param>
/// <param name="PatchTokens">The patch tokens [B, N, D] (output <c>tokens</c>).</param>
/// <param name="Logits">Classifier outputs [B, classes] (output <c>logits</c>), or null when the model has none.</param>
public sealed record OnnxViTOutput(OnnxArray Pooled, OnnxArray PatchTokens, OnnxArray? Logits);

/// <summary>How <see cref="OnnxVisionTransformer.Load"/> sets up ONNX Runtime.</summary>
public sealed record OnnxRunnerOptions
{
    /// <summary>Threads of one inference (ONNX Runtime's intra-op threads); null = ONNX Runtime's default (one per
    /// physical core).</summary>
    public int? Threads { get; init; }

    /// <summary>Run on the CUDA execution provider when the ONNX Runtime in use has it (the application references
    /// <c>Microsoft.ML.OnnxRuntime.Gpu</c>) and it starts (default); otherwise on the CPU. False = always the CPU.</summary>
    public bool UseCuda { get; init; } = true;

    /// <summary>The CUDA device when <see cref="UseCuda"/> is set.</summary>
    public int CudaDevice { get; init; }
}

/// <summary>
/// A vision transformer exported by <c>ViT22B.Onnx</c>, run by ONNX Runtime: the same <c>Encode</c> as ViT22B's
/// <c>VisionTransformer</c> on float arrays, without TorchSharp or libtorch.
/// <code>
/// using var vit = OnnxVisionTransformer.Load("model.onnx");
/// var output = vit.Encode(pixels, new long[] { 1, 3, 224, 224 });   // output.Pooled, .PatchTokens, .Logits
/// </code>
/// The images are normalized as the model expects (<see cref="Mean"/>, <see cref="Std"/> from its metadata).
/// </summary>
public sealed class OnnxVisionTransformer : IDisposable
{
    private readonly InferenceSession _session;
    private readonly string[] _outputs;
    private readonly long[] _inputDims;
    private readonly ReaderWriterLockSlim _use = new();      // runs share it; Dispose waits for them and takes it alone
    private bool _disposed;
    private static readonly string[] OutputNames = { "features", "tokens", "logits" }, InputNames = { "images" };

    private OnnxVisionTransformer(InferenceSession session, string path, string provider)
    {
        _session = session;
        ExecutionProvider = provider;
        if (!session.InputMetadata.TryGetValue(InputNames[0], out var input) || input.ElementDataType != Microsoft.ML.OnnxRuntime.Tensors.TensorElementType.Float || input.Dimensions.Length != 4)
            throw new InvalidDataException($"ONNX model '{path}' is not a ViT22B export: it needs a float input 'images' [batch, C, H, W]; found inputs {Describe(session.InputMetadata)}.");
        foreach (var name in OutputNames[..2])   // features, tokens; logits only with a classifier
            if (!session.OutputMetadata.ContainsKey(name))
                throw new InvalidDataException($"ONNX model '{path}' is not a ViT22B export: it has no output '{name}'; found outputs {Describe(session.OutputMetadata)}.");
        _outputs = OutputNames.Where(session.OutputMetadata.ContainsKey).ToArray();
        if (_outputs.Any(o => session.OutputMetadata[o].ElementDataType != Microsoft.ML.OnnxRuntime.Tensors.TensorElementType.Float))
            throw new InvalidDataException($"ONNX model '{path}' is not a ViT22B export: its outputs must be float; found outputs {Describe(session.OutputMetadata)}.");
        _inputDims = input.Dimensions.Select(d => (long)d).ToArray();
        if (_inputDims[1] < 1)
            throw new InvalidDataException($"ONNX model '{path}' is not a ViT22B export: its input 'images' needs a fixed channel count; found inputs {Describe(session.InputMetadata)}.");
        Metadata = session.ModelMetadata.CustomMetadataMap;
        Channels = (int)_inputDims[1];
        ImageSize = _inputDims[2] > 0 && _inputDims[3] > 0 ? ((int)_inputDims[2], (int)_inputDims[3]) : null;
        if (Metadata.TryGetValue("config", out var config)) PatchSize = ParsePatchSize(config, path);
        if (Metadata.TryGetValue("preprocessing", out var json)) (Mean, Std) = ParseNormalization(json, path, Channels);
        if (session.OutputMetadata.TryGetValue("logits", out var logits) && logits.Dimensions.Length == 2 && logits.Dimensions[1] > 0) Classes = logits.Dimensions[1];
    }

    /// <summary>The model's metadata: <c>config</c> (ViT22B's config JSON), <c>preprocessing</c> (when exported with
    /// one), <c>weights</c>.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Input channels.</summary>
    public int Channels { get; }

    /// <summary>The input (height, width) the model takes, or null when it takes any multiple of its patch size.</summary>
    public (int Height, int Width)? ImageSize { get; }

    /// <summary>The patch size, from the <c>config</c> metadata (null when not stored); with a dynamic image size the
    /// height and width must be multiples of it, as the library requires.</summary>
    public int? PatchSize { get; }

    /// <summary>Classifier outputs, or null when the model has no classifier.</summary>
    public int? Classes { get; }

    /// <summary>Per-channel mean the pixels ([0, 1]) are normalized with, from the metadata (null when not stored); a
    /// model of other than 3 channels uses the mean of the stored RGB values for each channel, as the library's
    /// <c>Transforms.Normalize</c> does.</summary>
    public float[]? Mean { get; }

    /// <summary>Per-channel standard deviation, from the metadata (null when not stored).</summary>
    public float[]? Std { get; }

    /// <summary>"CPU" or "CUDA".</summary>
    public string ExecutionProvider { get; }

    /// <summary>Opens an exported model.</summary>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">The file is not an ONNX model (truncated, another format) or not one this
    /// library exported (the message names the file and what is missing).</exception>
    /// <exception cref="InvalidOperationException">ONNX Runtime's native library is missing.</exception>
    public static OnnxVisionTransformer Load(string path, OnnxRunnerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        options ??= new OnnxRunnerOptions();
        if (!File.Exists(path)) throw new FileNotFoundException($"ONNX model '{path}' does not exist.", path);
        if (options.Threads is < 1) throw new ArgumentOutOfRangeException(nameof(options), $"Threads must be at least 1, found {options.Threads}.");
        bool cuda;
        try
        {
            cuda = options.UseCuda && OrtEnv.Instance().GetAvailableProviders().Contains("CUDAExecutionProvider");
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or EntryPointNotFoundException)
        {
            throw NativeLibraryMissing(e);
        }
        string provider = cuda ? "CUDA" : "CPU";
        InferenceSession session;
        try
        {
            session = Open(path, options, cuda);
        }
        catch (OnnxRuntimeException) when (cuda)
        {
            provider = "CPU";
            // The GPU build without a usable GPU or CUDA libraries (the CUDA provider starts with the session): the CPU.
            session = Open(path, options, cuda: false);
        }
        try
        {
            return new OnnxVisionTransformer(session, path, provider);
        }
        catch
        {
            session.Dispose();
            throw;
        }
    }

    /// <summary>One pass over images [B, C, H, W] (row-major, normalized as the model expects).</summary>
    /// <exception cref="ArgumentException">The shape does not match the data's length or the model's input (named).</exception>
    /// <exception cref="ObjectDisposedException">The runner was disposed.</exception>
    public OnnxViTOutput Encode(float[] images, long[] shape)
    {
        _use.EnterReadLock();
        try
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            return Run(images, shape);
        }
        finally
        {
            _use.ExitReadLock();
        }
    }

    private OnnxViTOutput Run(float[] images, long[] shape)
    {
        ArgumentNullException.ThrowIfNull(images);
        ArgumentNullException.ThrowIfNull(shape);
        string Shape(IEnumerable<long> s) => "[" + string.Join(", ", s.Select(d => d < 0 ? "?" : d.ToString(CultureInfo.InvariantCulture))) + "]";
        if (shape.Length != 4 || shape.Any(d => d < 1))
            throw new ArgumentException($"Expected images [B, C, H, W] with positive sizes, found shape {Shape(shape)}.", nameof(shape));
        if (shape.Aggregate(1L, (a, n) => a * n) != images.LongLength)
            throw new ArgumentException($"Image data holds {images.LongLength} values, but shape {Shape(shape)} needs {shape.Aggregate(1L, (a, n) => a * n)}.", nameof(images));
        for (int i = 1; i < 4; i++)
            if (_inputDims[i] > 0 && shape[i] != _inputDims[i])
                throw new ArgumentException($"The model takes images {Shape(_inputDims)}, found {Shape(shape)}.", nameof(shape));
        if (ImageSize is null && PatchSize is int p && (shape[2] % p != 0 || shape[3] % p != 0))
            throw new ArgumentException($"The model takes images whose height and width are a multiple of the patch size {p}, found {Shape(shape)}.", nameof(shape));
        using var input = OrtValue.CreateTensorValueFromMemory(images, shape);
        using var run = new RunOptions();
        IDisposableReadOnlyCollection<OrtValue> results;
        try
        {
            results = _session.Run(run, InputNames, new[] { input }, _outputs);
        }
        catch (OnnxRuntimeException e)
        {
            throw new InvalidOperationException($"ONNX Runtime failed on images {Shape(shape)}: {e.Message}", e);
        }
        using (results)
        {
            OnnxArray Read(OrtValue v) => new(v.GetTensorDataAsSpan<float>().ToArray(), v.GetTensorTypeAndShape().Shape);
            var list = results.ToList();
            return new OnnxViTOutput(Read(list[0]), Read(list[1]), list.Count > 2 ? Read(list[2]) : null);
        }
    }

    /// <summary>Normalizes pixels in [0, 1] (layout [B, C, H, W]) in place with <see cref="Mean"/> and <see cref="Std"/>.</summary>
    /// <exception cref="InvalidOperationException">The model stores no preprocessing.</exception>
    public void Normalize(float[] pixels, long[] shape)
    {
        ArgumentNullException.ThrowIfNull(pixels);
        ArgumentNullException.ThrowIfNull(shape);
        if (Mean is null || Std is null) throw new InvalidOperationException("The model was exported without its preprocessing; normalize the pixels yourself.");
        if (shape.Length != 4 || shape[1] != Mean.Length || shape.Aggregate(1L, (a, n) => a * n) != pixels.LongLength)
            throw new ArgumentException($"Expected pixels [B, {Mean.Length}, H, W] matching the data's {pixels.LongLength} values.", nameof(shape));
        long plane = shape[2] * shape[3];
        for (long i = 0; i < pixels.LongLength; i++)
        {
            int ch = (int)(i / plane % shape[1]);
            pixels[i] = (pixels[i] - Mean[ch]) / Std[ch];
        }
    }

    /// <summary>Releases the session, after any <see cref="Encode"/> running on another thread has returned.</summary>
    public void Dispose()
    {
        _use.EnterWriteLock();
        try
        {
            if (_disposed) return;
            _disposed = true;
            _session.Dispose();
        }
        finally
        {
            _use.ExitWriteLock();
        }
    }

    private static InvalidOperationException NativeLibraryMissing(Exception e) =>
        new("ONNX Runtime's native library (libonnxruntime) cannot be loaded: reference Microsoft.ML.OnnxRuntime (CPU) or Microsoft.ML.OnnxRuntime.Gpu in the application.", e);

    private static InferenceSession Open(string path, OnnxRunnerOptions options, bool cuda)
    {
        SessionOptions created;
        try
        {
            created = new SessionOptions { GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL };
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or EntryPointNotFoundException)
        {
            throw NativeLibraryMissing(e);
        }
        using var so = created;
        if (options.Threads is int threads) so.IntraOpNumThreads = threads;
        if (cuda) so.AppendExecutionProvider_CUDA(options.CudaDevice);
        try
        {
            return new InferenceSession(path, so);
        }
        catch (OnnxRuntimeException e) when (!cuda)
        {
            throw new InvalidDataException($"ONNX model '{path}' cannot be loaded (truncated, or not an ONNX model): {e.Message}", e);
        }
    }

    private static string Describe(IReadOnlyDictionary<string, NodeMetadata> values) => values.Count == 0 ? "none"
        : string.Join(", ", values.Select(kv => $"'{kv.Key}' {kv.Value.ElementDataType} [{string.Join(", ", kv.Value.Dimensions)}]"));

    // The "patch_size" of ViT22B's config JSON.
    private static int ParsePatchSize(string json, string path) => ParseMetadata("config", json, path, root =>
    {
        int p = root.GetProperty("patch_size").GetInt32();
        return p >= 1 ? p : throw new FormatException($"patch_size must be positive, found {p}");
    });

    // One JSON metadata entry read by read; anything malformed is an InvalidDataException naming the file and the entry.
    private static T ParseMetadata<T>(string key, string json, string path, Func<JsonElement, T> read)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            return read(doc.RootElement);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            throw new InvalidDataException($"ONNX model '{path}': metadata '{key}' is malformed ({e.Message}).", e);
        }
    }

    // The "mean" and "std" of ViT22B's preprocessing JSON (RGB), per model channel.
    private static (float[], float[]) ParseNormalization(string json, string path, int channels) => ParseMetadata("preprocessing", json, path, root =>
    {
        float[] Triple(string name) => root.GetProperty(name).EnumerateArray().Select(e => (float)e.GetDouble()).ToArray();
        var (mean, std) = (Triple("mean"), Triple("std"));
        if (mean.Length != 3 || std.Length != 3 || std.Any(s => !(s > 0))) throw new FormatException("mean and std must have 3 entries (R, G, B), std positive");
        return channels == 3 ? (mean, std) : (Enumerable.Repeat(mean.Average(), channels).ToArray(), Enumerable.Repeat(std.Average(), channels).ToArray());
    });
}
