using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary>Activation checkpointing on one device: the same gradients as keeping every activation (float64, 1e-12),
/// for every set of recomputed blocks and both block kinds; a failed recomputation is reported, not hidden.</summary>
public class ActivationCheckpointingTests
{
    private static ViTConfig Config(BlockKind block) => TestUtil.Tiny(block) with
    {
        Depth = 4, ClassToken = true, RegTokens = 1, GlobalPool = GlobalPool.Map, QkNorm = true, InitValues = 0.5, NormBias = true,
    };

    /// <summary>Gradients of every parameter and of the images, for a loss that weighs each logit differently.</summary>
    private static Dictionary<string, Tensor> Gradients(VisionTransformer model, Tensor images, Tensor probe)
    {
        model.zero_grad();
        using var scope = torch.NewDisposeScope();
        var x = images.detach().clone().requires_grad_(true);
        (model.call(x) * probe).sum().backward();
        model.ThrowIfBackwardFailed();
        var grads = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone().DetachFromDisposeScope());
        grads["<images>"] = x.grad!.detach().clone().DetachFromDisposeScope();
        return grads;
    }

    public static TheoryData<BlockKind, string> Sets() => new()
    {
        { BlockKind.Parallel, "all" }, { BlockKind.Parallel, "every:2" }, { BlockKind.Parallel, "blocks:1,3" },
        { BlockKind.Sequential, "all" }, { BlockKind.Sequential, "every:3" }, { BlockKind.Sequential, "blocks:0" },
    };

    [Theory]
    [MemberData(nameof(Sets))]
    public void Checkpointed_gradients_equal_kept_activation_gradients(BlockKind block, string set)
    {
        var c = Config(block);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 3, scale: 0.4);
        using var images = TestUtil.RandomImages(c, 3, seed: 4);
        using var probe = torch.randn(new long[] { 3, c.NumClasses }, dtype: ScalarType.Float64, generator: new torch.Generator(5));

        var kept = Gradients(model, images, probe);
        model.Checkpointing = ActivationCheckpointing.Parse(set);
        var recomputed = Gradients(model, images, probe);

        Assert.Equal(kept.Keys.Order(), recomputed.Keys.Order());
        using var scope = torch.NewDisposeScope();
        // The k-norm bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by a row's logits), so
        // both sides hold rounding noise there: errors are relative to the larger of the tensor's own scale and 1% of
        // the largest gradient of the model, as in the sharded-model tests.
        double global = kept.Values.Max(g => g.abs().max().item<double>());
        var failures = new List<string>();
        foreach (var (key, g) in kept)
        {
            double scale = Math.Max(g.abs().max().item<double>(), 0.01 * global);
            double err = TestUtil.MaxAbs(recomputed[key], g) / scale;
            if (!(err <= 1e-12)) failures.Add($"{key}: relative error {err:E2}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
        Assert.True(kept["<images>"].abs().max().item<double>() > 0, "the image gradient must not vanish");
    }

    /// <summary>A checkpointed block's forward pass runs without a graph, so it is the no-grad forward (for the
    /// parallel block that is the narrower-GEMM inference path): bit for bit the no-grad output, and the recording
    /// forward's to rounding.</summary>
    [Theory]
    [InlineData(BlockKind.Parallel)]
    [InlineData(BlockKind.Sequential)]
    public void The_checkpointed_forward_is_the_no_grad_forward(BlockKind block)
    {
        var c = Config(block);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 6);
        using var images = TestUtil.RandomImages(c, 2, seed: 7);
        using var recorded = model.call(images);
        Tensor inference;
        using (torch.no_grad()) inference = model.call(images);
        using var inferenceOwner = inference;
        model.Checkpointing = ActivationCheckpointing.AllBlocks;
        using var checkpointed = model.call(images);
        Assert.True(checkpointed.requires_grad);
        using var scope = torch.NewDisposeScope();
        Assert.True(TensorAssert.Same(inference, checkpointed.detach()));
        Assert.True(TestUtil.RelErr(checkpointed, recorded) <= 1e-12);
    }

    /// <summary>Makes block <paramref name="index"/>'s forward throw whenever gradients are being recorded: never in
    /// the checkpointed forward pass (which runs without a graph), always in its recomputation inside backward.</summary>
    private static IDisposable FailRecomputation(VisionTransformer model, int index)
    {
        var block = (nn.Module<Tensor, Tensor>)model.named_modules().Single(m => m.name == $"blocks.{index}").module;
        var remover = block.register_forward_pre_hook((_, x) =>
            torch.is_grad_enabled() ? throw new InvalidOperationException($"injected failure in block {index}") : x);
        return new Removal(remover.remove);
    }

    private sealed class Removal(Action remove) : IDisposable
    {
        public void Dispose() => remove();
    }

    [Fact]
    public void A_failed_recomputation_gives_NaN_gradients_and_is_thrown_after_backward()
    {
        var c = Config(BlockKind.Sequential);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        model.Checkpointing = ActivationCheckpointing.Blocks(2);
        using var hook = FailRecomputation(model, 2);
        using var images = TestUtil.RandomImages(c, 2, seed: 8);
        using var scope = torch.NewDisposeScope();
        model.call(images).sum().backward();
        var ex = Assert.Throws<InvalidOperationException>(model.ThrowIfBackwardFailed);
        Assert.Contains("injected failure in block 2", ex.Message);
        var grads = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!);
        Assert.True(grads["blocks.2.mlp.fc1.weight"].isnan().all().item<bool>(), "the failed node's parameter gradients are NaN");
        Assert.True(grads["blocks.1.norm1.weight"].isnan().all().item<bool>(), "the NaN input gradient reaches the blocks before it");
        Assert.False(grads["blocks.3.norm1.weight"].isnan().any().item<bool>(), "blocks after it are differentiated before it");
        model.ThrowIfBackwardFailed();     // thrown once, then forgotten
    }

    [Fact]
    public void The_trainer_throws_a_failed_recomputation_instead_of_stepping()
    {
        var c = Config(BlockKind.Parallel) with { Depth = 2 };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        model.Checkpointing = ActivationCheckpointing.AllBlocks;
        using var optimizer = new AdamW(Optimizer.WithWeightDecay(model, 0, 0));
        var trainer = new Trainer(model, optimizer, new LearningRateSchedule { PeakLr = 1e-3, TotalSteps = 4, Decay = DecayKind.Constant });
        using var images = TestUtil.RandomImages(c, 2, seed: 9, ScalarType.Float32);
        using var labels = torch.tensor(new long[] { 0, 1 });
        using var scope = torch.NewDisposeScope();
        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        using (FailRecomputation(model, 1))
        {
            var ex = Assert.Throws<InvalidOperationException>(() => trainer.TrainStep(images, labels));
            Assert.Contains("injected failure in block 1", ex.Message);
        }
        Assert.Equal(0, trainer.Step);
        foreach (var (key, value) in model.state_dict())
            Assert.True(TensorAssert.Same(before[key], value), $"{key} changed: no update may be applied");
        trainer.TrainStep(images, labels);     // the hook removed, training goes on
        Assert.Equal(1, trainer.Step);
    }

    [Fact]
    public void Hardware_FLOPs_add_the_recomputed_blocks_forward_and_the_trainer_option_sets_the_model()
    {
        var c = ViTConfig.Parse("B/16");
        var f = ViT22B.Accounting.ModelAccounting.Flops(c);
        double perBlock = 2.0 * c.NumTokens * (4.0 * c.EmbedDim * c.EmbedDim + 2.0 * c.EmbedDim * c.MlpDim) + 4.0 * c.NumTokens * c.NumTokens * c.EmbedDim;
        Assert.Equal(f.Training, ViT22B.Accounting.ModelAccounting.HardwareTrainingFlops(c, ActivationCheckpointing.None));
        Assert.Equal(f.Training + 12 * perBlock, ViT22B.Accounting.ModelAccounting.HardwareTrainingFlops(c, ActivationCheckpointing.AllBlocks), 1e-9 * f.Training);
        Assert.Equal(f.Training + 4 * perBlock, ViT22B.Accounting.ModelAccounting.HardwareTrainingFlops(c, ActivationCheckpointing.EveryNth(3)), 1e-9 * f.Training);

        using var model = new VisionTransformer(TestUtil.Tiny(BlockKind.Parallel), torch.CPU, ScalarType.Float32);
        using var optimizer = new AdamW(Optimizer.WithWeightDecay(model, 0, 0));
        var schedule = new LearningRateSchedule { PeakLr = 1e-3, TotalSteps = 4, Decay = DecayKind.Constant };
        _ = new Trainer(model, optimizer, schedule, new TrainerOptions());
        Assert.Equal(ActivationCheckpointing.None, model.Checkpointing);
        _ = new Trainer(model, optimizer, schedule, new TrainerOptions { Checkpointing = ActivationCheckpointing.Blocks(1) });
        Assert.Equal(ActivationCheckpointing.Blocks(1), model.Checkpointing);
    }

    [Theory]
    [InlineData("none", "none")]
    [InlineData("ALL", "all")]
    [InlineData("every:1", "all")]
    [InlineData("every:4", "every:4")]
    [InlineData("blocks: 3,1,3", "blocks:1,3")]
    public void Parse_reads_the_documented_forms(string text, string expected) =>
        Assert.Equal(expected, ActivationCheckpointing.Parse(text).ToString());

    [Theory]
    [InlineData("every:0")]
    [InlineData("every:x")]
    [InlineData("blocks:1,-2")]
    [InlineData("some")]
    public void Parse_names_what_it_accepts(string text)
    {
        var ex = Assert.Throws<FormatException>(() => ActivationCheckpointing.Parse(text));
        Assert.Contains(text, ex.Message);
        Assert.Contains("every:N", ex.Message);
    }

    [Fact]
    public void Sets_select_the_blocks_they_name()
    {
        Assert.Equal(new[] { 0, 3, 6 }, Enumerable.Range(0, 8).Where(ActivationCheckpointing.EveryNth(3).Applies));
        Assert.Equal(3, ActivationCheckpointing.EveryNth(3).CountIn(8));
        Assert.Equal(8, ActivationCheckpointing.AllBlocks.CountIn(8));
        Assert.Equal(0, ActivationCheckpointing.None.CountIn(8));
        Assert.Equal(ActivationCheckpointing.Blocks(2, 1), ActivationCheckpointing.Parse("blocks:1,2"));
        using var model = new VisionTransformer(TestUtil.Tiny(BlockKind.Parallel), torch.CPU, ScalarType.Float32);
        var ex = Assert.Throws<ArgumentException>(() => model.Checkpointing = ActivationCheckpointing.Blocks(2));
        Assert.Contains("2 blocks", ex.Message);
        Assert.Equal(ActivationCheckpointing.None, model.Checkpointing);
    }
}
