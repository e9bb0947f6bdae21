using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// One rank's data-axis gradient reductions that run inside backward, bucketed and overlapped with it. The block
/// weights reach compute through an autograd function (<see cref="ShardContext.Use"/>) whose backward hands their
/// gradient here and gives autograd zeros: under FSDP a data-sharded weight's full (model-axis) gradient, to be
/// reduce-scattered (<see cref="AddShard"/>); otherwise a data-replicated weight's gradient, to be all-reduced
/// (<see cref="AddReplica"/>). Each kind fills an open bucket of its own; once it holds <see cref="BucketBytes"/> or
/// more (or a gradient of another dtype arrives), one collective over the data axis is issued for the whole bucket.
/// An issued bucket is not waited for there: at most <see cref="MaxInFlight"/> are in flight, the oldest is finished
/// before one more is issued, and <see cref="Finish"/> issues the last, partly filled buckets and finishes the rest
/// after backward. Finishing a bucket divides its sum by the data-axis size and adds each parameter's part to its
/// <c>grad</c>. Every element is summed and divided as by a collective of its own, so on the in-process backend the
/// gradients equal the per-parameter ones bit for bit (NCCL may pick another summation order for a larger message);
/// ranks close buckets at the same points because backward produces the same gradients in the same order on every
/// rank of the data axis.
/// </summary>
internal sealed class DataGradientBuckets
{
    /// <summary>Buckets issued and not yet finished, at most (two: one being reduced while the next fills, as FSDP2
    /// and Megatron keep them).</summary>
    public const int MaxInFlight = 2;

    private readonly Open _shards = new(), _replicas = new();
    private readonly Queue<Issued> _inFlight = new();
    private readonly HashSet<string> _averaged = new();
    private Counts _counts = Counts.None;

    // A gradient in a bucket: its parameter, the gradient's shape as bucketed (FSDP: the sharded dimension moved
    // first), and for FSDP every data rank's rows of it and the dimension that was moved.
    private sealed record Entry(Tensor Parameter, long[] Shape, long[]? Counts, int Dim);

    private sealed class Open
    {
        public readonly List<Entry> Entries = new();
        public readonly List<Tensor> Grads = new();
        public long Bytes;
    }

    private sealed record Issued(ICommWork Work, Tensor Flat, Entry[] Entries, int GroupRank, int GroupSize);

    /// <summary>What this rank issued since the previous <see cref="TakeCounts"/>.</summary>
    /// <param name="ReduceScatters">FSDP reduce-scatters.</param>
    /// <param name="ReduceScatterBytes">Bytes of full gradient they reduced.</param>
    /// <param name="AllReduces">All-reduces of data-replicated weights' gradients.</param>
    /// <param name="AllReduceBytes">Bytes of gradient they reduced.</param>
    /// <param name="Averaged">Keys of the parameters whose gradients those all-reduces averaged.</param>
    public sealed record Counts(int ReduceScatters, long ReduceScatterBytes, int AllReduces, long AllReduceBytes, IReadOnlySet<string> Averaged)
    {
        public static readonly Counts None = new(0, 0, 0, 0, new HashSet<string>());
    }

    /// <summary>Bucket size; 0 reduces each gradient on its own (still issued in backward and not waited for there).</summary>
    public long BucketBytes { get; set; } = ShardedVisionTransformer.DefaultBucketBytes;

    /// <summary>Adds a data-sharded parameter's full gradient (<paramref name="rows"/>: sharded dimension
    /// <paramref name="dim"/> moved first, owned by the buckets from now on; <paramref name="counts"/>: every data rank's
    /// rows) to the open reduce-scatter bucket.</summary>
    public void AddShard(ICommunicator comm, Tensor parameter, Tensor rows, long[] counts, int dim) =>
        Add(comm, _shards, scatter: true, new Entry(parameter, rows.shape, counts, dim), rows);

    /// <summary>Adds a data-replicated parameter's gradient (owned by the buckets from now on) to the open all-reduce
    /// bucket; <paramref name="key"/> names the parameter for <see cref="Counts.Averaged"/>.</summary>
    public void AddReplica(ICommunicator comm, string key, Tensor parameter, Tensor grad)
    {
        _averaged.Add(key);
        Add(comm, _replicas, scatter: false, new Entry(parameter, grad.shape, null, 0), grad);
    }

    private void Add(ICommunicator comm, Open bucket, bool scatter, Entry entry, Tensor grad)
    {
        try
        {
            if (bucket.Grads.Count > 0 && bucket.Grads[0].dtype != grad.dtype) Issue(comm, bucket, scatter);
        }
        catch
        {
            grad.Dispose();
            throw;
        }
        bucket.Entries.Add(entry);
        bucket.Grads.Add(grad);
        bucket.Bytes += grad.numel() * grad.element_size();
        if (bucket.Bytes >= BucketBytes) Issue(comm, bucket, scatter);
    }

    // Flattens the open bucket into one buffer (FSDP: rank-major, rank 0's rows of every gradient first, so that each
    // rank's part is contiguous), finishes the oldest bucket if as many as allowed are in flight, and issues the
    // collective.
    private void Issue(ICommunicator comm, Open bucket, bool scatter)
    {
        if (bucket.Entries.Count == 0) return;
        var entries = bucket.Entries.ToArray();
        var grads = bucket.Grads.ToArray();
        bucket.Entries.Clear();
        bucket.Grads.Clear();
        bucket.Bytes = 0;
        Tensor flat;
        long[]? flatCounts = null;
        try
        {
            using var scope = torch.NewDisposeScope();
            using var noGrad = torch.no_grad();
            if (scatter)
            {
                int k = comm.Size;
                var pieces = new List<Tensor>();
                flatCounts = new long[k];
                for (int r = 0; r < k; r++)
                {
                    for (int i = 0; i < entries.Length; i++)
                    {
                        var counts = entries[i].Counts!;
                        long start = counts.Take(r).Sum(), rowElements = grads[i].numel() / grads[i].shape[0];
                        pieces.Add(grads[i].narrow(0, start, counts[r]).reshape(-1));
                        flatCounts[r] += counts[r] * rowElements;
                    }
                }
                flat = torch.cat(pieces.ToArray());
            }
            else flat = grads.Length == 1 ? grads[0].reshape(-1) : torch.cat(grads.Select(g => g.reshape(-1)).ToArray());
            flat = flat.DetachFromDisposeScope();
        }
        finally
        {
            foreach (var g in grads) g.Dispose();
        }
        ICommWork work;
        try
        {
            while (_inFlight.Count >= MaxInFlight) Complete(_inFlight.Dequeue());
            work = scatter ? comm.ReduceScatterAsync(flat, flatCounts!) : comm.AllReduceAsync(flat);
        }
        catch
        {
            flat.Dispose();
            throw;
        }
        long bytes = flat.numel() * flat.element_size();
        _counts = scatter
            ? _counts with { ReduceScatters = _counts.ReduceScatters + 1, ReduceScatterBytes = _counts.ReduceScatterBytes + bytes }
            : _counts with { AllReduces = _counts.AllReduces + 1, AllReduceBytes = _counts.AllReduceBytes + bytes };
        _inFlight.Enqueue(new Issued(work, flat, entries, comm.Rank, comm.Size));
    }

    // Waits for a bucket's collective (on NCCL: the current stream waits, not the host), averages, and adds each
    // parameter's part to its gradient.
    private static void Complete(Issued item)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var result = item.Work.WaitThenRelease(item.Flat);
        result.DivideInPlace(item.GroupSize);
        long offset = 0;
        foreach (var e in item.Entries)
        {
            Tensor part;
            if (e.Counts is null)
            {
                long n = e.Shape.Aggregate(1L, (a, b) => a * b);
                part = result.narrow(0, offset, n).view(e.Shape);
                offset += n;
            }
            else
            {
                var shape = e.Shape.ToArray();
                shape[0] = e.Counts[item.GroupRank];
                long n = shape.Aggregate(1L, (a, b) => a * b);
                part = result.narrow(0, offset, n).view(shape);
                offset += n;
                if (e.Dim != 0) part = part.transpose(0, e.Dim);
            }
            AddToGradient(e.Parameter, part);
        }
    }

    /// <summary>After backward: issues the open buckets (FSDP's first, on every rank alike) and finishes every bucket in
    /// flight, in issue order. On a failure the remaining buckets are dropped (<see cref="Discard"/>) and it throws.</summary>
    public void Finish(ICommunicator comm)
    {
        try
        {
            Issue(comm, _shards, scatter: true);
            Issue(comm, _replicas, scatter: false);
            while (_inFlight.Count > 0) Complete(_inFlight.Dequeue());
        }
        finally
        {
            Discard();
        }
    }

    /// <summary>Drops the open buckets without reducing them and waits for the buckets in flight without using their
    /// results (after a failed backward; never throws).</summary>
    public void Discard()
    {
        foreach (var bucket in new[] { _shards, _replicas })
        {
            foreach (var g in bucket.Grads) g.Dispose();
            bucket.Entries.Clear();
            bucket.Grads.Clear();
            bucket.Bytes = 0;
        }
        while (_inFlight.Count > 0)
        {
            var item = _inFlight.Dequeue();
            item.Work.Dispose();
            item.Flat.Dispose();
        }
    }

    /// <summary>The collectives issued, the bytes they reduced and the parameters averaged since the previous call.</summary>
    public Counts TakeCounts()
    {
        var counts = _counts with { Averaged = new HashSet<string>(_averaged) };
        _counts = Counts.None;
        _averaged.Clear();
        return counts;
    }

    /// <summary>Autograd's share of a gradient handed to the buckets: zeros of the parameter's shape, as one element
    /// expanded, so that no weight-sized tensor is allocated for them (AccumulateGrad adds them to an existing gradient,
    /// or copies them into a new one of the parameter's layout, which the bucket then adds to).</summary>
    public static Tensor ZeroGradient(long[] shape, ScalarType dtype, Device device) =>
        torch.zeros(1, dtype: dtype, device: device).expand(shape);

    // Autograd gave the parameter zeros for this backward (already accumulated into grad, unless a recomputed block's
    // gradients are still on their way: then grad is set here and the zeros are added to it later).
    private static void AddToGradient(Tensor parameter, Tensor part)
    {
        using var grad = parameter.grad;
        if (grad is not null) grad.PlusInPlace(part);
        else parameter.grad = part.is_contiguous() ? part.clone() : part.contiguous();
    }
}
