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
            (c, _, dt) => blocks = new StreamedShardedEncoder(s, weights, dt, prefetch),
            m => StreamedVisionTransformer.Load(m, weights, ""));
        (_blocks, _rank) = (blocks!, rank);
    }

    /// <summary>Where the time of this rank's last pass went.</summary>
    public StreamingStats? LastPass => _blocks.LastPass;

    /// <summary>This rank's images [B_r, C, H, W] → logits (or pooled embeddings), without gradients; the ranks of a
    /// model-axis group pass the same images. Returns once the pass's collectives have finished
    /// (<see cref="ICommunicator.Synchronize"/>), so a failed one is reported here. A failure of the rank's own in the
    /// middle of the pass (a block's weights that cannot be read, memory) aborts its model-axis communicator, as
    /// <see cref="ShardedVisionTransformer.Forward"/> does: its peers wait for collectives it will not issue, and a
    /// next pass would pair its collectives with theirs from this one.</summary>
    /// <exception cref="CommunicatorException">A collective of the pass failed, or an earlier failure aborted the
    /// communicator.</exception>
    public Tensor Forward(Tensor images)
    {
        using var inference = torch.inference_mode();
        return Synchronized(AbortingOnFailure(() => _model.call(images)));
    }

    /// <summary>Pooled embedding, patch tokens and logits, as <see cref="VisionTransformer.Encode"/>; without gradients.</summary>
    public ViTOutput Encode(Tensor images)
    {
        using var inference = torch.inference_mode();
        return Synchronized(AbortingOnFailure(() => _model.Encode(images)));
    }

    // The data axis has no collectives in inference (no FSDP): only the model axis is aborted. An ArgumentException is
    // passed on as it is, as the image checks throw one before anything is issued.
    private T AbortingOnFailure<T>(Func<T> pass)
    {
        try
        {
            return pass();
        }
        catch (Exception e) when (e is not (CommunicatorException or ArgumentException))
        {
            _rank.Model.Abort(e);
            throw;
        }
    }

    private T Synchronized<T>(T output) where T : IDisposable
    {
        try
        {
            _rank.Model.Synchronize();
            return output;
        }
        catch
        {
            output.Dispose();
            throw;
        }
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
