using ScottPlot;

internal static class Plots
{
    // Three stacked panels sharing the step axis: loss, the largest attention logit over layers (log scale), and the
    // lowest per-head attention entropy over layers.
    public static void Save(string path, IReadOnlyList<RunResult> runs, Settings s)
    {
        var multiplot = new ScottPlot.Multiplot();
        multiplot.AddPlots(3);
        var (loss, logit, entropy) = (multiplot.GetPlot(0), multiplot.GetPlot(1), multiplot.GetPlot(2));
        var colors = new[] { ScottPlot.Colors.Blue, ScottPlot.Colors.Red };
        for (int i = 0; i < runs.Count; i++)
        {
            var r = runs[i];
            double[] steps = r.Records.Select(x => (double)x.Step).ToArray();
            if (steps.Length == 0) continue;
            Add(loss, steps, r.Records.Select(x => x.Loss).ToArray(), r.Name, colors[i]);
            Add(logit, steps, r.Records.Select(x => Math.Log10(Math.Max(1e-3, x.Layers.Max(l => l.MaxAbsLogit)))).ToArray(), r.Name, colors[i]);
            Add(entropy, steps, r.Records.Select(x => x.Layers.Min(l => l.MinEntropy)).ToArray(), r.Name, colors[i]);
        }
        loss.Title($"Fashion-MNIST, AdamW lr {s.Lr}, warmup {s.Warmup}, clip {s.Clip}: with vs without QK-norm");
        loss.YLabel("training loss");
        logit.YLabel("log10 max |attention logit|");
        entropy.YLabel("lowest head entropy (nats)");
        entropy.XLabel("step");
        foreach (var p in new[] { loss, logit, entropy }) p.ShowLegend(ScottPlot.Alignment.UpperRight);
        using var image = multiplot.Render(1000, 1100);
        var png = image.GetImageBytes(ImageFormat.Png, 100);
        ViT22B.Interop.AtomicFile.Write(path, s => s.Write(png));
    }

    private static void Add(ScottPlot.Plot plot, double[] xs, double[] ys, string label, ScottPlot.Color color)
    {
        var line = plot.Add.ScatterLine(xs, ys, color);
        line.LegendText = label;
        line.LineWidth = 1.5f;
    }
}
