using TorchSharp;
using ViT22B.Data;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Training;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Training;

public sealed class LinearProbeTests
{
    [Fact]
    public void Probe_separates_linearly_separable_features_and_folds_the_standardization()
    {
        // Three classes along different directions, with an offset and unequal scales the standardization must undo.
        var gen = new Random(0);
        int n = 300;
        var f = new float[n * 4];
        var y = new long[n];
        for (int i = 0; i < n; i++)
        {
            int c = i % 3;
            y[i] = c;
            for (int j = 0; j < 4; j++) f[i * 4 + j] = (float)(100 + (j == c ? 3 : 0) + gen.NextDouble() - 0.5) * (j + 1);
        }
        using var features = torch.tensor(f, new long[] { n, 4 });
        using var labels = torch.tensor(y);
        using var probe = LinearProbe.Fit(features, labels, classes: 3, epochs: 40, batchSize: 50, lr: 5e-2);
        Assert.Equal(1.0, LinearProbe.Accuracy(probe, features, labels));
        using var scope = torch.NewDisposeScope();
        Assert.Throws<ArgumentException>(() => LinearProbe.Fit(features, labels.narrow(0, 0, 10), 3));
    }

    [Fact]
    public void Extracted_features_are_the_models_pre_logits()
    {
        var cfg = new ViTConfig { ImgSize = 8, PatchSize = 4, InChans = 1, EmbedDim = 16, Depth = 1, NumHeads = 2, MlpDim = 32, NumClasses = 3 };
        torch.manual_seed(0);
        using var model = new VisionTransformer(cfg, torch.CPU, ScalarType.Float32);
        using var images = torch.rand(10, 1, 8, 8);
        using var ds = new TensorDataset(images, torch.tensor(Enumerable.Range(0, 10).Select(i => (long)(i % 3)).ToArray()), new[] { "a", "b", "c" });
        var (features, labels) = LinearProbe.ExtractFeatures(model, new DataLoader(ds, new DataLoaderOptions { BatchSize = 4, Shuffle = false }));
        using (features)
        using (labels)
        {
            using var scope = torch.NewDisposeScope();
            using var expected = model.ForwardHead(model.ForwardFeatures(images), preLogits: true);
            Assert.Equal(new long[] { 10, 16 }, features.shape);
            Assert.True((features - expected).abs().max().item<float>() < 1e-5);
            Assert.Equal(new long[] { 0, 1, 2, 0 }, labels.narrow(0, 0, 4).data<long>().ToArray());
        }
    }

    [Fact]
    public void Attention_observer_reports_logits_and_entropy_per_layer()
    {
        var cfg = new ViTConfig { ImgSize = 8, PatchSize = 4, InChans = 1, EmbedDim = 16, Depth = 2, NumHeads = 2, MlpDim = 32, NumClasses = 3, QkNorm = false, GlobalPool = GlobalPool.Gap };
        torch.manual_seed(0);
        using var model = new VisionTransformer(cfg, torch.CPU, ScalarType.Float64);
        using var images = torch.rand(2, 1, 8, 8, dtype: ScalarType.Float64);
        var stats = new List<AttentionStats>();
        using (AttentionOps.Observe(stats.Add)) model.forward(images).Dispose();
        Assert.Equal(2, stats.Count);   // one per block (GAP: no attention in the head)
        model.forward(images).Dispose();
        Assert.Equal(2, stats.Count);   // observer removed with its scope

        // Reference for block 0: logits of its own q and k, computed here from the state dict with raw ops.
        using var scope = torch.NewDisposeScope();
        var sd = model.state_dict();
        var reference = new Reference(sd, cfg);
        var x = reference.PatchEmbed(images).Plus(sd["pos_embed"]);                      // tokens entering block 0
        var h = reference.Norm("blocks.0.in_norm.", x);
        var p = h.matmul(sd["blocks.0.in_proj.weight"].t());
        long f = cfg.MlpDim, d = cfg.EmbedDim, hd = cfg.HeadDim;
        var q = p.narrow(-1, f, d).view(2, 4, 2, hd).transpose(1, 2);
        var k = p.narrow(-1, f + d, d).view(2, 4, 2, hd).transpose(1, 2);
        var logits = q.matmul(k.transpose(-2, -1)).DividedBy(Math.Sqrt(hd));
        var prob = logits.softmax(-1);
        var entropy = -(prob * prob.log()).sum(-1);
        Assert.Equal(logits.abs().max().item<double>(), stats[0].MaxAbsLogit, 1e-10);
        Assert.Equal(entropy.mean().item<double>(), stats[0].MeanEntropy, 1e-10);
        Assert.Equal(entropy.mean(new long[] { 0, 2 }).min().item<double>(), stats[0].MinEntropy, 1e-10);
        Assert.InRange(stats[0].MeanEntropy, 0, Math.Log(4));
    }
}
