using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>Activation checkpointing of sharded blocks (which repeat their forward collectives in backward): on every
/// rank the gradients equal those of the same shard keeping its activations (float64, 1e-12), on model axes 2 and
/// 4, with FSDP, on the in-process backend and on the NCCL communicator over the stand-in.</summary>
public class ShardedRecomputeTests
{
    private static ViTConfig Config(BlockKind block) => ShardedModelTests.Config(block) with { Depth = 3, InitValues = 0.5 };

    [Theory]
    [OnEveryBackend(BlockKind.Parallel, 1, 2, false, "all")]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, false, "every:2")]
    [OnEveryBackend(BlockKind.Sequential, 1, 4, false, "all")]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true, "blocks:1")]
    [OnEveryBackend(BlockKind.Sequential, 2, 2, true, "all")]
    [OnEveryBackend(BlockKind.Parallel, 1, 4, false, "all")]
    [OnEveryBackend(BlockKind.Parallel, 2, 2, true, "all")]
    [OnEveryBackend(BlockKind.Parallel, 2, 4, true, "every:2")]
    public void Checkpointed_shards_give_the_gradients_of_kept_activations(Backend backend, BlockKind block, int data, int model, bool fsdp, string set)
    {
        var c = Config(block);
        const long batch = 4;
        var plan = new ShardingPlan(c, model, data, fsdp);
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries (the rank threads open their own)
        var full = TestUtil.RandomState(c, seed: 11, scale: 0.3, ScalarType.Float64);
        using var images = TestUtil.RandomImages(c, batch, seed: 12);
        using var probe = torch.randn(new long[] { batch, c.NumClasses }, dtype: ScalarType.Float64, generator: new torch.Generator(13));

        var results = Backends.Run(backend, new DeviceMesh(data, model), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float64);
            shard.LoadFull(full);
            long per = batch / data;
            using var mine = images.narrow(0, shard.DataIndex * per, per);
            using var myProbe = probe.narrow(0, shard.DataIndex * per, per);
            Dictionary<string, Tensor> Step()
            {
                shard.Module.zero_grad();
                using var scope = torch.NewDisposeScope();
                shard.Backward((shard.Forward(mine) * myProbe).sum());
                shard.SynchronizeGradients();
                return shard.Module.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone().DetachFromDisposeScope());
            }
            var kept = Step();
            shard.Module.Checkpointing = ActivationCheckpointing.Parse(set);
            return (Kept: kept, Recomputed: Step(), shard.ModelIndex, shard.DataIndex);
        });

        var failures = new List<string>();
        foreach (var r in results)
        {
            double global = r.Kept.Values.Max(g => g.abs().max().item<double>());
            foreach (var (key, g) in r.Kept)
            {
                double scale = Math.Max(g.abs().max().item<double>(), 0.01 * global);   // see ActivationCheckpointingTests
                double err = TestUtil.MaxAbs(r.Recomputed[key], g) / scale;
                if (!(err <= 1e-12)) failures.Add($"rank ({r.DataIndex}, {r.ModelIndex}) {key}: relative error {err:E2}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    [Theory]
    [OnEveryBackend]
    public void A_failed_recomputation_is_thrown_by_Backward_on_every_rank(Backend backend)
    {
        var c = Config(BlockKind.Parallel);
        var plan = new ShardingPlan(c, 2);
        var messages = Backends.Run(backend, new DeviceMesh(1, 2), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, CommMode.Overlapped, ScalarType.Float32);
            shard.Module.Checkpointing = ActivationCheckpointing.Blocks(1);
            // Every rank fails at the same point (before the recomputation's first collective), so the ranks' sequences
            // of collectives stay matched and the rest of the backward pass completes.
            var block = (nn.Module<Tensor, long[], Tensor>)shard.Module.named_modules().Single(m => m.name == "blocks.1").module;
            var hook = block.register_forward_pre_hook((_, x, counts) =>
                torch.is_grad_enabled() ? throw new InvalidOperationException($"injected on rank {shard.ModelIndex}") : (x, counts));
            using var images = TestUtil.RandomImages(c, 2, seed: 14, ScalarType.Float32);
            using var scope = torch.NewDisposeScope();
            var loss = shard.Forward(images).sum();
            var ex = Assert.Throws<InvalidOperationException>(() => shard.Backward(loss));
            hook.remove();
            Assert.True(shard.Module.named_parameters().Single(p => p.name == "blocks.1.in_proj.weight").parameter.grad!.isnan().all().item<bool>());
            return ex.Message;
        });
        Assert.Equal(new[] { "injected on rank 0", "injected on rank 1" }, messages);
    }
}
