// Classify: images (files or folders) + a training checkpoint + a label file → the top-k labels with probabilities.
//
//   dotnet run --project samples/TrainFashionMnist -c Release -- --export-test-images fmnist-samples
//   dotnet run --project samples/Classify -c Release -- --checkpoint fashion-mnist-vit.safetensors \
//       --labels fashion-mnist-vit.labels.txt fmnist-samples
//   # The same through ONNX Runtime, from an export of samples/ExportOnnx:
//   dotnet run --project samples/Classify -c Release -- --backend onnx --checkpoint fm.onnx --labels fashion-mnist-vit.labels.txt fmnist-samples
using System.CommandLine;
using Spectre.Console;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Imaging;
using ViT22B.OnnxRuntime;
using ViT22B.Training;
using static TorchSharp.torch;

var inputsArgument = new Argument<string[]>("inputs") { Description = "Image files or folders of images (JPEG, PNG, WebP, BMP, GIF).", Arity = ArgumentArity.OneOrMore };
var checkpointOption = new Option<FileInfo>("--checkpoint") { Description = "Training checkpoint (samples/TrainFashionMnist writes one), or with --backend onnx an ONNX export (samples/ExportOnnx writes one).", Required = true };
var backendOption = new Option<string>("--backend") { Description = "torch (this library) or onnx (ONNX Runtime on an exported model).", DefaultValueFactory = _ => "torch" };
var labelsOption = new Option<FileInfo>("--labels") { Description = "Label file: one class name per line, in class-index order.", Required = true };
var topKOption = new Option<int>("--top-k") { Description = "Labels shown per image.", DefaultValueFactory = _ => 3 }.AtLeast(1);
var normOption = new Option<PixelNormalization?>("--normalization") { Description = "Pixel normalization the model was trained with (default: an ONNX model's stored preprocessing, else MinusOneToOne)." };
var root = new RootCommand("Classify images with a trained ViT checkpoint and print the top-k labels with probabilities.")
{
    inputsArgument, checkpointOption, labelsOption, topKOption, normOption, backendOption,
};
root.SetAction(parse =>
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    var checkpoint = parse.GetValue(checkpointOption)!;
    var labelFile = parse.GetValue(labelsOption)!;
    int topK = parse.GetValue(topKOption);
    var files = parse.GetValue(inputsArgument)!.SelectMany(p => Directory.Exists(p) ? ImageTensors.ListImages(p)
        : File.Exists(p) ? new[] { p } : throw new FileNotFoundException($"Input '{p}' is neither an image file nor a folder.", p)).ToList();
    if (files.Count == 0) throw new ArgumentException("No images found in the inputs.");

    string backend = parse.GetValue(backendOption)!;
    if (backend is not ("torch" or "onnx")) throw new ArgumentException($"--backend must be torch or onnx, found '{backend}'.");
    if (!checkpoint.Exists) throw new FileNotFoundException($"Checkpoint '{checkpoint.FullName}' does not exist.", checkpoint.FullName);
    if (!labelFile.Exists) throw new FileNotFoundException($"Label file '{labelFile.FullName}' does not exist.", labelFile.FullName);
    var labels = File.ReadAllLines(labelFile.FullName).Where(l => l.Length > 0).ToArray();

    // The runner: the library's model from a training checkpoint, or ONNX Runtime on an export. Either maps a batch of
    // one normalized image [1, C, H, W] to class probabilities.
    using var model = backend == "torch" ? TrainingCheckpoint.LoadModel(checkpoint.FullName, torch.CPU, ScalarType.Float32) : null;
    using var onnx = backend == "onnx" ? OnnxVisionTransformer.Load(checkpoint.FullName) : null;
    model?.eval();
    int classes, channels, size;
    ImageTransform normalize;
    Func<Tensor, Tensor> probabilities;
    if (model is not null)
    {
        (classes, channels, size) = (model.Config.NumClasses, model.Config.InChans, model.Config.ImgSize);
        normalize = Transforms.Normalize(parse.GetValue(normOption) ?? PixelNormalization.MinusOneToOne);
        probabilities = x =>
        {
            using var inference = torch.inference_mode();
            return model.forward(x).softmax(-1)[0];
        };
    }
    else
    {
        if (onnx!.ImageSize is not var (h, w) || h != w)
            throw new NotSupportedException($"ONNX model '{checkpoint.FullName}' takes images of any size or non-square ones; Classify feeds square crops of the model's size.");
        (classes, channels, size) = (onnx.Classes ?? throw new InvalidDataException($"ONNX model '{checkpoint.FullName}' has no classifier (no output 'logits')."), onnx.Channels, h);
        normalize = parse.GetValue(normOption) is PixelNormalization n ? Transforms.Normalize(n)
            : onnx.Mean is { Length: 3 } m && onnx.Std is { Length: 3 } s ? Transforms.Normalize((m[0], m[1], m[2]), (s[0], s[1], s[2]))
            : Transforms.Normalize(PixelNormalization.MinusOneToOne);
        probabilities = x =>
        {
            var output = onnx.Encode(x.contiguous().data<float>().ToArray(), x.shape);
            return torch.tensor(output.Logits!.Data).softmax(-1);
        };
    }
    if (labels.Length != classes)
        throw new InvalidDataException($"Label file '{labelFile.FullName}' names {labels.Length} classes, but checkpoint '{checkpoint.FullName}' has {classes}.");

    // The model's input: its image size, and grayscale (ITU-R BT.601 luma) for one-channel models such as Fashion-MNIST's.
    var resize = Transforms.Compose(Transforms.ResizeShorterSide(size), Transforms.CenterCrop(size));
    var table = new Table().Title($"Top-{Math.Min(topK, labels.Length)} predictions ({Path.GetFileName(checkpoint.FullName).EscapeMarkup()}, {backend})").AddColumns("image", "label", "probability");
    foreach (var file in files)
    {
        using var scope = torch.NewDisposeScope();
        var rng = new Random(0);
        var x = resize(ImageTensors.Decode(file), rng);
        if (channels == 1) x = (x[0] * 0.299 + x[1] * 0.587 + x[2] * 0.114).unsqueeze(0);
        else if (channels != 3) throw new NotSupportedException($"Models with {channels} input channels take no images.");
        var probs = probabilities(normalize(x, rng).unsqueeze(0));
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
