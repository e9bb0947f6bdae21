using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// One rank's part of block-streamed inference (<see cref="StreamedVisionTransformer"/>) with tensor-parallel blocks:
/// the replicated stem and head are resident; for each block in turn the rank builds its shard
/// (<see cref="ShardingPlan"/>), copies its slices of the block's weights out of the source, runs the sharded block
/// with the same communication as <see cref="ShardedVisionTransformer"/>, and releases it, with the next block's
/// shard loaded on a second thread meanwhile. So each rank holds at most two block shards, never a whole block.
/// <para>Every rank of the mesh builds one and calls <see cref="Forward"/> together. The weight source must be safe to
/// read from several threads (<see cref="SeededWeights"/> is; give each rank its own <see cref="SafetensorsReader"/>),
/// or be a different object on every rank. Disposing it disposes the resident parameters and the rank context.</para>
/// </summary>
public sealed class StreamedShardedVisionTransformer : IDisposable
{
    private readonly VisionTransformer _model;
    private readonly StreamedShardedEncoder _blocks;
    private readonly RankContext _rank;

    /// <summary>Loads this rank's resident parameters from <paramref name="weights"/> and checks every block key.</summary>
    /// <exception cref="ArgumentException">The plan is for another mesh, or uses FSDP (inference has no data-sharded
    /// weights here), or a parameter has another shape in the source.</exception>
    /// <exception cref="KeyNotFoundException">A parameter is missing from the source.</exception>
    public StreamedShardedVisionTransformer(ShardingPlan plan, RankContext rank, ITensorSource weights, CommMode mode = CommMode.Overlapped,
        ScalarType? dtype = null, bool prefetch = true)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(rank);
        ArgumentNullException.ThrowIfNull(weights);
        if (plan.ModelSize != rank.Mesh.ModelSize || plan.DataSize != rank.Mesh.DataSize)
            throw new ArgumentException($"The plan is for a {plan.DataSize}×{plan.ModelSize} mesh but the rank belongs to a {rank.Mesh.DataSize}×{rank.Mesh.ModelSize} mesh.");
        if (plan.Fsdp) throw new ArgumentException("Streamed inference splits the blocks over the model axis only; use a plan without FSDP.");
        foreach (var (key, shape) in plan.FullShapes()) TensorSources.CheckShape(weights, key, shape);
        var s = new ShardContext(plan, rank, mode);
        StreamedShardedEncoder? blocks = null;
        _model = new VisionTransformer(plan.Config, rank.Device, dtype,
            (c, device, dt) => blocks = new StreamedShardedEncoder(s, weights, device, dt, prefetch),
            m => StreamedVisionTransformer.Load(m, weights, ""));
        (_blocks, _rank) = (blocks!, rank);
    }

    /// <summary>Where the time of this rank's last pass went.</summary>
    public StreamingStats? LastPass => _blocks.LastPass;

    /// <summary>This rank's images [B_r, C, H, W] → logits (or pooled embeddings), without gradients; the ranks of a
    /// model-axis group pass the same images.</summary>
    public Tensor Forward(Tensor images)
    {
        using var inference = torch.inference_mode();
        return _model.call(images);
    }

    /// <summary>Pooled embedding, patch tokens and logits, as <see cref="VisionTransformer.Encode"/>; without gradients.</summary>
    public ViTOutput Encode(Tensor images)
    {
        using var inference = torch.inference_mode();
        return _model.Encode(images);
    }

    /// <summary>Releases the resident parameters and the rank context.</summary>
    public void Dispose()
    {
        try
        {
            _model.Dispose();
        }
        finally
        {
            _rank.Dispose();
        }
    }
}

/// <summary>The block stack of a <see cref="StreamedShardedVisionTransformer"/>: token chunks as in the sharded
/// encoder, block shards built from the weight source as the pass reaches them.</summary>
internal sealed class StreamedShardedEncoder : StreamedBlockStack
{
    private readonly ShardContext _s;
    private readonly ITensorSource _weights;
    private readonly Device _device;
    private readonly ScalarType _dtype;

    public StreamedShardedEncoder(ShardContext s, ITensorSource weights, Device device, ScalarType dtype, bool prefetch)
        : base(nameof(StreamedShardedEncoder), prefetch)
    {
        (_s, _weights, _device, _dtype) = (s, weights, device, dtype);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var comm = _s.Rank.Model;
        var counts = TokenPartition.Counts(x.shape[1], comm.Size);
        var h = Regions.ScatterTokens(x.transpose(0, 1).contiguous(), comm, counts);   // [T_r, B, D], contiguous (see Rings)
        var y = Stream(_s.Plan.Config.Depth, Load, (block, t) => block.call(t, counts), h);
        return Regions.GatherTokens(y, comm, counts).transpose(0, 1).contiguous().MoveToOuterDisposeScope();
    }

    private nn.Module<Tensor, long[], Tensor> Load(int index)
    {
        var c = _s.Plan.Config;
        nn.Module<Tensor, long[], Tensor> block = c.Block == BlockKind.Parallel
            ? new ShardedParallelBlock(c.BlockOptions, index, _s, _device, _dtype)
            : new ShardedSequentialBlock(c.BlockOptions, index, _s, _device, _dtype);
        try
        {
            using var noGrad = torch.no_grad();
            string prefix = $"blocks.{index}.";
            foreach (var (name, p) in block.named_parameters())
            {
                string key = prefix + name;
                var spec = _s.Plan.Spec(key, _s.Plan.FullShapes()[key], _s.ModelIndex, _s.DataIndex);
                using var slice = spec.IsWhole ? _weights.Read(key) : _weights.ReadSlice(key, spec.Dim, spec.Segments);
                p.copy_(slice);
            }
            return block;
        }
        catch
        {
            block.Dispose();
            throw;
        }
    }
}
