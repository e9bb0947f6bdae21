// Features: run a ViT from a config (preset, timm name or JSON) and a checkpoint (timm, Hugging Face, OpenCLIP or
// big_vision layout) over a folder of images or a safetensors file of images, and write features/tokens/logits (and,
// with --layers, intermediate block outputs) as safetensors. Images are fed as the checkpoint's home library feeds
// them: the preprocessing stored in the checkpoint, else the timm name's, else --normalization.
//
//   dotnet run --project samples/Features -- --config <preset|timm name|file.json> [--weights <checkpoint>]
//       --input <dir|file.safetensors> --output <file.safetensors> [--img-size N] [--num-classes N [--reset-head]]
//       [--layers 4|0,5,-1] [--backend onnx]
using System.CommandLine;
using System.Text.Json;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Data;
using ViT22B.Imaging;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Onnx;
using ViT22B.OnnxRuntime;
using static TorchSharp.torch;

var configOption = new Option<string>("--config") { Description = "Preset (e.g. B/16, 22B/14, So400m/14), timm model name (e.g. vit_so400m_patch14_siglip_224) or a config JSON file.", Required = true };
var weightsOption = new Option<string?>("--weights") { Description = "Checkpoint: a .safetensors file (timm, Hugging Face, OpenCLIP keys), a Hugging Face model folder or *.index.json, or a big_vision .npz; without it a seeded random init is used." };
var inputOption = new Option<string>("--input") { Description = "A folder of images, or a safetensors file holding 'images' [N, C, H, W] float32.", Required = true };
var outputOption = new Option<FileInfo>("--output") { Description = "Safetensors file to write: 'features' [N, D], 'tokens' [N, T, D], with a classifier 'logits' [N, C], with --layers 'layers.<i>' [N, T, D].", Required = true };
var seedOption = new Option<long>("--seed") { Description = "Seed of the random init (used without --weights).", DefaultValueFactory = _ => 0 };
var batchOption = new Option<int>("--batch-size") { Description = "Images per forward pass.", DefaultValueFactory = _ => 16 }.AtLeast(1);
var deviceOption = SampleMain.DeviceOption();
var dtypeOption = new Option<string?>("--dtype") { Description = "float32, bfloat16, float16 or float64 (default: the config's dtype)." };
var normOption = new Option<PixelNormalization?>("--normalization") { Description = "Override the checkpoint's preprocessing for image folders: MinusOneToOne (big_vision) or ImageNet (shorter side, center crop)." };
var imgSizeOption = new Option<int?>("--img-size") { Description = "Run at this image size instead of the config's (the position embedding is resampled at load)." };
var layersOption = new Option<string?>("--layers") { Description = "Also write block outputs (patch tokens, before the final norm): a count n for the last n blocks, or block indices such as 0,5,-1." };
var numClassesOption = new Option<int?>("--num-classes") { Description = "Build the model with this many classes instead of the config's (0: no classifier); with --reset-head a checkpoint's classifier of another class count is replaced by a freshly initialised one." };
var resetHeadOption = new Option<bool>("--reset-head") { Description = "Load a checkpoint whose classifier has another class count (or none), keeping a freshly initialised one." };
var resizePatchOption = new Option<bool>("--resize-patch-embed") { Description = "Load a checkpoint of another patch size, resizing its patch embedding (FlexiViT)." };
var resampleOption = new Option<ResampleFilter>("--resample") { Description = "How the position and patch embeddings are resampled at load: BicubicAntialiased (timm's default) or Bilinear (timm's choice for FlexiViT checkpoints).", DefaultValueFactory = _ => ResampleFilter.BicubicAntialiased };
var backendOption = new Option<string>("--backend") { Description = "torch (this library) or onnx (the model exported to ONNX and run by ONNX Runtime; no --layers)." , DefaultValueFactory = _ => "torch" };
var saveWeightsOption = new Option<FileInfo?>("--save-weights") { Description = "Also write the model that ran (timm keys, at the image size it ran at, with its config and preprocessing in the metadata): converts a Hugging Face, OpenCLIP or big_vision checkpoint into this library's layout." };
var root = new RootCommand("Extract ViT features (pooled embedding, patch tokens, logits, block outputs) into a safetensors file.")
{
    configOption, weightsOption, inputOption, outputOption, seedOption, batchOption, deviceOption, dtypeOption, normOption,
    imgSizeOption, layersOption, numClassesOption, resetHeadOption, resizePatchOption, resampleOption, saveWeightsOption, backendOption,
};
imgSizeOption.Validators.Add(r =>
{
    if (r.GetValueOrDefault<int?>() is int v && v < 1) r.AddError($"--img-size must be positive, found {v}.");
});
numClassesOption.Validators.Add(r =>
{
    if (r.GetValueOrDefault<int?>() is int v && v < 0) r.AddError($"--num-classes must be 0 or more, found {v}.");
});
root.SetAction(parse =>
{
    var options = new PretrainedLoadOptions { ResetHead = parse.GetValue(resetHeadOption), ResizePatchEmbed = parse.GetValue(resizePatchOption), Resampling = parse.GetValue(resampleOption) };
    Run(parse.GetValue(configOption)!, parse.GetValue(weightsOption), parse.GetValue(inputOption)!, parse.GetValue(outputOption)!,
        parse.GetValue(seedOption), parse.GetValue(batchOption), parse.GetValue(deviceOption)!, parse.GetValue(dtypeOption), parse.GetValue(normOption),
        parse.GetValue(imgSizeOption), parse.GetValue(numClassesOption), parse.GetValue(layersOption), options, parse.GetValue(saveWeightsOption), parse.GetValue(backendOption)!);
    return 0;
});
return SampleMain.Invoke(root, args);

static void Run(string configArg, string? weights, string input, FileInfo output, long seed, int batchSize, string deviceArg, string? dtypeArg,
    PixelNormalization? norm, int? imgSize, int? numClasses, string? layersArg, PretrainedLoadOptions loadOptions, FileInfo? saveWeights, string backend)
{
    if (backend is not ("torch" or "onnx")) throw new ArgumentException($"--backend must be torch or onnx, found '{backend}'.");
    SampleMain.CheckOutput(output, "--output", weights, input);
    SampleMain.CheckOutput(saveWeights, "--save-weights", weights, input);
    if (saveWeights is not null && saveWeights.FullName == output.FullName) throw new ArgumentException("--save-weights and --output name the same file.");
    if (backend == "onnx" && layersArg is not null) throw new ArgumentException("--layers needs --backend torch: the ONNX export has the features, tokens and logits outputs only.");
    bool timmName = ViTConfig.TimmNames.Contains(configArg);
    var config = CheckpointModel.Config(configArg);
    if (imgSize is int size) config = (config with { ImgSize = size }).Validate();
    if (numClasses is int classes) config = (config with { NumClasses = classes }).Validate();
    if (weights is not null)
    {
        // The activation and norm ε the checkpoint's home library computes with (Hugging Face: its config.json).
        config = PretrainedCheckpoint.MatchHome(config, weights, out var changes);
        foreach (var change in changes) Console.WriteLine($"Config matched to the checkpoint's home: {change}.");
    }
    var dtype = dtypeArg is null ? config.DType : ViTConfigJson.ParseDType(dtypeArg);
    var device = SampleMain.Device(deviceArg);
    int[]? layers = layersArg is null ? null : ParseLayers(layersArg, config.Depth);

    // The preprocessing: --normalization if given, else the checkpoint's own, else the timm name's, else big_vision's.
    // The checkpoint is opened once: its metadata gives the preprocessing, its tensors the weights.
    using var source = weights is null ? null : TensorSources.Open(weights);
    var stored = source is null ? null : Preprocessing.FromMetadata(source.Metadata);
    var (preprocessing, from) = norm is PixelNormalization n ? (Preprocessing.FromNormalization(n), "--normalization")
        : stored is not null ? (stored, "the checkpoint's metadata")
        : timmName ? (ViTConfig.TimmPreprocessing(configArg), $"timm name {configArg}")
        : (Preprocessing.FromNormalization(PixelNormalization.MinusOneToOne), "default (big_vision's [-1, 1])");
    using var images = OpenInput(input, config, preprocessing);
    var names = images.Names;
    if (Directory.Exists(input)) Console.WriteLine($"Preprocessing ({from}): {preprocessing}.");
    if (device.type == DeviceType.CPU) ModelAccounting.EnsureFitsInHostMemory(config, dtype);
    torch.manual_seed(seed);
    if (device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(seed);
    using var model = new VisionTransformer(config, device, dtype);
    model.eval();
    if (source is not null)
    {
        var report = PretrainedCheckpoint.Load(model, source, loadOptions);
        Console.WriteLine($"Loaded {report.Loaded.Count + report.Converted.Count + report.Resampled.Count} tensors from {weights} ({report.Layout} layout).");
        foreach (var note in report.Resampled) Console.WriteLine($"  resampled {note}");
        foreach (var note in report.Reinitialized) Console.WriteLine($"  re-initialised {note}");
        if (report.Skipped.Count > 0) Console.WriteLine($"  skipped {report.Skipped.Count} checkpoint tensors ({report.Skipped[0].Note}{(report.Skipped.Count > 1 ? ", …" : "")})");
    }
    else Console.WriteLine($"No --weights: random init with seed {seed}.");

    // --backend onnx: the same weights exported to ONNX (float32) and run by ONNX Runtime.
    using var onnx = backend == "onnx" ? ExportAndLoad(model, preprocessing, device.type == DeviceType.CUDA) : null;
    if (onnx is not null) Console.WriteLine($"Running on ONNX Runtime ({onnx.ExecutionProvider}).");
    // One batch of images in memory at a time; each output is allocated once at its full size [N, …] and filled batch
    // by batch (it is the result), then written one at a time.
    long count = names.Length;
    var outputs = new Dictionary<string, Tensor>();
    long at = 0;
    void Add(string key, Tensor t)
    {
        if (!outputs.TryGetValue(key, out var all))
            outputs[key] = all = torch.empty(t.shape.Select((d, i) => i == 0 ? count : d).ToArray(), dtype: ScalarType.Float32).DetachFromDisposeScope();
        using var slice = all.narrow(0, at, t.shape[0]);
        slice.copy_(t);
    }
    for (long start = 0; start < count; start += batchSize)
    {
        at = start;
        using var inference = torch.inference_mode();
        using var scope = torch.NewDisposeScope();
        if (onnx is not null)
        {
            var pixels = images.Batch(start, Math.Min(batchSize, count - start));
            var r = onnx.Encode(pixels.data<float>().ToArray(), pixels.shape);
            Add("features", torch.tensor(r.Pooled.Data).reshape(r.Pooled.Shape));
            Add("tokens", torch.tensor(r.PatchTokens.Data).reshape(r.PatchTokens.Shape));
            if (r.Logits is not null) Add("logits", torch.tensor(r.Logits.Data).reshape(r.Logits.Shape));
            continue;
        }
        var batch = images.Batch(start, Math.Min(batchSize, count - start)).to(device).to(dtype);
        using var o = model.Encode(batch);
        Add("features", o.Pooled);
        Add("tokens", o.PatchTokens);
        if (o.Logits is not null) Add("logits", o.Logits);
        if (layers is null) continue;
        foreach (var block in model.ForwardIntermediates(batch, layers)) Add($"layers.{block.Block}", block.Tokens);
    }
    var layout = outputs.Select(kv => (kv.Key, ScalarType.Float32, kv.Value.shape)).ToList();
    var metadata = new Dictionary<string, string>
    {
        ["config"] = ViTConfigJson.ToJson(config),
        ["weights"] = weights ?? $"random init, seed {seed}",
        ["backend"] = backend,
        ["inputs"] = JsonSerializer.Serialize(names),
        [Preprocessing.MetadataKey] = preprocessing.ToJson(),
    };
    Safetensors.SaveStreamed(output.FullName, layout, emit =>
    {
        foreach (var (key, all) in outputs)
        {
            emit(key, all);
            all.Dispose();      // each output goes once it is written
        }
    }, metadata);
    Console.WriteLine($"Wrote {output.FullName}: " + string.Join(", ", layout.Select(l => $"{l.Key} [{string.Join(", ", l.Item3)}]")));

    if (saveWeights is null) return;
    PretrainedCheckpoint.Save(model, saveWeights.FullName, preprocessing);
    Console.WriteLine($"Wrote the model's weights to {saveWeights.FullName} (timm keys, {config.ImgSize} px).");
}

// The model exported to a temporary file, which is gone once ONNX Runtime has read it.
static OnnxVisionTransformer ExportAndLoad(VisionTransformer model, Preprocessing preprocessing, bool cuda)
{
    string folder = Directory.CreateTempSubdirectory("vit22b-features-").FullName;
    try
    {
        string path = Path.Combine(folder, "model.onnx");
        OnnxExport.Save(model, path, new OnnxExportOptions { Preprocessing = preprocessing });
        return OnnxVisionTransformer.Load(path, new OnnxRunnerOptions { Threads = torch.get_num_threads(), UseCuda = cuda });
    }
    finally
    {
        Directory.Delete(folder, recursive: true);
    }
}

// "4" → the last 4 blocks; "0,5,-1" → those blocks (negative from the end).
static int[] ParseLayers(string text, int depth)
{
    var parts = text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
    if (parts.Length == 0 || parts.Any(p => !int.TryParse(p, out _)))
        throw new ArgumentException($"--layers must be a count or comma-separated block indices, found '{text}'.");
    var values = parts.Select(int.Parse).ToArray();
    if (values.Length == 1 && values[0] > 0 && !text.Contains(',', StringComparison.Ordinal))
    {
        int n = values[0];
        if (n > depth) throw new ArgumentException($"--layers {n}: the model has only {depth} blocks.");
        return Enumerable.Range(depth - n, n).ToArray();
    }
    foreach (int i in values)
        if (i < -depth || i >= depth) throw new ArgumentException($"--layers: block {i} is outside the model's {depth} blocks.");
    return values;
}

// The input, read one batch at a time: images decoded from a folder, or slices of a safetensors file's 'images' copied
// out of its memory mapping.
static Input OpenInput(string input, ViTConfig config, Preprocessing preprocessing)
{
    if (Directory.Exists(input))
    {
        if (config.ImgWidth is int w && w != config.ImgSize)
            throw new ArgumentException($"Image folders are fed square crops; the config's images are {config.ImgSize}×{w}. Pass a safetensors file of 'images' [N, C, {config.ImgSize}, {w}] instead.");
        var files = ImageTensors.ListImages(input);
        if (files.Count == 0) throw new IOException($"No images (jpg, png, webp, bmp, gif) in folder '{input}'.");
        return new Input(files.Select(Path.GetFileName).ToArray()!, (start, n) => ImageTensors.LoadBatch(files.Skip((int)start).Take((int)n), config.ImgSize, preprocessing), null);
    }
    if (!File.Exists(input)) throw new IOException($"Input '{input}' is neither a folder nor a file.");
    var reader = SafetensorsReader.Open(input);
    try
    {
        if (!reader.Contains("images"))
            throw new ArgumentException($"Safetensors input '{input}' has no tensor 'images'; found: {string.Join(", ", reader.Entries.Select(e => e.Name))}.");
        var entry = reader["images"];
        if (entry.Shape.Length != 4 || entry.ScalarType != ScalarType.Float32)
            throw new ArgumentException($"Safetensors input '{input}': 'images' must be float32 [N, C, H, W], found {entry.DType} [{string.Join(", ", entry.Shape)}].");
        var names = Enumerable.Range(0, (int)entry.Shape[0]).Select(i => $"images[{i}]").ToArray();
        return new Input(names, (start, n) => reader.ReadSlice("images", 0, new[] { (start, n) }), reader);
    }
    catch
    {
        reader.Dispose();
        throw;
    }
}

// A sample's input: the name of each image, and batches of them [n, C, H, W] float32 on the CPU.
internal sealed record Input(string[] Names, Func<long, long, Tensor> Batch, IDisposable? Owner) : IDisposable
{
    public void Dispose() => Owner?.Dispose();
}
