using TorchSharp;
using ViT22B.Data;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Data;

public sealed class DataLoaderTests
{
    // Example i is an image filled with i + (a draw of its generator), so order and augmentation are both visible.
    internal sealed class Probe : IDataset
    {
        private readonly HashSet<int> _bad;
        public Probe(int count, params int[] bad) => (Count, _bad) = (count, bad.ToHashSet());
        public int Count { get; }
        public IReadOnlyList<string> Classes { get; } = new[] { "even", "odd" };
        public long[] Shape { get; init; } = { 1, 2, 2 };
        public Example Get(int index, Random rng)
        {
            if (_bad.Contains(index)) throw new InvalidDataException($"probe[{index}] is unreadable");
            return new Example(ScalarMath.Full(Shape, index + rng.NextDouble(), ScalarType.Float32, torch.CPU), index % 2);
        }
        public string Describe(int index) => $"probe[{index}]";
    }

    internal static List<(int[] Indices, float[] Values, long[] Labels)> Collect(DataLoader loader, int epoch, int first = 0)
    {
        var result = new List<(int[], float[], long[])>();
        foreach (var b in loader.Epoch(epoch, first))
            using (b)
            using (torch.NewDisposeScope())   // the select temporaries stay reachable through each native call
                result.Add((b.Indices.ToArray(), b.Images.select(1, 0).select(1, 0).select(1, 0).data<float>().ToArray(), b.Labels.data<long>().ToArray()));
        return result;
    }

    [Theory]
    [InlineData(0)]
    [InlineData(3)]
    public void Batches_cover_a_seeded_permutation_each_epoch(int workers)
    {
        var loader = new DataLoader(new Probe(10), new DataLoaderOptions { BatchSize = 4, Seed = 7, Workers = workers });
        Assert.Equal(3, loader.BatchesPerEpoch);
        var e0 = Collect(loader, 0);
        Assert.Equal(new[] { 4, 4, 2 }, e0.Select(b => b.Indices.Length));
        var order0 = e0.SelectMany(b => b.Indices).ToArray();
        Assert.Equal(Enumerable.Range(0, 10), order0.OrderBy(i => i));
        Assert.Equal(loader.Order(0), order0);
        Assert.NotEqual(order0, loader.Order(1));
        foreach (var (indices, values, labels) in e0)
            for (int r = 0; r < indices.Length; r++)
            {
                Assert.Equal(indices[r] % 2, labels[r]);
                Assert.InRange(values[r], indices[r], indices[r] + 1);
            }
    }

    [Fact]
    public void Same_seed_gives_the_same_batches_whatever_the_workers_and_a_resumed_epoch_its_tail()
    {
        var opts = new DataLoaderOptions { BatchSize = 3, Seed = 11 };
        var a = Collect(new DataLoader(new Probe(11), opts with { Workers = 0 }), 2);
        var b = Collect(new DataLoader(new Probe(11), opts with { Workers = 4 }), 2);
        Assert.Equal(a.Select(x => x.Values), b.Select(x => x.Values));
        var tail = Collect(new DataLoader(new Probe(11), opts with { Workers = 2 }), 2, first: 2);
        Assert.Equal(a.Skip(2).Select(x => x.Values), tail.Select(x => x.Values));
        var other = Collect(new DataLoader(new Probe(11), opts with { Seed = 12 }), 2);
        Assert.NotEqual(a.Select(x => x.Values).SelectMany(v => v), other.Select(x => x.Values).SelectMany(v => v));
    }

    [Fact]
    public void Drop_last_and_no_shuffle()
    {
        var loader = new DataLoader(new Probe(10), new DataLoaderOptions { BatchSize = 4, Shuffle = false, DropLast = true });
        var batches = Collect(loader, 5);
        Assert.Equal(2, batches.Count);
        Assert.Equal(Enumerable.Range(0, 8), batches.SelectMany(b => b.Indices));
    }

    [Fact]
    public void Bad_example_fails_by_default_and_is_skipped_on_request()
    {
        var strict = new DataLoader(new Probe(6, 4), new DataLoaderOptions { BatchSize = 3, Shuffle = false });
        var e = Assert.Throws<InvalidDataException>(() => Collect(strict, 0));
        Assert.Contains("probe[4]", e.Message);

        var lenient = new DataLoader(new Probe(6, 4), new DataLoaderOptions { BatchSize = 3, Shuffle = false, SkipBadExamples = true });
        var batches = lenient.Epoch(0).ToList();
        try
        {
            Assert.Equal(new[] { 3, 2 }, batches.Select(b => b.Count));
            Assert.Equal(new[] { 3, 5 }, batches[1].Indices);
            var skipped = Assert.Single(batches[1].Skipped);
            Assert.Equal(4, skipped.Index);
            Assert.Equal("probe[4]", skipped.Source);
        }
        finally
        {
            foreach (var b in batches) b.Dispose();
        }
    }

    [Fact]
    public void Unequal_shapes_name_both_examples()
    {
        var ds = new ShapeMix();
        var e = Assert.Throws<InvalidDataException>(() => Collect(new DataLoader(ds, new DataLoaderOptions { BatchSize = 2, Shuffle = false, Workers = 0 }), 0));
        Assert.Contains("mix[1]", e.Message);
        Assert.Contains("mix[0]", e.Message);
    }

    private sealed class ShapeMix : IDataset
    {
        public int Count => 2;
        public IReadOnlyList<string> Classes { get; } = new[] { "x" };
        public Example Get(int index, Random rng) => new(torch.zeros(1, 2 + index, 2), 0);
        public string Describe(int index) => $"mix[{index}]";
    }

    [Fact]
    public void Bad_options_are_refused()
    {
        var loader = new DataLoader(new Probe(40), new DataLoaderOptions { BatchSize = 2 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new DataLoader(new Probe(4), new DataLoaderOptions { BatchSize = 0 }));
        Assert.Throws<ArgumentException>(() => new DataLoader(new Probe(0)));
        Assert.Throws<ArgumentException>(() => new DataLoader(new Probe(3), new DataLoaderOptions { BatchSize = 4, DropLast = true }));
        Assert.Throws<ArgumentOutOfRangeException>(() => loader.Epoch(0, firstBatch: 21));
    }

    [Fact]
    public void Tensor_dataset_scales_bytes_and_checks_labels()
    {
        using var images = torch.tensor(new byte[] { 0, 255, 51, 102 }, new long[] { 1, 2, 2 }, ScalarType.Byte);
        using var labels = torch.tensor(new long[] { 1 });
        using var ds = new TensorDataset(images, labels, new[] { "a", "b" });
        var ex = ds.Get(0, new Random(0));
        using (ex.Image) Assert.Equal(new[] { 0f, 1f, 0.2f, 0.4f }, ex.Image.data<float>().ToArray());
        using var scope = torch.NewDisposeScope();
        Assert.Contains("label 5", Assert.Throws<ArgumentException>(() => new TensorDataset(images, torch.tensor(new long[] { 5 }), new[] { "a" })).Message);
        Assert.Throws<ArgumentException>(() => new TensorDataset(images, torch.tensor(new long[] { 0, 1 }), new[] { "a", "b" }));
    }
}

[Collection("process-wide counters")]
public sealed class DataLoaderPrefetchTests
{
    [Fact]
    public void Leaving_early_disposes_the_prefetched_batches()
    {
        var loader = new DataLoader(new DataLoaderTests.Probe(40), new DataLoaderOptions { BatchSize = 2, Workers = 4 });
        foreach (var b in loader.Epoch(0)) { b.Dispose(); break; }   // warm-up: libtorch's own one-time tensors
        long before = Tensor.TotalCount;
        foreach (var b in loader.Epoch(0)) { b.Dispose(); break; }
        Assert.Equal(before, Tensor.TotalCount);                       // the 4 batches built ahead were disposed
    }
}
