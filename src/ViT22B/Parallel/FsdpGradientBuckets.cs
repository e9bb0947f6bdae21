using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// One rank's FSDP gradient reduce-scatters, bucketed. In backward, each data-sharded parameter's full (model-axis)
/// gradient joins the open bucket instead of being reduce-scattered on its own, and the parameter receives zeros from
/// autograd; once the bucket holds <see cref="BucketBytes"/> or more (or a gradient of another dtype arrives), one
/// reduce-scatter over the data axis sums it, and each parameter's averaged shard is added to its <c>grad</c>. The
/// last, partly filled bucket is reduced by <see cref="Flush"/> after backward. Every element is summed and divided
/// as by a reduce-scatter of its own, so on the in-process backend the gradients equal the per-parameter ones bit for
/// bit (NCCL may pick another summation order for a larger message); ranks close buckets at the same points because
/// backward produces the same gradients in the same order on every rank.
/// </summary>
internal sealed class FsdpGradientBuckets
{
    private readonly List<Entry> _open = new();
    private long _openBytes;
    private int _collectives;                  // reduce-scatters since the last TakeCounts, and the bytes they reduced
    private long _bytes;

    private sealed record Entry(Tensor Parameter, Tensor Rows, long[] Counts, int Dim);

    /// <summary>Bucket size; 0 reduce-scatters each gradient on its own, in backward (no bucketing).</summary>
    public long BucketBytes { get; set; } = ShardedVisionTransformer.DefaultBucketBytes;

    /// <summary>This rank's part of <paramref name="rows"/> (a gradient with the sharded dimension moved first,
    /// contiguous, or a bucket's flat rank-major copy) summed over the group and averaged: one reduce-scatter.</summary>
    public Tensor ReduceOne(ICommunicator comm, Tensor rows, long[] counts)
    {
        var mine = comm.ReduceScatter(rows, counts).div_(comm.Size);
        Interlocked.Increment(ref _collectives);
        Interlocked.Add(ref _bytes, rows.numel() * rows.element_size());
        return mine;
    }

    /// <summary>Adds <paramref name="parameter"/>'s gradient (<paramref name="rows"/>: sharded dimension
    /// <paramref name="dim"/> moved first, contiguous, owned by the bucket from now on) to the open bucket, and
    /// reduce-scatters the bucket once it is full.</summary>
    public void Add(ICommunicator comm, Tensor parameter, Tensor rows, long[] counts, int dim)
    {
        try
        {
            if (_open.Count > 0 && _open[0].Rows.dtype != rows.dtype) Flush(comm);
        }
        catch
        {
            rows.Dispose();
            throw;
        }
        _open.Add(new Entry(parameter, rows, counts, dim));
        _openBytes += rows.numel() * rows.element_size();
        if (_openBytes >= BucketBytes) Flush(comm);
    }

    /// <summary>Reduce-scatters the open bucket, if any, and adds each parameter's shard to its gradient.</summary>
    public void Flush(ICommunicator comm)
    {
        if (_open.Count == 0) return;
        var entries = _open.ToArray();
        _open.Clear();
        _openBytes = 0;
        try
        {
            using var scope = torch.NewDisposeScope();
            using var noGrad = torch.no_grad();
            int k = comm.Size;
            // Rank-major: rank 0's rows of every gradient, then rank 1's, … so that each rank's part is contiguous.
            var pieces = new List<Tensor>();
            var flatCounts = new long[k];
            for (int r = 0; r < k; r++)
            {
                foreach (var e in entries)
                {
                    long start = e.Counts.Take(r).Sum(), rowElements = e.Rows.numel() / e.Rows.shape[0];
                    pieces.Add(e.Rows.narrow(0, start, e.Counts[r]).reshape(-1));
                    flatCounts[r] += e.Counts[r] * rowElements;
                }
            }
            var mine = ReduceOne(comm, torch.cat(pieces.ToArray()), flatCounts);
            long offset = 0;
            foreach (var e in entries)
            {
                var rowShape = e.Rows.shape.Skip(1).ToArray();
                long count = e.Counts[comm.Rank], n = count * rowShape.Aggregate(1L, (a, b) => a * b);
                var shard = mine.narrow(0, offset, n).view(new[] { count }.Concat(rowShape).ToArray());
                offset += n;
                if (e.Dim != 0) shard = shard.transpose(0, e.Dim);
                AddToGradient(e.Parameter, shard);
            }
        }
        finally
        {
            foreach (var e in entries) e.Rows.Dispose();
        }
    }

    /// <summary>Drops the open bucket without reducing it (after a failed backward).</summary>
    public void Discard()
    {
        foreach (var e in _open) e.Rows.Dispose();
        _open.Clear();
        _openBytes = 0;
    }

    /// <summary>The reduce-scatters issued and bytes reduced since the previous call.</summary>
    public (int Collectives, long Bytes) TakeCounts() => (Interlocked.Exchange(ref _collectives, 0), Interlocked.Exchange(ref _bytes, 0));

    // Autograd gave the parameter zeros for this backward (already accumulated into grad, unless a recomputed block's
    // gradients are still on their way: then grad is set here and the zeros are added to it later).
    private static void AddToGradient(Tensor parameter, Tensor shard)
    {
        using var grad = parameter.grad;
        if (grad is not null) grad.add_(shard);
        else parameter.grad = shard.is_contiguous() ? shard.clone() : shard.contiguous();
    }
}
