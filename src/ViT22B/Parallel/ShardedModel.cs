using TorchSharp;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// Builds and drives one rank's shard of a <see cref="VisionTransformer"/>: the stem, final norm and head are
/// replicated; the blocks are tensor-parallel over the mesh's <c>model</c> axis (<see cref="ShardingPlan"/>); the
/// <c>data</c> axis splits the batch, and optionally (FSDP) the block weights too. The returned module is an
/// ordinary <see cref="VisionTransformer"/> whose state dict has the full model's keys with shard shapes.
/// </summary>
public static class ShardedModel
{
    /// <summary>
    /// Creates this rank's shard on its device, allocating only its shards, initialized from the same distributions
    /// as the full model (big_vision init with the full parameters' bounds).
    /// </summary>
    public static VisionTransformer Create(ShardContext s, ScalarType? dtype = null)
    {
        ArgumentNullException.ThrowIfNull(s);
        var plan = s.Plan;
        if (plan.ModelSize != s.Rank.Mesh.ModelSize || plan.DataSize != s.Rank.Mesh.DataSize)
            throw new ArgumentException($"The plan is for a {plan.DataSize}×{plan.ModelSize} mesh but the rank belongs to a {s.Rank.Mesh.DataSize}×{s.Rank.Mesh.ModelSize} mesh.");
        var shapes = plan.FullShapes();
        return new VisionTransformer(plan.Config, s.Rank.Device, dtype,
            (c, device, dt) => new ShardedEncoder(c, s, device, dt),
            key => plan.Spec(key, shapes[key], s.ModelIndex, s.DataIndex));
    }

    /// <summary>Copies this rank's slices of a full state dict into its shard (every key must be present).</summary>
    public static void LoadFull(VisionTransformer shard, ShardContext s, IReadOnlyDictionary<string, Tensor> full)
    {
        ArgumentNullException.ThrowIfNull(shard);
        ArgumentNullException.ThrowIfNull(full);
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in shard.state_dict())
        {
            if (!full.TryGetValue(key, out var source)) throw new KeyNotFoundException($"The full state dict has no '{key}'.");
            var spec = s.Plan.Spec(key, source.shape, s.ModelIndex, s.DataIndex);
            using var slice = ShardingPlan.Slice(source, spec);
            if (!slice.shape.SequenceEqual(p.shape))
                throw new ArgumentException($"'{key}': the shard holds [{string.Join(", ", p.shape)}] but the plan cuts [{string.Join(", ", slice.shape)}] from the full [{string.Join(", ", source.shape)}].");
            p.copy_(slice);
        }
    }

    /// <summary>
    /// <c>loss.backward()</c> for a shard, then throws any failure of a collective inside it (a peer that failed or
    /// timed out; see <see cref="BackwardFailures"/>). A plain <c>loss.backward()</c> works too, but leaves such a
    /// failure to be thrown by <see cref="SynchronizeGradients"/> or the next collective.
    /// </summary>
    /// <exception cref="CommunicatorException">A collective of the backward pass failed on this rank.</exception>
    public static void Backward(Tensor loss, ShardContext s)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ArgumentNullException.ThrowIfNull(s);
        loss.backward();
        BackwardFailures.ThrowIfAny(s.Rank.Model, s.Rank.Data);
    }

    /// <summary>
    /// After <c>backward()</c>: sums over the model axis the gradients of replicated block parameters that saw only
    /// this rank's tokens or heads (norm scales, QK-norm scales, output biases), then averages over the data axis the
    /// gradients that are not already data-sharded (FSDP gradients were reduce-scattered and averaged in backward).
    /// Every rank must call it; the order of collectives is the state-dict order, the same on every rank.
    /// </summary>
    public static void SynchronizeGradients(VisionTransformer shard, ShardContext s)
    {
        ArgumentNullException.ThrowIfNull(shard);
        ArgumentNullException.ThrowIfNull(s);
        BackwardFailures.ThrowIfAny(s.Rank.Model, s.Rank.Data);
        var shapes = s.Plan.FullShapes();
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in shard.named_parameters())
        {
            var g = p.grad ?? throw new InvalidOperationException($"Parameter '{key}' has no gradient; call backward() on every rank first.");
            var full = shapes[key];
            if (s.Plan.IsPartialOnModelAxis(key, full))
            {
                using var sum = s.Rank.Model.AllReduce(g);
                g.copy_(sum);
            }
            if (s.Rank.Mesh.DataSize > 1 && !s.Plan.IsFsdpSharded(key, full))
            {
                using var sum = s.Rank.Data.AllReduce(g);
                g.copy_(sum.div_(s.Rank.Mesh.DataSize));
            }
        }
    }

    /// <summary>Bytes of this rank's parameters.</summary>
    public static long ParameterBytes(VisionTransformer shard) => shard.parameters().Sum(p => p.numel() * p.element_size());
}
