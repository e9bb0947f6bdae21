using TorchSharp;

using ViT22B.Data;
using ViT22B.Models;
using ViT22B.Layers;
using static TorchSharp.torch;
using ViT22B.Torch;

namespace ViT22B.Training;

/// <summary>
/// The paper's headline evaluation (ViT-22B §4: "frozen features + linear probe"): the backbone is frozen, its pooled
/// pre-logits embeddings are extracted once, and only a linear classifier is trained on them (softmax
/// cross-entropy, AdamW, cosine schedule, full passes over the cached features).
/// </summary>
public static class LinearProbe
{
    /// <summary>Pooled pre-logits features [N, D] (float32, CPU) and labels [N] of every example of
    /// <paramref name="loader"/> (epoch 0's order), computed in inference mode.</summary>
    public static (Tensor Features, Tensor Labels) ExtractFeatures(VisionTransformer model, DataLoader loader)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(loader);
        model.eval();
        var features = new List<Tensor>();
        var labels = new List<Tensor>();
        try
        {
            foreach (var batch in loader.Epoch(0))
            {
                using (batch)
                using (torch.inference_mode())
                using (var scope = NewDisposeScope())
                {
                    var tokens = model.ForwardFeatures(batch.Images.to(model.DType, model.Device));
                    var f = model.ForwardHead(tokens, preLogits: true).to(ScalarType.Float32).cpu();
                    features.Add(f.clone().DetachFromDisposeScope());
                    labels.Add(batch.Labels.clone().DetachFromDisposeScope());
                }
            }
            return (torch.cat(features, 0), torch.cat(labels, 0));
        }
        finally
        {
            foreach (var t in features.Concat(labels)) t.Dispose();
        }
    }

    /// <summary>Trains a linear classifier [D → classes] on fixed features (float32, CPU) and returns it. Features
    /// are standardized with the training set's mean and standard deviation, folded into the returned layer.</summary>
    public static TorchSharp.Modules.Linear Fit(Tensor features, Tensor labels, int classes, int epochs = 30, int batchSize = 256, double lr = 1e-2, double weightDecay = 1e-4, int seed = 0)
    {
        ArgumentNullException.ThrowIfNull(features);
        ArgumentNullException.ThrowIfNull(labels);
        if (features.dim() != 2 || labels.dim() != 1 || labels.shape[0] != features.shape[0])
            throw new ArgumentException($"Expected features [N, D] and labels [N], found [{string.Join(", ", features.shape)}] and [{string.Join(", ", labels.shape)}].");
        if (classes <= 1) throw new ArgumentOutOfRangeException(nameof(classes), $"classes must be at least 2, found {classes}.");
        if (epochs <= 0 || batchSize <= 0) throw new ArgumentOutOfRangeException(nameof(epochs), "epochs and batchSize must be positive.");
        long n = features.shape[0], d = features.shape[1];
        using var mean = features.mean(new long[] { 0 }, keepdim: true);
        using var sd = features.std(0, keepdim: true);   // locals: each temporary stays referenced through its native call
        using var std = sd.AtLeast(1e-6);
        using var centred = features - mean;
        using var standardized = centred / std;
        using var x = standardized.to(ScalarType.Float32);
        using var y = labels.to(ScalarType.Int64);
        var linear = nn.Linear(d, classes, hasBias: true, dtype: ScalarType.Float32);
        using (torch.no_grad())
        {
            Param.Zero(linear.weight!);
            Param.Zero(linear.bias!);
        }
        var parameters = new[] { new OptimizedParameter("weight", linear.weight!, weightDecay), new OptimizedParameter("bias", linear.bias!, 0) };
        using var optimizer = new AdamW(parameters);
        int steps = (int)((n + batchSize - 1) / batchSize);
        var schedule = new LearningRateSchedule { PeakLr = lr, TotalSteps = (long)epochs * steps, Decay = DecayKind.Cosine }.Validate();
        var rng = new Random(seed);
        var order = Enumerable.Range(0, (int)n).ToArray();
        for (int epoch = 0; epoch < epochs; epoch++)
        {
            rng.Shuffle(order);
            using var perm = torch.tensor(order.Select(i => (long)i).ToArray());
            for (int s = 0; s < steps; s++)
            {
                using var scope = NewDisposeScope();
                var idx = perm.narrow(0, (long)s * batchSize, Math.Min(batchSize, n - (long)s * batchSize));
                var loss = Losses.Compute(linear.forward(x.index_select(0, idx)), y.index_select(0, idx), LossKind.Softmax);
                optimizer.ZeroGrad();
                loss.backward();
                optimizer.Step(schedule.At(optimizer.StepCount));
            }
        }
        optimizer.ZeroGrad();
        // Fold the standardization into the layer: W·(f − μ)/σ + b = (W/σ)·f + (b − (W/σ)·μ).
        using (torch.no_grad())
        {
            using var scaled = linear.weight!.div(std);
            using var meanRow = mean.squeeze(0);
            using var shift = scaled.matmul(meanRow);
            linear.weight!.copy_(scaled);
            linear.bias!.sub_(shift);
        }
        return linear;
    }

    /// <summary>Top-1 accuracy of <paramref name="classifier"/> on features and labels.</summary>
    public static double Accuracy(TorchSharp.Modules.Linear classifier, Tensor features, Tensor labels)
    {
        using var noGrad = torch.no_grad();
        using var scope = NewDisposeScope();
        var predicted = classifier.forward(features.to(ScalarType.Float32)).argmax(1);
        return predicted.eq(labels).to(ScalarType.Float64).mean().item<double>();
    }
}
