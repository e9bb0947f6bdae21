using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Data;

/// <summary>An example the loader left out because its source was unreadable
/// (<see cref="DataLoaderOptions.SkipBadExamples"/>).</summary>
/// <param name="Index">Dataset index.</param>
/// <param name="Source">Where it comes from (<see cref="IDataset.Describe"/>).</param>
/// <param name="Reason">The error message.</param>
public sealed record SkippedExample(int Index, string Source, string Reason);

/// <summary>A collated batch: images [B, C, H, W] float32 and labels [B] int64 on the CPU; the receiver disposes it.</summary>
public sealed class Batch : IDisposable
{
    internal Batch(Tensor images, Tensor labels, int[] indices, IReadOnlyList<SkippedExample> skipped, int number)
    {
        Images = images;
        Labels = labels;
        Indices = indices;
        Skipped = skipped;
        Number = number;
    }

    /// <summary>Images [B, C, H, W].</summary>
    public Tensor Images { get; }
    /// <summary>Labels [B] (int64).</summary>
    public Tensor Labels { get; }
    /// <summary>Dataset indices of the rows, in order.</summary>
    public IReadOnlyList<int> Indices { get; }
    /// <summary>Examples of this batch left out because they were unreadable.</summary>
    public IReadOnlyList<SkippedExample> Skipped { get; }
    /// <summary>Position of the batch in its epoch (0-based).</summary>
    public int Number { get; }
    /// <summary>Rows in the batch.</summary>
    public int Count => Indices.Count;

    /// <summary>Disposes both tensors.</summary>
    public void Dispose()
    {
        Images.Dispose();
        Labels.Dispose();
    }
}

/// <summary>Options of a <see cref="DataLoader"/>.</summary>
public sealed record DataLoaderOptions
{
    /// <summary>Examples per batch.</summary>
    public int BatchSize { get; init; } = 32;
    /// <summary>Visit the examples in a new seeded random order each epoch.</summary>
    public bool Shuffle { get; init; } = true;
    /// <summary>Seed of the order and of the per-example augmentation generators.</summary>
    public int Seed { get; init; }
    /// <summary>Leave out the last batch when it is smaller than <see cref="BatchSize"/>.</summary>
    public bool DropLast { get; init; }
    /// <summary>Batches built ahead on background threads (0 = build each batch on the consumer's thread when it is
    /// asked for). At most this many batches exist besides the one being consumed, so memory stays bounded.</summary>
    public int Workers { get; init; } = 2;
    /// <summary>Leave out examples whose source is unreadable (<see cref="InvalidDataException"/>) and report them in
    /// <see cref="Batch.Skipped"/>, instead of failing (default: fail).</summary>
    public bool SkipBadExamples { get; init; }
}

/// <summary>
/// Batches a <see cref="IDataset"/>: seeded shuffling, collation and background prefetch (PyTorch's
/// <c>DataLoader</c>). Deterministic: the order of an epoch depends only on the seed and the epoch number, and each
/// example's augmentation generator only on the seed, epoch and index, never on thread timing, so a resumed run sees
/// the same batches as an uninterrupted one.
/// </summary>
public sealed class DataLoader
{
    private readonly IDataset _dataset;

    /// <summary>Creates a loader; validates the options.</summary>
    public DataLoader(IDataset dataset, DataLoaderOptions? options = null)
    {
        _dataset = dataset ?? throw new ArgumentNullException(nameof(dataset));
        Options = options ?? new DataLoaderOptions();
        if (Options.BatchSize <= 0) throw new ArgumentOutOfRangeException(nameof(options), $"BatchSize must be positive, found {Options.BatchSize}.");
        if (Options.Workers < 0) throw new ArgumentOutOfRangeException(nameof(options), $"Workers must be ≥ 0, found {Options.Workers}.");
        if (dataset.Count == 0) throw new ArgumentException("The dataset is empty.", nameof(dataset));
        if (Options.DropLast && dataset.Count < Options.BatchSize)
            throw new ArgumentException($"DropLast with BatchSize {Options.BatchSize} leaves no batch of a dataset of {dataset.Count} examples.", nameof(options));
    }

    /// <summary>The options.</summary>
    public DataLoaderOptions Options { get; }

    /// <summary>The dataset.</summary>
    public IDataset Dataset => _dataset;

    /// <summary>Batches per epoch.</summary>
    public int BatchesPerEpoch => Options.DropLast ? _dataset.Count / Options.BatchSize : (_dataset.Count + Options.BatchSize - 1) / Options.BatchSize;

    /// <summary>The order in which epoch <paramref name="epoch"/> visits the dataset.</summary>
    public int[] Order(int epoch)
    {
        var order = Enumerable.Range(0, _dataset.Count).ToArray();
        if (Options.Shuffle) new Random(Mix(Options.Seed, epoch, -1)).Shuffle(order);
        return order;
    }

    /// <summary>
    /// The batches of epoch <paramref name="epoch"/>, starting at batch <paramref name="firstBatch"/> (to resume
    /// mid-epoch). Each batch belongs to the caller, who disposes it; leaving the loop early cancels the prefetch
    /// and disposes batches built ahead.
    /// </summary>
    public IEnumerable<Batch> Epoch(int epoch, int firstBatch = 0)
    {
        if (firstBatch < 0 || firstBatch > BatchesPerEpoch)
            throw new ArgumentOutOfRangeException(nameof(firstBatch), $"firstBatch must be in [0, {BatchesPerEpoch}], found {firstBatch}.");
        return Iterate(epoch, firstBatch);
    }

    private IEnumerable<Batch> Iterate(int epoch, int firstBatch)
    {
        var order = Order(epoch);
        int n = BatchesPerEpoch, bs = Options.BatchSize;
        int[] Indices(int b) => order.AsSpan(b * bs, Math.Min(bs, order.Length - b * bs)).ToArray();
        if (Options.Workers == 0)
        {
            for (int b = firstBatch; b < n; b++) yield return Build(epoch, b, Indices(b));
            yield break;
        }
        var pending = new Queue<Task<Batch>>();
        int next = firstBatch;
        void Fill()
        {
            while (pending.Count < Options.Workers && next < n)
            {
                int b = next++;
                var idx = Indices(b);
                pending.Enqueue(Task.Run(() => Build(epoch, b, idx)));
            }
        }
        try
        {
            Fill();
            while (pending.Count > 0)
            {
                var task = pending.Dequeue();
                Batch batch;
                try { batch = task.GetAwaiter().GetResult(); }
                finally { Fill(); }
                yield return batch;
            }
        }
        finally
        {
            foreach (var t in pending)
            {
                try { t.GetAwaiter().GetResult().Dispose(); }
                catch (Exception) { /* the consumer stopped; errors of batches it will never see are dropped */ }
            }
        }
    }

    private Batch Build(int epoch, int number, int[] indices)
    {
        using var scope = NewDisposeScope();
        var images = new List<Tensor>(indices.Length);
        var labels = new List<long>(indices.Length);
        var kept = new List<int>(indices.Length);
        var skipped = new List<SkippedExample>();
        foreach (int i in indices)
        {
            Example ex;
            try
            {
                ex = _dataset.Get(i, new Random(Mix(Options.Seed, epoch, i)));
            }
            catch (InvalidDataException e) when (Options.SkipBadExamples)
            {
                skipped.Add(new SkippedExample(i, _dataset.Describe(i), e.Message));
                continue;
            }
            if (images.Count > 0 && !ex.Image.shape.SequenceEqual(images[0].shape))
                throw new InvalidDataException($"Cannot batch {_dataset.Describe(i)} of shape [{string.Join(", ", ex.Image.shape)}] with {_dataset.Describe(kept[0])} of shape [{string.Join(", ", images[0].shape)}]; add a resize/crop transform.");
            images.Add(ex.Image);
            labels.Add(ex.Label);
            kept.Add(i);
        }
        if (images.Count == 0)
            throw new InvalidDataException($"Batch {number} of epoch {epoch}: all {indices.Length} examples were unreadable (first: {skipped[0].Source}: {skipped[0].Reason}).");
        var x = torch.stack(images).to(ScalarType.Float32);
        var y = torch.tensor(labels.ToArray(), ScalarType.Int64);
        return new Batch(x.DetachFromDisposeScope(), y.DetachFromDisposeScope(), kept.ToArray(), skipped, number);
    }

    // splitmix64 of (seed, epoch, index): independent, reproducible streams per example.
    internal static int Mix(int seed, int epoch, int index)
    {
        ulong z = ((ulong)(uint)seed << 32 | (uint)epoch) ^ ((ulong)(uint)index * 0x9E3779B97F4A7C15UL);
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return (int)(z & 0x7FFFFFFF);
    }
}
