using TorchSharp;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Torch;
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
    /// model-axis group pass the same images. Returns once the pass's collectives have finished
    /// (<see cref="ICommunicator.Synchronize"/>), so a failed one is reported here. A failure of the rank's own in the
    /// middle of the pass aborts its communicators: the peers wait for collectives this rank will not issue. An
    /// ArgumentException is passed on without aborting, as the image checks throw one before anything is issued (a
    /// count check of the ring loops that threw one mid-pass would leave the communicators as they are).</summary>
    /// <exception cref="CommunicatorException">A collective of the pass failed.</exception>
    public Tensor Forward(Tensor images)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        Tensor output;
        try
        {
            output = Module.call(images);
        }
        catch (Exception e) when (e is not (CommunicatorException or ArgumentException))
        {
            Rank.Model.Abort(e);
            Rank.Data.Abort(e);
            throw;
        }
        try
        {
            Rank.Model.Synchronize();
            Rank.Data.Synchronize();
        }
        catch
        {
            output.Dispose();
            throw;
        }
        return output;
    }

    /// <summary>
    /// <c>loss.backward()</c>, then throws any failure of a collective inside it (a peer that failed or timed out: a
    /// collective that fails inside libtorch's backward cannot throw through it, so it is recorded and thrown here).
    /// </summary>
    /// <exception cref="CommunicatorException">A collective of the backward pass failed on this rank (also one that
    /// failed after its <c>Wait</c> returned: the pass ends with <see cref="ICommunicator.Synchronize"/>).</exception>
    /// <remarks>Any other exception from <c>loss.backward()</c> aborts both communicators before it is passed on: the
    /// peers expect collectives this rank will not issue.</remarks>
    public void Backward(Tensor loss)
    {
        ArgumentNullException.ThrowIfNull(loss);
        ObjectDisposedException.ThrowIf(_disposed, this);
        try
        {
            loss.backward();
            FinishGradientBuckets();
        }
        catch (Exception e) when (e is not CommunicatorException)
        {
            // libtorch failed inside the pass (out of memory in a native node, say): the peers wait for collectives
            // and gradient buckets this rank will not issue.
            Rank.Model.Abort(e);
            Rank.Data.Abort(e);
            throw;
        }
        finally
        {
            _s.GradientBuckets.Discard();
        }
        BackwardFailures.ThrowIfAny(Rank.Model, Rank.Data);
        Rank.Model.Synchronize();    // a collective that failed after its Wait returned (NCCL) is reported here
        Rank.Data.Synchronize();
    }

    /// <summary>
    /// On a data axis of more than one rank: the size of the buckets in which backward reduces the gradients of the
    /// block weights over the data axis (default <see cref="DefaultBucketBytes"/>): reduce-scatters of the data-sharded
    /// weights under FSDP, all-reduces (averages) of the replicated ones otherwise. A bucket is issued as soon as
    /// backward has produced that many bytes of such gradients and is not waited for there (at most two are in flight:
    /// the oldest is finished before another is issued); <see cref="Backward"/> issues the last ones and finishes them all
    /// after the pass. 0 reduces each gradient on its own. Every element is summed as by its own collective (the same bit
    /// for bit on the in-process backend; NCCL may choose another summation order for a larger message). Set it between
    /// steps, to the same value on every rank: the ranks of the data axis must close their buckets at the same gradients.
    /// </summary>
    public long BackwardBucketBytes
    {
        get => _s.GradientBuckets.BucketBytes;
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            _s.GradientBuckets.BucketBytes = value;
        }
    }

    // The buckets left open or in flight at the end of a backward pass; a failure is recorded like one inside backward.
    // After a failed data-axis collective the data peers may never issue these, so they are dropped instead. A
    // model-axis failure does not stop them: the data peers (in other model groups) are healthy and will issue them,
    // and reducing buckets of unusable gradients does no harm (Backward throws the failure right after).
    private void FinishGradientBuckets()
    {
        if (BackwardFailures.HasFailed(Rank.Data)) return;
        try
        {
            using var noGrad = torch.no_grad();
            _s.GradientBuckets.Finish(Rank.Data);
        }
        catch (Exception e)
        {
            BackwardFailures.Record(Rank.Data, e);
            if (e is not CommunicatorException) Rank.Data.Abort(e);   // the data peers expect these collectives
        }
    }

    /// <summary>The default bucket size of <see cref="SynchronizeGradients"/>: 25 MiB, as PyTorch's DDP.</summary>
    public const long DefaultBucketBytes = 25L << 20;

    /// <summary>
    /// After <see cref="Backward"/>: sums over the model axis the gradients of replicated block parameters that saw
    /// only this rank's tokens or heads (norm scales, QK-norm scales, output biases), then averages over the data
    /// axis the gradients that backward did not already reduce there (the block weights' were, in
    /// <see cref="BackwardBucketBytes"/> buckets; what remains is the stem, the head and the blocks' norm scales
    /// and biases; a block weight's gradient that does not come through the blocks' forward, such as a penalty computed
    /// on <c>Module.parameters()</c>, is therefore not averaged). Gradients are packed into buckets of up to
    /// <paramref name="bucketBytes"/> in reverse state-dict order
    /// (the order backward produces them, last block first; a larger gradient is a bucket of its own), one all-reduce per
    /// bucket, the next bucket issued before the previous one is waited for; 0 reduces each gradient on its own. Each
    /// element is summed exactly as without buckets, so the results are the same bit for bit.
    /// </summary>
    /// <returns>The collectives issued and the bytes they reduced, per axis.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="bucketBytes"/> is negative.</exception>
    public GradientSync SynchronizeGradients(long bucketBytes = DefaultBucketBytes)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(bucketBytes);
        FinishGradientBuckets();                   // when backward was run without Backward()
        _s.GradientBuckets.Discard();
        BackwardFailures.ThrowIfAny(Rank.Model, Rank.Data);
        var inBackward = _s.GradientBuckets.TakeCounts();
        var shapes = Plan.FullShapes();
        var modelAxis = new List<Tensor>();
        var dataAxis = new List<Tensor>();
        foreach (var (key, p) in Module.named_parameters().Reverse())
        {
            var g = p.grad ?? throw new InvalidOperationException($"Parameter '{key}' has no gradient; call backward() on every rank first.");
            var full = shapes[key];
            if (Plan.IsPartialOnModelAxis(key, full)) modelAxis.Add(g);
            if (Rank.Mesh.DataSize > 1 && !Plan.IsFsdpSharded(key, full) && !inBackward.Averaged.Contains(key)) dataAxis.Add(g);
        }
        using var noGrad = torch.no_grad();
        var (modelOps, modelBytes) = AllReduceInBuckets(Rank.Model, modelAxis, bucketBytes, divideBy: 1);
        var (dataOps, dataBytes) = AllReduceInBuckets(Rank.Data, dataAxis, bucketBytes, divideBy: Rank.Mesh.DataSize);
        Rank.Model.Synchronize();    // the gradients are final only once every all-reduce has finished
        Rank.Data.Synchronize();
        return new GradientSync(modelOps, modelBytes, dataOps + inBackward.AllReduces, dataBytes + inBackward.AllReduceBytes,
            inBackward.ReduceScatters, inBackward.ReduceScatterBytes, inBackward.AllReduces);
    }

    // Sums each tensor over the group in place (then divides), packed into buckets; at most two buckets in flight.
    private static (int Collectives, long Bytes) AllReduceInBuckets(ICommunicator comm, List<Tensor> grads, long bucketBytes, int divideBy)
    {
        var buckets = new List<List<Tensor>>();
        long filled = 0;
        foreach (var g in grads)
        {
            long bytes = g.numel() * g.element_size();
            bool fits = buckets.Count > 0 && filled + bytes <= bucketBytes && buckets[^1][0].dtype == g.dtype;
            if (!fits)
            {
                buckets.Add(new List<Tensor>());
                filled = 0;
            }
            buckets[^1].Add(g);
            filled += bytes;
        }
        long total = 0;
        var inFlight = new Queue<(ICommWork Work, List<Tensor> Bucket, Tensor Flat)>();
        try
        {
            foreach (var bucket in buckets)
            {
                var flat = Flatten(bucket);
                total += flat.numel() * flat.element_size();
                ICommWork work;
                try
                {
                    work = comm.AllReduceAsync(flat);
                }
                catch
                {
                    flat.Dispose();
                    throw;
                }
                inFlight.Enqueue((work, bucket, flat));
                if (inFlight.Count > 1) Finish(inFlight.Dequeue(), divideBy);
            }
            while (inFlight.Count > 0) Finish(inFlight.Dequeue(), divideBy);
        }
        finally
        {
            // An exception left buckets in flight: wait for them (Dispose) before their buffers go.
            foreach (var (work, _, flat) in inFlight)
            {
                work.Dispose();
                flat.Dispose();
            }
        }
        return (buckets.Count, total);
    }

    private static Tensor Flatten(List<Tensor> bucket)
    {
        if (bucket.Count == 1) return bucket[0].reshape(-1).clone();
        using var scope = torch.NewDisposeScope();
        return torch.cat(bucket.Select(g => g.reshape(-1)).ToArray()).DetachFromDisposeScope();
    }

    private static void Finish((ICommWork Work, List<Tensor> Bucket, Tensor Flat) item, int divideBy)
    {
        using var scope = torch.NewDisposeScope();
        var sum = item.Work.WaitThenRelease(item.Flat);
        if (divideBy > 1) sum.DivideInPlace(divideBy);
        long offset = 0;
        foreach (var g in item.Bucket)
        {
            long n = g.numel();
            g.copy_(sum.narrow(0, offset, n).view(g.shape));
            offset += n;
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
    /// Copies this rank's slices of a full checkpoint into its shard, reading only those slices
    /// (<see cref="ITensorSource.ReadSlice"/>: from a memory mapping for safetensors files and Hugging Face indexes),
    /// one parameter at a time, so the host memory a load needs beyond the shard is one slice's staging buffer, never
    /// the checkpoint. Every key and shape is checked before anything is copied. Local; no communication.
    /// </summary>
    /// <exception cref="KeyNotFoundException">The checkpoint lacks a parameter (named with the source).</exception>
    /// <exception cref="ArgumentException">A parameter has another shape in the checkpoint (named, both shapes).</exception>
    public void LoadFull(ITensorSource source)
    {
        ArgumentNullException.ThrowIfNull(source);
        ObjectDisposedException.ThrowIf(_disposed, this);
        var shapes = Plan.FullShapes();
        foreach (var (key, shape) in shapes) TensorSources.CheckShape(source, key, shape);
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in Module.state_dict())
        {
            var spec = Plan.Spec(key, shapes[key], ModelIndex, DataIndex);
            using var slice = spec.IsWhole ? source.Read(key) : source.ReadSlice(key, spec.Dim, spec.Segments);
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
        var result = new Dictionary<string, Tensor>();
        foreach (var (key, whole) in Gathered()) result[key] = whole;
        return result;
    }

    /// <summary>
    /// Writes the full (unsharded) model to one safetensors file (timm's keys, this model's dtype), gathering one
    /// parameter at a time over the mesh and writing it before the next is gathered, so beside its shard a rank holds
    /// the copies that one parameter's gather makes (the gathered parameter and the backend's working copies, for a
    /// parameter split along its second dimension also its transposed copies; on the writing rank the parameter on the
    /// CPU, a copy when the mesh is on GPUs, and the same reordered into the file's layout), never the whole model
    /// (measured: MemoryPlannerTests). Every rank calls it; the rank at mesh position 0 writes <paramref name="path"/>
    /// (atomically: the file appears when complete). The file loads into a single-device <see cref="VisionTransformer"/>
    /// (<see cref="SafetensorsCheckpoint.Load(nn.Module, string, bool, string)"/>) or into any mesh
    /// (<see cref="LoadFull(ITensorSource)"/>).
    /// </summary>
    public void SaveFull(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (Rank.Rank != 0)
        {
            // The collectives only: nothing is copied to the CPU or reordered on a rank that does not write.
            var full = Plan.FullShapes();
            foreach (var (key, p) in Module.state_dict()) Gather(key, p, full[key], keep: false);
            return;
        }
        var shapes = Plan.FullShapes();
        var layout = Module.state_dict().Select(kv => (kv.Key, kv.Value.dtype, shapes[kv.Key])).ToList();
        var metadata = new Dictionary<string, string> { ["config"] = ViTConfigJson.ToJson(Plan.Config) };
        using var gathered = Gathered().GetEnumerator();
        try
        {
            Safetensors.SaveStreamed(path, layout, emit =>
            {
                while (gathered.MoveNext())
                    using (gathered.Current.Whole) emit(gathered.Current.Key, gathered.Current.Whole);
            }, metadata);
        }
        catch (Exception e) when (e is not CommunicatorException)
        {
            // The file could not be written (a missing folder, a full disk): the other ranks are still gathering, so take
            // part in the remaining collectives before throwing, instead of leaving them to their timeout.
            while (gathered.MoveNext()) gathered.Current.Whole.Dispose();
            throw;
        }
    }

    // Each parameter gathered whole on the CPU, in state-dict order (a collective per parameter on every rank).
    private IEnumerable<(string Key, Tensor Whole)> Gathered()
    {
        var shapes = Plan.FullShapes();
        foreach (var (key, p) in Module.state_dict()) yield return (key, Gather(key, p, shapes[key], keep: true)!);
    }

    // No dispose scope or grad mode may stay open across the iterator's yield, so each gather is a method of its own.
    // Without keep, only the collectives run (null).
    private Tensor? Gather(string key, Tensor p, long[] full, bool keep)
    {
        using var noGrad = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var t = p.detach();
        if (Plan.IsFsdpSharded(key, full))
            t = Rank.Data.AllGatherAlong(t, Plan.FsdpCounts(key, full, ModelIndex), Plan.FsdpDim(key, full));
        var mine = Plan.ModelSpec(key, full, ModelIndex);
        if (mine.IsWhole) return keep ? t.cpu().clone().DetachFromDisposeScope() : null;
        var specs = Enumerable.Range(0, Plan.ModelSize).Select(m => Plan.ModelSpec(key, full, m)).ToArray();
        var onDevice = Rank.Model.AllGatherAlong(t, specs.Select(sp => sp.LocalShape[sp.Dim]).ToArray(), mine.Dim);
        if (!keep) return null;
        var gathered = onDevice.cpu();
        var whole = torch.empty(full, dtype: t.dtype, device: torch.CPU);
        long offset = 0;
        foreach (var sp in specs)
        {
            long n = sp.LocalShape[sp.Dim];
            ShardingPlan.Place(whole, gathered.narrow(sp.Dim, offset, n), sp with { FullShape = full });
            offset += n;
        }
        return whole.DetachFromDisposeScope();
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
            _s.GradientBuckets.Discard();      // buckets left by a backward that was never synchronized
            Module.Dispose();
        }
        finally
        {
            Rank.Dispose();
        }
    }
}
