// Quickstart: build a small ViT-22B-style model on the CPU, run real photographs through it, and print the config,
// the parameter/FLOPs table of the model family and the measured throughput.
//
//   dotnet run --project samples/Quickstart -c Release
//   dotnet run --project samples/Quickstart -c Release -- --preset B/16 --iterations 3
using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using Spectre.Console;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Imaging;
using ViT22B.Models;
using static TorchSharp.torch;

var imagesOption = new Option<DirectoryInfo>("--images")
{
    Description = "Folder of images (JPEG, PNG, WebP, BMP, GIF).",
    DefaultValueFactory = _ => new DirectoryInfo(Path.Combine(AppContext.BaseDirectory, "images")),
};
var presetOption = new Option<string?>("--preset") { Description = "A preset such as B/16 instead of the small default model." };
var iterationsOption = new Option<int>("--iterations") { Description = "Timed forward passes.", DefaultValueFactory = _ => 5 }.AtLeast(1);
var threadsOption = new Option<int>("--threads") { Description = "libtorch intra-op threads (0 = libtorch's default).", DefaultValueFactory = _ => 0 }.AtLeast(0);
var root = new RootCommand("ViT22B quickstart: a ViT-22B-style model on real images, with parameter/FLOPs accounting and throughput.")
{
    imagesOption, presetOption, iterationsOption, threadsOption,
};
root.SetAction(parse =>
{
    int threads = parse.GetValue(threadsOption);
    if (threads > 0) torch.set_num_threads(threads);
    var config = parse.GetValue(presetOption) is { } preset
        ? ViTConfig.Parse(preset)
        // ViT-22B's block (parallel, QK-norm, no QKV/norm bias, MAP head) at Ti/16 shapes.
        : ViTConfig.Parse("22B/14") with { EmbedDim = 192, Depth = 6, NumHeads = 3, MlpDim = 768, PatchSize = 16 };
    Run(config, parse.GetValue(imagesOption)!, parse.GetValue(iterationsOption));
    return 0;
});
return SampleMain.Invoke(root, args);

static void Run(ViTConfig config, DirectoryInfo imageDir, int iterations)
{
    if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 120;   // logs and CI: do not wrap tables at 80
    AnsiConsole.MarkupLine("[bold]ViT22B quickstart[/]");
    var knobs = ViTConfigJson.ToJson(config).Trim('{', '}', '\n', ' ').Replace("\n", "").Replace("  ", " ").Replace("\"", "");
    AnsiConsole.Write(new Panel(knobs.Trim().EscapeMarkup()).Header("config (JSON keys)").Expand());

    var table = new Table().Title("Model family (computed from configs; no weights allocated)")
        .AddColumns("model", "block", "params", "backbone", "GFLOP fwd/img", "GFLOP train/img");
    foreach (var (name, c) in ViTConfig.PresetNames.Select(n => (n, ViTConfig.Parse(n))).Append(("this model", config)))
    {
        var p = ModelAccounting.Parameters(c);
        var f = ModelAccounting.Flops(c);
        table.AddRow(name, c.Block.ToString().ToLowerInvariant(), $"{p.Total:N0}", $"{p.Backbone:N0}", $"{f.Forward / 1e9:N2}", $"{f.Training / 1e9:N2}");
    }
    AnsiConsole.Write(table);

    var files = ImageTensors.ListImages(imageDir.FullName);
    if (files.Count == 0) throw new InvalidOperationException($"No images in '{imageDir.FullName}'.");
    ModelAccounting.EnsureFitsInHostMemory(config, ScalarType.Float32);
    torch.manual_seed(0);
    using var model = new VisionTransformer(config, torch.CPU, ScalarType.Float32);
    model.eval();
    using var images = ImageTensors.LoadBatch(files, config.ImgSize);
    AnsiConsole.MarkupLine($"Loaded {files.Count} images from [blue]{imageDir.FullName.EscapeMarkup()}[/] as {string.Join("×", images.shape)}; torch threads: {torch.get_num_threads()}");

    ViTOutput Pass()
    {
        using var inference = torch.inference_mode();
        using var scope = torch.NewDisposeScope();
        var o = model.Encode(images);
        return new ViTOutput(o.Pooled.MoveToOuterDisposeScope(), o.PatchTokens.MoveToOuterDisposeScope(), o.Logits?.MoveToOuterDisposeScope());
    }

    Pass().Dispose();                                   // warm-up
    var sw = Stopwatch.StartNew();
    for (int i = 0; i < iterations; i++) Pass().Dispose();
    double seconds = sw.Elapsed.TotalSeconds / iterations;
    using var output = Pass();

    var features = new Table().Title("Pooled embeddings").AddColumns("image", "features", "‖feature‖", "first values", "patch tokens");
    for (int i = 0; i < files.Count; i++)
    {
        using var scope = torch.NewDisposeScope();   // the row's temporaries stay reachable through each native call
        var v = output.Pooled[i];
        features.AddRow(Path.GetFileName(files[i]).EscapeMarkup(), $"[[{v.shape[0]}]]", $"{v.norm().item<float>():F3}",
            string.Join(", ", v.narrow(0, 0, 4).data<float>().ToArray().Select(x => x.ToString("F3", CultureInfo.InvariantCulture))), $"[[{string.Join(", ", output.PatchTokens[i].shape)}]]");
    }
    AnsiConsole.Write(features);

    double flops = ModelAccounting.Flops(config).Forward * files.Count;
    AnsiConsole.MarkupLine($"Throughput: [green]{files.Count / seconds:F1} images/s[/] ({seconds * 1000:F1} ms per batch of {files.Count}, mean of {iterations}), {flops / seconds / 1e9:F1} model GFLOP/s in float32 on the CPU.");
}
