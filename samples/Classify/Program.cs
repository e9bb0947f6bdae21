// Classify: images (files or folders) + a checkpoint + a label file → the top-k labels with probabilities. The
// checkpoint is a training checkpoint (samples/TrainFashionMnist), any checkpoint the library loads (timm, Hugging Face,
// OpenCLIP, big_vision layouts; its config from --config or the file's metadata), or with --backend onnx an ONNX export.
// Images are fed as the checkpoint expects: --normalization if given, else the preprocessing stored in the checkpoint
// (or the ONNX model), else the timm name's, else big_vision's [-1, 1]; one-channel models (Fashion-MNIST's) get
// grayscale images.
//
//   dotnet run --project samples/TrainFashionMnist -c Release -- --export-test-images fmnist-samples
//   dotnet run --project samples/Classify -c Release -- --checkpoint fashion-mnist-vit.safetensors \
//       --labels fashion-mnist-vit.labels.txt fmnist-samples
//   # The same through ONNX Runtime, from an export of samples/ExportOnnx:
//   dotnet run --project samples/Classify -c Release -- --backend onnx --checkpoint fm.onnx --labels fashion-mnist-vit.labels.txt fmnist-samples
//   # A pretrained checkpoint with a classifier:
//   dotnet run --project samples/Classify -c Release -- --config vit_base_patch16_224 --checkpoint model.safetensors --labels imagenet.txt images
using System.CommandLine;
using Spectre.Console;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Imaging;
using ViT22B.Models;
using ViT22B.OnnxRuntime;
using static TorchSharp.torch;

var inputsArgument = new Argument<string[]>("inputs") { Description = "Image files or folders of images (JPEG, PNG, WebP, BMP, GIF).", Arity = ArgumentArity.OneOrMore };
var checkpointOption = new Option<FileInfo>("--checkpoint") { Description = "A training checkpoint (samples/TrainFashionMnist writes one), a checkpoint with a classifier in a layout the library loads (timm, Hugging Face, OpenCLIP, big_vision), or with --backend onnx an ONNX export (samples/ExportOnnx writes one).", Required = true };
var configOption = new Option<string?>("--config") { Description = "Preset, timm name or config JSON of a checkpoint that is not a training checkpoint (default: the config stored in its metadata, as samples/Features --save-weights writes it)." };
var backendOption = new Option<string>("--backend") { Description = "torch (this library) or onnx (ONNX Runtime on an exported model).", DefaultValueFactory = _ => "torch" };
var labelsOption = new Option<FileInfo>("--labels") { Description = "Label file: one class name per line, in class-index order.", Required = true };
var topKOption = new Option<int>("--top-k") { Description = "Labels shown per image.", DefaultValueFactory = _ => 3 }.AtLeast(1);
var normOption = new Option<PixelNormalization?>("--normalization") { Description = "Pixel normalization the model was trained with (default: the preprocessing stored in the checkpoint or ONNX model, else the --config timm name's, else MinusOneToOne)." };
var root = new RootCommand("Classify images with a trained ViT checkpoint and print the top-k labels with probabilities.")
{
    inputsArgument, checkpointOption, configOption, labelsOption, topKOption, normOption, backendOption,
};
root.SetAction(parse =>
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    var checkpoint = parse.GetValue(checkpointOption)!;
    var labelFile = parse.GetValue(labelsOption)!;
    int topK = parse.GetValue(topKOption);
    string? configArg = parse.GetValue(configOption);
    var files = parse.GetValue(inputsArgument)!.SelectMany(p => Directory.Exists(p)
            ? ImageTensors.ListImages(p) is { Count: > 0 } images ? images : throw new ArgumentException($"Input folder '{p}' holds no images (its subfolders are not searched).")
        : File.Exists(p) ? new[] { p } : throw new FileNotFoundException($"Input '{p}' is neither an image file nor a folder.", p)).ToList();
    if (files.Count == 0) throw new ArgumentException("No images found in the inputs.");

    string backend = parse.GetValue(backendOption)!;
    if (backend is not ("torch" or "onnx")) throw new ArgumentException($"--backend must be torch or onnx, found '{backend}'.");
    if (backend == "onnx" && configArg is not null) throw new ArgumentException("--config needs --backend torch: an ONNX export holds its own config.");
    if (!checkpoint.Exists && !Directory.Exists(checkpoint.FullName)) throw new FileNotFoundException($"Checkpoint '{checkpoint.FullName}' does not exist.", checkpoint.FullName);
    if (!labelFile.Exists) throw new FileNotFoundException($"Label file '{labelFile.FullName}' does not exist.", labelFile.FullName);
    var labels = File.ReadAllLines(labelFile.FullName).Where(l => l.Length > 0).ToArray();

    // The runner: the library's model (from a training checkpoint or any checkpoint it loads), or ONNX Runtime on an
    // export. Either maps a batch of one normalized image [1, C, H, W] to class probabilities.
    IReadOnlyDictionary<string, string>? checkpointMetadata = null;
    using var model = backend == "torch" ? CheckpointModel.Load(checkpoint.FullName, configArg, out checkpointMetadata) : null;
    using var onnx = backend == "onnx" ? OnnxVisionTransformer.Load(checkpoint.FullName) : null;
    model?.eval();
    int classes, channels, size;
    Func<Tensor, Tensor> probabilities;
    if (model is not null)
    {
        (classes, channels, size) = (model.Config.NumClasses, model.Config.InChans, model.Config.ImgSize);
        if (model.Config.ImgWidth is int w && w != size)
            throw new NotSupportedException($"Checkpoint '{checkpoint.FullName}' takes {size}×{w} images; Classify feeds square crops of the model's size.");
        if (classes == 0) throw new InvalidDataException($"Checkpoint '{checkpoint.FullName}' has no classifier (its config has num_classes 0); Classify needs one.");
        probabilities = x =>
        {
            using var inference = torch.inference_mode();
            return model.forward(x).softmax(-1)[0];
        };
    }
    else
    {
        // A dynamic-size export takes any size: feed it the size its config was built for, as the torch backend does.
        var (h, w) = onnx!.ImageSize ?? ConfigImageSize(onnx.Metadata, checkpoint.FullName);
        if (h != w)
            throw new NotSupportedException($"ONNX model '{checkpoint.FullName}' takes {h}×{w} images; Classify feeds square crops of the model's size.");
        (classes, channels, size) = (onnx.Classes ?? throw new InvalidDataException($"ONNX model '{checkpoint.FullName}' has no classifier (no output 'logits')."), onnx.Channels, h);
        probabilities = x =>
        {
            var output = onnx.Encode(x.contiguous().data<float>().ToArray(), x.shape);
            return torch.tensor(output.Logits!.Data).softmax(-1);
        };
    }
    if (labels.Length != classes)
        throw new InvalidDataException($"Label file '{labelFile.FullName}' names {labels.Length} classes, but checkpoint '{checkpoint.FullName}' has {classes}.");
    if (channels is not (1 or 3)) throw new NotSupportedException($"Checkpoint '{checkpoint.FullName}' takes {channels} input channels; Classify feeds RGB (3) or grayscale (1) images.");

    // The preprocessing: --normalization if given, else the checkpoint's own, else the timm name's, else big_vision's.
    Preprocessing? stored;
    try
    {
        stored = Preprocessing.FromMetadata(checkpointMetadata ?? onnx!.Metadata);
    }
    catch (FormatException e)
    {
        throw new InvalidDataException($"Checkpoint '{checkpoint.FullName}': metadata '{Preprocessing.MetadataKey}': {e.Message}", e);
    }
    var (preprocessing, from) = parse.GetValue(normOption) is PixelNormalization n ? (Preprocessing.FromNormalization(n), "--normalization")
        : stored is not null ? (stored, "the checkpoint's metadata")
        : configArg is not null && ViTConfig.TimmNames.Contains(configArg) ? (ViTConfig.TimmPreprocessing(configArg), $"timm name {configArg}")
        : (Preprocessing.FromNormalization(PixelNormalization.MinusOneToOne), "default (big_vision's [-1, 1])");
    Console.WriteLine($"Preprocessing ({from}): {preprocessing}{(channels == 1 ? ", grayscale" : "")}.");

    var table = new Table().Title($"Top-{Math.Min(topK, labels.Length)} predictions ({Path.GetFileName(checkpoint.FullName).EscapeMarkup()}, {backend})").AddColumns("image", "label", "probability");
    foreach (var file in files)
    {
        using var scope = torch.NewDisposeScope();
        var probs = probabilities(LoadImage(file, channels, size, preprocessing).unsqueeze(0));
        var (values, indices) = probs.topk(Math.Min(topK, labels.Length));
        var v = values.data<float>().ToArray();
        var ix = indices.data<long>().ToArray();
        for (int i = 0; i < v.Length; i++)
            table.AddRow(i == 0 ? Path.GetFileName(file).EscapeMarkup() : "", labels[ix[i]].EscapeMarkup(), $"{v[i]:P1}");
    }
    AnsiConsole.Write(table);
    return 0;
});
return SampleMain.Invoke(root, args);

// A training checkpoint (its format metadata says so) through TrainingCheckpoint; any other checkpoint through
// PretrainedCheckpoint, with the config from --config or the file's metadata. Float32 on the CPU.
// The image size a dynamic-size ONNX export was built for: its config's, from the export's metadata.
static (int Height, int Width) ConfigImageSize(IReadOnlyDictionary<string, string> metadata, string path)
{
    if (!metadata.TryGetValue(PretrainedCheckpoint.ConfigMetadataKey, out var json))
        throw new InvalidDataException($"ONNX model '{path}' takes images of any size and stores no config (metadata '{PretrainedCheckpoint.ConfigMetadataKey}') to say which size it was built for.");
    return ViTConfigJson.FromJson(json, path).ImageShape;
}

// One image as the model's input [C, size, size]: resized and cropped as the preprocessing says (squash or shorter side,
// crop percentage, filter), normalized with its mean and std. One-channel models get the grayscale image (ITU-R BT.601
// luma of the resized RGB), normalized with the means of the RGB statistics, as Transforms.Normalize does for one channel.
static Tensor LoadImage(string file, int channels, int size, Preprocessing preprocessing)
{
    if (channels == 3) return ImageTensors.Load(file, size, preprocessing);
    using var scope = torch.NewDisposeScope();
    var rng = new Random(0);
    var rgb = (preprocessing with { Mean = (0, 0, 0), Std = (1, 1, 1) }).EvalTransform(size)(ImageTensors.Decode(file), rng);
    // The weights as a tensor rather than C# numbers: TorchSharp 0.107 can free the Scalar an implicit conversion makes
    // while libtorch still reads it (docs/torchsharp-notes.md).
    float[] weights = [0.299f, 0.587f, 0.114f];
    var luma = torch.tensor(weights).view(3, 1, 1);
    var gray = (rgb * luma).sum(0, keepdim: true);
    return Transforms.Normalize(preprocessing.Mean, preprocessing.Std)(gray, rng).MoveToOuterDisposeScope();
}
