// LinearProbe: the paper's headline evaluation. Freeze a trained backbone, extract its pooled features, train only
// a linear classifier on them, and compare the probe's test accuracy with the fully trained model's (and with the
// same probe on a randomly initialized backbone of the same shape).
//
//   dotnet run --project samples/TrainFashionMnist -c Release          # writes fashion-mnist-vit.safetensors
//   dotnet run --project samples/LinearProbe -c Release -- --checkpoint fashion-mnist-vit.safetensors
using System.CommandLine;
using System.Diagnostics;
using Spectre.Console;
using TorchSharp;
using ViT22B.Data;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

var checkpointOption = new Option<FileInfo>("--checkpoint") { Description = "Training checkpoint of a Fashion-MNIST model (from samples/TrainFashionMnist).", DefaultValueFactory = _ => new FileInfo("fashion-mnist-vit.safetensors") };
var dataOption = new Option<DirectoryInfo>("--data") { Description = "Folder with the Fashion-MNIST IDX files.", DefaultValueFactory = _ => new DirectoryInfo("/usr/share/datasets/fashion-mnist") };
var epochsOption = new Option<int>("--epochs") { Description = "Epochs of the linear classifier over the cached features.", DefaultValueFactory = _ => 30 }.AtLeast(1);
var lrOption = new Option<double>("--lr") { Description = "Peak learning rate of the linear classifier.", DefaultValueFactory = _ => 1e-2 }.Positive();
var randomOption = new Option<bool>("--random-baseline") { Description = "Also probe a randomly initialized backbone of the same config.", DefaultValueFactory = _ => true };
var trainLimitOption = new Option<int>("--train-limit") { Description = "Use only the first N training images (0 = all).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var testLimitOption = new Option<int>("--test-limit") { Description = "Use only the first N test images (0 = all).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var root = new RootCommand("Linear probe on frozen features of a trained ViT (the ViT-22B paper's evaluation mode), on Fashion-MNIST.")
{
    checkpointOption, dataOption, epochsOption, lrOption, randomOption, trainLimitOption, testLimitOption, threadsOption,
};
root.SetAction(parse =>
{
    if (parse.GetValue(threadsOption) is > 0 and var t) torch.set_num_threads(t);
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;
    var checkpoint = parse.GetValue(checkpointOption)!;
    if (!checkpoint.Exists) throw new FileNotFoundException($"Checkpoint '{checkpoint.FullName}' does not exist; train one with samples/TrainFashionMnist.", checkpoint.FullName);
    var normalize = Transforms.Normalize(PixelNormalization.MinusOneToOne);
    using var fullTrain = IdxFile.LoadFashionMnist(parse.GetValue(dataOption)!.FullName, train: true, normalize);
    using var fullTest = IdxFile.LoadFashionMnist(parse.GetValue(dataOption)!.FullName, train: false, normalize);
    IDataset train = parse.GetValue(trainLimitOption) is > 0 and var tl ? Subset.First(fullTrain, tl) : fullTrain;
    IDataset test = parse.GetValue(testLimitOption) is > 0 and var sl ? Subset.First(fullTest, sl) : fullTest;
    var trainLoader = new DataLoader(train, new DataLoaderOptions { BatchSize = 500, Shuffle = false });
    var testLoader = new DataLoader(test, new DataLoaderOptions { BatchSize = 500, Shuffle = false });

    using var model = TrainingCheckpoint.LoadModel(checkpoint.FullName, torch.CPU, ScalarType.Float32);
    var table = new Table().Title($"Fashion-MNIST test accuracy ({train.Count:N0} training / {test.Count:N0} test images)").AddColumns("backbone", "evaluation", "test top-1", "time");
    var sw = Stopwatch.StartNew();
    var full = Trainer.Evaluate(model, testLoader);
    table.AddRow("trained (checkpoint)", "full model (its own head)", $"{full.Top1:P2}", $"{sw.Elapsed.TotalSeconds:F0} s");
    Probe("trained (checkpoint), frozen", model);
    if (parse.GetValue(randomOption))
    {
        torch.manual_seed(0);
        using var random = new VisionTransformer(model.Config, torch.CPU, ScalarType.Float32);
        Probe("random init, frozen", random);
    }
    AnsiConsole.Write(table);
    return 0;

    void Probe(string name, VisionTransformer backbone)
    {
        sw.Restart();
        var (trainFeatures, trainLabels) = LinearProbe.ExtractFeatures(backbone, trainLoader);
        var (testFeatures, testLabels) = LinearProbe.ExtractFeatures(backbone, testLoader);
        using (trainFeatures) using (trainLabels) using (testFeatures) using (testLabels)
        {
            using var classifier = LinearProbe.Fit(trainFeatures, trainLabels, train.Classes.Count, parse.GetValue(epochsOption), lr: parse.GetValue(lrOption));
            double acc = LinearProbe.Accuracy(classifier, testFeatures, testLabels);
            table.AddRow(name, $"linear probe on {trainFeatures.shape[1]}-d features", $"{acc:P2}", $"{sw.Elapsed.TotalSeconds:F0} s");
        }
    }
});
return SampleMain.Invoke(root, args);
