using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// big_vision's initialization (<see cref="Initialization"/>) on one rank's shard: the same rules in the same order,
/// with each sub-block of a fused weight filled with the bounds of the full parameter, so that a sharded model is
/// initialized from the same distributions as the full one.
/// </summary>
internal static class ShardedInitialization
{
    public static void Apply(VisionTransformer shard, ShardingPlan plan, int model, int data)
    {
        var shapes = plan.FullShapes();
        foreach (var (key, p) in shard.named_parameters())
        {
            var spec = plan.Spec(key, shapes[key], model, data);
            if (!spec.LocalShape.SequenceEqual(p.shape))
                throw new InvalidOperationException($"Parameter '{key}' has shape [{string.Join(", ", p.shape)}] but the plan gives this rank [{string.Join(", ", spec.LocalShape)}].");
        }
        Initialization.Initialize(shard, key => shapes[key], (key, w, axis, ranges, generator) => Xavier(key, w, plan.Spec(key, shapes[key], model, data), axis, ranges, generator));
    }

    // When the shard is cut along the sub-blocks' axis, each local range is mapped back to its full index to find its
    // sub-block; otherwise the sub-blocks lie across the local tensor as they do across the full one.
    private static void Xavier(string key, Tensor w, ShardSpec spec, int axis, IReadOnlyList<(long Start, long End, double Bound)> ranges, Generator? generator)
    {
        if (spec.Dim != axis || spec.IsWhole)
        {
            Initialization.FillWhole(key, w, axis, ranges, generator);
            return;
        }
        long local = 0;
        foreach (var (segStart, segLen) in spec.Segments)
        {
            foreach (var (a, b, bound) in ranges)
            {
                long lo = Math.Max(a, segStart), hi = Math.Min(b, segStart + segLen);
                if (hi <= lo) continue;
                using var block = w.narrow(axis, local + lo - segStart, hi - lo);   // kept alive through the native call
                block.uniform_(-bound, bound, generator);
            }
            local += segLen;
        }
    }
}
