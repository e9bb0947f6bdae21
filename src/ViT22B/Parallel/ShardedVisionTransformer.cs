using TorchSharp;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// One rank's shard of a <see cref="VisionTransformer"/>, with what it needs to run: the sharding plan, the rank's
/// context (mesh place, device, communicators) and the communication mode. The stem, final norm and head are
/// replicated; the blocks are tensor-parallel over the mesh's <c>model</c> axis (<see cref="ShardingPlan"/>); the
/// <c>data</c> axis splits the batch, and optionally (FSDP) the block weights too. <see cref="Module"/> is an
/// ordinary <see cref="VisionTransformer"/> whose state dict has the full model's keys with shard shapes, so
/// optimizers and trainers take it as they take any model.
/// <para>Every rank of the mesh builds one and calls the same methods in the same order (each is a collective over
/// the mesh unless its summary says otherwise). Disposing it disposes the module and the rank context with its
/// communicators.</para>
/// <code>
/// using var shard = new ShardedVisionTransformer(plan, rank);    // on every rank
/// shard.LoadFull(fullStateDict);                               // or shard.Load(folder)
/// var loss = Loss(shard.Forward(myImages));
/// shard.Backward(loss);
/// shard.SynchronizeGradients();                                // then optimizer.Step() on shard.Module
/// </code>
/// </summary>
public sealed class ShardedVisionTransformer : IDisposable
{
    private readonly ShardContext _s;
    private bool _disposed;

    /// <summary>
    /// Creates this rank's shard on its device, allocating only its shards, initialized from the same distributions
    /// as the full model (big_vision init with the full parameters' bounds). Takes ownership of
    /// <paramref name="rank"/> once built: disposing the shard disposes it (and its communicators), so a context serves
    /// one shard. If the constructor throws, the caller keeps the context.
    /// </summary>
    /// <exception cref="ArgumentException">The plan is for another mesh shape than the rank's.</exception>
    public ShardedVisionTransformer(ShardingPlan plan, RankContext rank, CommMode mode = CommMode.Overlapped, ScalarType? dtype = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(rank);
        if (plan.ModelSize != rank.Mesh.ModelSize || plan.DataSize != rank.Mesh.DataSize)
            throw new ArgumentException($"The plan is for a {plan.DataSize}×{plan.ModelSize} mesh but the rank belongs to a {rank.Mesh.DataSize}×{rank.Mesh.ModelSize} mesh.");
        _s = new ShardContext(plan, rank, mode);
        var s = _s;
        Module = new VisionTransformer(plan.Config, rank.Device, dtype,
            (c, device, dt) => new ShardedEncoder(c.Block, c.Depth, c.BlockOptions, s, device, dt),
            m => ShardedInitialization.Apply(m, plan, s.ModelIndex, s.DataIndex));
    }

    /// <summary>This rank's shard: a <see cref="VisionTransformer"/> with the full model's keys and shard shapes.</summary>
    public VisionTransformer Module { get; }

    /// <summary>The sharding plan.</summary>
    public ShardingPlan Plan => _s.Plan;

    /// <summary>The rank's context: mesh, device, communicators.</summary>
    public RankContext Rank => _s.Rank;

    /// <summary>Overlapped (ring) or plain communication.</summary>
    public CommMode Mode => _s.Mode;

    /// <summary>This rank's index on the model axis.</summary>
    public int ModelIndex => _s.ModelIndex;

    /// <summary>This rank's index on the data axis.</summary>
    public int DataIndex => _s.DataIndex;

    /// <summary>Bytes of this rank's parameters (local; no communication).</summary>
    public long ParameterBytes
    {
        get
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            return Module.parameters().Sum(p => p.numel() * p.element_size());
        }
    }

    /// <summary>This rank's images [B_r, C, H, W] → its logits (or pooled embeddings) [B_r, …]; the ranks of a
    /// model-axis group pass the same images.</summary>
    public Tensor Forward(Tensor images)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return Module.call(images);
    }

    /// <summary>
    /// <c>loss.backward()</c>, then throws any failure of a collective inside it (a peer that failed or timed out: a
    /// collective that fails inside libtorch's backward cannot throw through it, so it is recorded and thrown here).
    /// </summary>
    /// <exception cref="CommunicatorException">A collective of the backward pass failed on this rank.</exception>
    public void Backward(Tensor loss)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ObjectDisposedException.ThrowIf(_disposed, this);
        loss.backward();
        BackwardFailures.ThrowIfAny(Rank.Model, Rank.Data);
    }

    /// <summary>
    /// After <see cref="Backward"/>: sums over the model axis the gradients of replicated block parameters that saw
    /// only this rank's tokens or heads (norm scales, QK-norm scales, output biases), then averages over the data
    /// axis the gradients that are not already data-sharded (FSDP gradients were reduce-scattered and averaged in
    /// backward). The order of collectives is the state-dict order, the same on every rank.
    /// </summary>
    public void SynchronizeGradients()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        BackwardFailures.ThrowIfAny(Rank.Model, Rank.Data);
        var shapes = Plan.FullShapes();
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in Module.named_parameters())
        {
            var g = p.grad ?? throw new InvalidOperationException($"Parameter '{key}' has no gradient; call backward() on every rank first.");
            var full = shapes[key];
            if (Plan.IsPartialOnModelAxis(key, full))
            {
                using var sum = Rank.Model.AllReduce(g);
                g.copy_(sum);
            }
            if (Rank.Mesh.DataSize > 1 && !Plan.IsFsdpSharded(key, full))
            {
                using var sum = Rank.Data.AllReduce(g);
                g.copy_(sum.div_(Rank.Mesh.DataSize));
            }
        }
    }

    /// <summary>Copies this rank's slices of a full state dict into its shard (every key must be present; local, no
    /// communication).</summary>
    public void LoadFull(IReadOnlyDictionary<string, Tensor> full)
    {
        ArgumentNullException.ThrowIfNull(full);
        ObjectDisposedException.ThrowIf(_disposed, this);
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in Module.state_dict())
        {
            if (!full.TryGetValue(key, out var source)) throw new KeyNotFoundException($"The full state dict has no '{key}'.");
            var spec = Plan.Spec(key, source.shape, ModelIndex, DataIndex);
            using var slice = ShardingPlan.Slice(source, spec);
            if (!slice.shape.SequenceEqual(p.shape))
                throw new ArgumentException($"'{key}': the shard holds [{string.Join(", ", p.shape)}] but the plan cuts [{string.Join(", ", slice.shape)}] from the full [{string.Join(", ", source.shape)}].");
            p.copy_(slice);
        }
    }

    /// <summary>
    /// The full (unsharded) state dict on the CPU, on every rank: each parameter's data-axis shards are all-gathered
    /// (FSDP), then its model-axis shards, one parameter at a time in state-dict order.
    /// </summary>
    public Dictionary<string, Tensor> Unshard()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var shapes = Plan.FullShapes();
        var result = new Dictionary<string, Tensor>();
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in Module.state_dict())
        {
            using var scope = torch.NewDisposeScope();
            var full = shapes[key];
            var t = p.detach();
            if (Plan.IsFsdpSharded(key, full))
                t = Rank.Data.AllGatherAlong(t, Plan.FsdpCounts(key, full, ModelIndex), Plan.FsdpDim(key, full));
            var mine = Plan.ModelSpec(key, full, ModelIndex);
            Tensor whole;
            if (mine.IsWhole) whole = t.cpu().clone();
            else
            {
                var specs = Enumerable.Range(0, Plan.ModelSize).Select(m => Plan.ModelSpec(key, full, m)).ToArray();
                var gathered = Rank.Model.AllGatherAlong(t, specs.Select(sp => sp.LocalShape[sp.Dim]).ToArray(), mine.Dim).cpu();
                whole = torch.empty(full, dtype: t.dtype, device: torch.CPU);
                long offset = 0;
                foreach (var sp in specs)
                {
                    long n = sp.LocalShape[sp.Dim];
                    ShardingPlan.Place(whole, gathered.narrow(sp.Dim, offset, n), sp with { FullShape = full });
                    offset += n;
                }
            }
            result[key] = whole.DetachFromDisposeScope();
        }
        return result;
    }

    /// <summary>Saves this rank's shard into a sharded checkpoint folder (<see cref="ShardedCheckpoint.Save"/>).</summary>
    public void Save(string folder)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ShardedCheckpoint.Save(this, folder);
    }

    /// <summary>Loads a sharded checkpoint written with any mesh (<see cref="ShardedCheckpoint.Load"/>).</summary>
    public void Load(string folder)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ShardedCheckpoint.Load(this, folder);
    }

    /// <summary>Disposes the module and the rank context (with its communicators).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        try
        {
            Module.Dispose();
        }
        finally
        {
            Rank.Dispose();
        }
    }
}
