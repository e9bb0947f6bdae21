using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

/// <summary>The mesh and step options every mode takes.</summary>
internal sealed record MeshArgs(int Data, int Model, CommMode Mode, bool Fsdp, int Batch, ActivationCheckpointing Recompute)
{
    /// <summary>ViT-22B's block (parallel, QK-norm, no QKV/norm bias, MAP head) at a laptop size: 65 tokens with the
    /// class token.</summary>
    public static ViTConfig Config { get; } = ViTConfig.Parse("22B/14") with
    {
        EmbedDim = 256, Depth = 4, NumHeads = 8, MlpDim = 1024, ImgSize = 64, PatchSize = 8, ClassToken = true, NumClasses = 10,
    };

    public ShardingPlan Plan()
    {
        if (Data < 1 || Model < 1 || Batch < 1)
            throw new ArgumentException($"--data ({Data}), --model ({Model}) and --batch-size ({Batch}) must be at least 1.");
        if (Batch % Data != 0) throw new ArgumentException($"The batch of {Batch} does not split evenly over a data axis of {Data}.");
        return new ShardingPlan(Config, Model, Data, Fsdp);
    }
}

internal sealed record RankResult(int Rank, int DataIndex, int ModelIndex, long Bytes, long ModelSent, long ModelOps, long DataSent, long DataOps, double OutErr, double GradErr, int SyncOps);

internal static class RankCheck
{
    // Against the CPU reference, GPU ranks see libtorch's default TF32 convolutions (cuDNN; the patch embedding),
    // about 1e-3 relative each; a sharding mistake gives errors of order 1. Chosen before any GPU run.
    public const double GpuTolerance = 1e-2;

    /// <summary>
    /// One rank's share of the check: build its shard (which takes over <paramref name="rank"/>), load the reference
    /// weights, run forward (and backward with the gradient synchronization), and compare with the unsharded model.
    /// </summary>
    public static RankResult Step(ShardingPlan plan, RankContext rank, CommMode mode, Reference reference, int batch, bool forwardOnly,
        ActivationCheckpointing recompute)
    {
        var dev = rank.Device;
        using var shard = new ShardedVisionTransformer(plan, rank, mode, ScalarType.Float32);
        shard.Module.Checkpointing = recompute;
        shard.LoadFull(reference.State);
        using var scope = torch.NewDisposeScope();
        long per = batch / rank.Mesh.DataSize;
        var images = reference.Images.narrow(0, shard.DataIndex * per, per).to(dev);
        var labels = reference.Labels.narrow(0, shard.DataIndex * per, per).to(dev);
        Tensor logits;
        double gradErr = 0;
        int syncOps = 0;
        if (forwardOnly)
        {
            using var noGrad = torch.no_grad();
            logits = shard.Forward(images);
        }
        else
        {
            logits = shard.Forward(images);
            shard.Backward(nn.functional.cross_entropy(logits, labels));
            syncOps = shard.SynchronizeGradients().Collectives;
            foreach (var (name, p) in shard.Module.named_parameters())
            {
                var expected = ShardingPlan.Slice(reference.Grads[name], plan.Spec(name, reference.Grads[name].shape, shard.ModelIndex, shard.DataIndex));
                double scale = Math.Max(expected.abs().max().item<float>(), 1e-3);
                gradErr = Math.Max(gradErr, (p.grad!.cpu() - expected).abs().max().item<float>() / scale);
            }
        }
        double outErr = ((logits.detach().cpu() - reference.Logits.narrow(0, shard.DataIndex * per, per)).abs().max() / reference.Logits.abs().max()).item<float>();
        var (m, d) = (rank.Model as ThreadedCommunicator, rank.Data as ThreadedCommunicator);
        return new RankResult(rank.Rank, shard.DataIndex, shard.ModelIndex, shard.ParameterBytes, m?.BytesSent ?? 0, m?.Operations ?? 0,
            d?.BytesSent ?? 0, d?.Operations ?? 0, outErr, gradErr, syncOps);
    }
}

/// <summary>The unsharded model's logits and gradients for one batch, on the CPU (every process computes the same).</summary>
internal sealed record Reference(Dictionary<string, Tensor> State, Tensor Images, Tensor Labels, Tensor Logits, Dictionary<string, Tensor> Grads)
{
    public static Reference Compute(ViTConfig config, int batch)
    {
        torch.manual_seed(0);
        using var scope = torch.NewDisposeScope();   // the temporaries stay reachable through each native call; the results are detached
        using var full = new VisionTransformer(config, torch.CPU, ScalarType.Float32);
        using (torch.no_grad())
            foreach (var (name, p) in full.named_parameters())
                if (name.StartsWith("head.", StringComparison.Ordinal)) p.normal_(0, 0.02);     // give the zero-initialized classifier some signal
        var state = full.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone().DetachFromDisposeScope());
        var images = torch.randn(new long[] { batch, 3, config.ImageShape.Height, config.ImageShape.Width }, generator: new torch.Generator(1)).DetachFromDisposeScope();
        var labels = torch.tensor(Enumerable.Range(0, batch).Select(i => (long)(i % config.NumClasses)).ToArray()).DetachFromDisposeScope();
        var logits = full.call(images);
        nn.functional.cross_entropy(logits, labels).backward();
        var grads = full.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone().DetachFromDisposeScope());
        return new Reference(state, images, labels, logits.detach().DetachFromDisposeScope(), grads);
    }
}
