// Features: run a ViT from a config (preset or JSON) and safetensors weights over a folder of images or a
// safetensors file of images, and write features/tokens/logits as safetensors.
//
//   dotnet run --project samples/Features -- --config <preset|timm name|file.json> [--weights <file.safetensors>]
//       --input <dir|file.safetensors> --output <file.safetensors>
using System.CommandLine;
using System.Text.Json;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Data;
using ViT22B.Imaging;
using ViT22B.Interop;
using ViT22B.Models;
using static TorchSharp.torch;

var configOption = new Option<string>("--config") { Description = "Preset (e.g. B/16, 22B/14, So400m/14), timm model name (e.g. vit_so400m_patch14_siglip_224) or a config JSON file.", Required = true };
var weightsOption = new Option<FileInfo?>("--weights") { Description = "Safetensors weights with timm keys; without it a seeded random init is used." };
var inputOption = new Option<string>("--input") { Description = "A folder of images, or a safetensors file holding 'images' [N, C, H, W] float32.", Required = true };
var outputOption = new Option<FileInfo>("--output") { Description = "Safetensors file to write: 'features' [N, D], 'tokens' [N, T, D] and, with a classifier, 'logits' [N, C].", Required = true };
var seedOption = new Option<long>("--seed") { Description = "Seed of the random init (used without --weights).", DefaultValueFactory = _ => 0 };
var batchOption = new Option<int>("--batch-size") { Description = "Images per forward pass.", DefaultValueFactory = _ => 16 };
var deviceOption = new Option<string>("--device") { Description = "cpu or cuda[:N].", DefaultValueFactory = _ => "cpu" };
var dtypeOption = new Option<string?>("--dtype") { Description = "float32, bfloat16, float16 or float64 (default: the config's dtype)." };
var normOption = new Option<PixelNormalization>("--normalization") { Description = "Pixel normalization for image folders: MinusOneToOne (big_vision) or ImageNet (timm).", DefaultValueFactory = _ => PixelNormalization.MinusOneToOne };
var root = new RootCommand("Extract ViT features (pooled embedding, patch tokens, logits) into a safetensors file.")
{
    configOption, weightsOption, inputOption, outputOption, seedOption, batchOption, deviceOption, dtypeOption, normOption,
};
root.SetAction(parse =>
{
    try
    {
        Run(parse.GetValue(configOption)!, parse.GetValue(weightsOption), parse.GetValue(inputOption)!, parse.GetValue(outputOption)!,
            parse.GetValue(seedOption), Math.Max(1, parse.GetValue(batchOption)), parse.GetValue(deviceOption)!, parse.GetValue(dtypeOption), parse.GetValue(normOption));
        return 0;
    }
    catch (Exception e) when (e is ArgumentException or FormatException or IOException or InvalidOperationException or InsufficientMemoryException)
    {
        Console.Error.WriteLine($"error: {e.Message}");
        return 1;
    }
});
return root.Parse(args).Invoke();

static void Run(string configArg, FileInfo? weights, string input, FileInfo output, long seed, int batchSize, string deviceArg, string? dtypeArg, PixelNormalization norm)
{
    var config = File.Exists(configArg) ? ViTConfigJson.Load(configArg)
        : ViTConfig.TimmNames.Contains(configArg) ? ViTConfig.FromTimm(configArg)
        : ViTConfig.Parse(configArg);
    var dtype = dtypeArg is null ? config.DType : ViTConfigJson.ParseDType(dtypeArg);
    var device = new Device(deviceArg);
    using var images = LoadInput(input, config, norm, out var names);
    if (device.type == DeviceType.CPU) ModelAccounting.EnsureFitsInHostMemory(config, dtype);
    torch.manual_seed(seed);
    if (device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(seed);
    using var model = new VisionTransformer(config, device, dtype);
    model.eval();
    if (weights is not null)
    {
        var report = SafetensorsCheckpoint.Load(model, weights.FullName);
        Console.WriteLine($"Loaded {report.Loaded.Count} tensors from {weights.FullName}.");
    }
    else Console.WriteLine($"No --weights: random init with seed {seed}.");

    long n = images.shape[0];
    var features = new List<Tensor>();
    var tokens = new List<Tensor>();
    var logits = new List<Tensor>();
    for (long start = 0; start < n; start += batchSize)
    {
        using var inference = torch.inference_mode();
        using var scope = torch.NewDisposeScope();
        var batch = images.narrow(0, start, Math.Min(batchSize, n - start)).to(device).to(dtype);
        using var o = model.Encode(batch);
        features.Add(o.Pooled.to(ScalarType.Float32).cpu().MoveToOuterDisposeScope());
        tokens.Add(o.PatchTokens.to(ScalarType.Float32).cpu().MoveToOuterDisposeScope());
        if (o.Logits is not null) logits.Add(o.Logits.to(ScalarType.Float32).cpu().MoveToOuterDisposeScope());
    }
    var result = new Dictionary<string, Tensor> { ["features"] = torch.cat(features, 0), ["tokens"] = torch.cat(tokens, 0) };
    if (logits.Count > 0) result["logits"] = torch.cat(logits, 0);
    var metadata = new Dictionary<string, string>
    {
        ["config"] = ViTConfigJson.ToJson(config),
        ["weights"] = weights?.FullName ?? $"random init, seed {seed}",
        ["inputs"] = JsonSerializer.Serialize(names),
    };
    Safetensors.Save(result, output.FullName, metadata);
    Console.WriteLine($"Wrote {output.FullName}: " + string.Join(", ", result.Select(kv => $"{kv.Key} [{string.Join(", ", kv.Value.shape)}]")));
    foreach (var t in result.Values.Concat(features).Concat(tokens).Concat(logits)) t.Dispose();
}

static Tensor LoadInput(string input, ViTConfig config, PixelNormalization norm, out string[] names)
{
    if (Directory.Exists(input))
    {
        var files = ImageTensors.ListImages(input);
        if (files.Count == 0) throw new IOException($"No images (jpg, png, webp, bmp, gif) in folder '{input}'.");
        names = files.Select(Path.GetFileName).ToArray()!;
        return ImageTensors.LoadBatch(files, config.ImgSize, norm);
    }
    if (!File.Exists(input)) throw new IOException($"Input '{input}' is neither a folder nor a file.");
    using var reader = SafetensorsReader.Open(input);
    if (!reader.Contains("images"))
        throw new ArgumentException($"Safetensors input '{input}' has no tensor 'images'; found: {string.Join(", ", reader.Entries.Select(e => e.Name))}.");
    var entry = reader["images"];
    if (entry.Shape.Length != 4 || entry.ScalarType != ScalarType.Float32)
        throw new ArgumentException($"Safetensors input '{input}': 'images' must be float32 [N, C, H, W], found {entry.DType} [{string.Join(", ", entry.Shape)}].");
    names = Enumerable.Range(0, (int)entry.Shape[0]).Select(i => $"images[{i}]").ToArray();
    return reader.Read("images");
}
