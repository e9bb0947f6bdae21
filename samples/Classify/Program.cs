// Classify: images (files or folders) + a training checkpoint + a label file → the top-k labels with probabilities.
//
//   dotnet run --project samples/TrainFashionMnist -c Release -- --export-test-images fmnist-samples
//   dotnet run --project samples/Classify -c Release -- --checkpoint fashion-mnist-vit.safetensors \
//       --labels fashion-mnist-vit.labels.txt fmnist-samples
using System.CommandLine;
using Spectre.Console;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Imaging;
using ViT22B.Training;
using static TorchSharp.torch;

var inputsArgument = new Argument<string[]>("inputs") { Description = "Image files or folders of images (JPEG, PNG, WebP, BMP, GIF).", Arity = ArgumentArity.OneOrMore };
var checkpointOption = new Option<FileInfo>("--checkpoint") { Description = "Training checkpoint (samples/TrainFashionMnist writes one).", Required = true };
var labelsOption = new Option<FileInfo>("--labels") { Description = "Label file: one class name per line, in class-index order.", Required = true };
var topKOption = new Option<int>("--top-k") { Description = "Labels shown per image.", DefaultValueFactory = _ => 3 }.AtLeast(1);
var normOption = new Option<PixelNormalization>("--normalization") { Description = "Pixel normalization the model was trained with.", DefaultValueFactory = _ => PixelNormalization.MinusOneToOne };
var root = new RootCommand("Classify images with a trained ViT checkpoint and print the top-k labels with probabilities.")
{
    inputsArgument, checkpointOption, labelsOption, topKOption, normOption,
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

    var config = TrainingCheckpoint.ReadConfig(checkpoint.FullName);
    if (!labelFile.Exists) throw new FileNotFoundException($"Label file '{labelFile.FullName}' does not exist.", labelFile.FullName);
    var labels = File.ReadAllLines(labelFile.FullName).Where(l => l.Length > 0).ToArray();
    if (labels.Length != config.NumClasses)
        throw new InvalidDataException($"Label file '{labelFile.FullName}' names {labels.Length} classes, but checkpoint '{checkpoint.FullName}' has {config.NumClasses}.");
    using var model = TrainingCheckpoint.LoadModel(checkpoint.FullName, torch.CPU, ScalarType.Float32);
    model.eval();

    // The model's input: its image size, and grayscale (ITU-R BT.601 luma) for one-channel models such as Fashion-MNIST's.
    var resize = Transforms.Compose(Transforms.ResizeShorterSide(config.ImgSize), Transforms.CenterCrop(config.ImgSize));
    var normalize = Transforms.Normalize(parse.GetValue(normOption));
    var table = new Table().Title($"Top-{Math.Min(topK, labels.Length)} predictions ({Path.GetFileName(checkpoint.FullName).EscapeMarkup()})").AddColumns("image", "label", "probability");
    foreach (var file in files)
    {
        using var scope = torch.NewDisposeScope();
        var rng = new Random(0);
        var x = resize(ImageTensors.Decode(file), rng);
        if (config.InChans == 1) x = (x[0] * 0.299 + x[1] * 0.587 + x[2] * 0.114).unsqueeze(0);
        else if (config.InChans != 3) throw new NotSupportedException($"Models with {config.InChans} input channels take no images.");
        Tensor probs;
        using (torch.inference_mode()) probs = model.forward(normalize(x, rng).unsqueeze(0)).softmax(-1)[0];
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
