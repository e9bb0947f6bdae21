using TorchSharp;
using ViT22B.Interop;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// A sharded checkpoint folder read as one checkpoint of full tensors (<see cref="ShardedCheckpoint.Open"/>): the
/// full model's keys and shapes; <see cref="ReadSlice"/> copies out of the memory-mapped rank files only the parts of
/// the source shards that the requested slice covers, so a rank of another mesh reads its shard and never a whole
/// parameter it does not hold; <see cref="Read"/> reassembles a full tensor.
/// </summary>
internal sealed class ShardedCheckpointSource : ITensorSource
{
    private readonly SafetensorsReader[] _readers;
    private readonly IReadOnlyDictionary<string, long[]> _shapes;
    // Per key, each distinct part of the tensor once: replicas (the same spec on several ranks) come from the first.
    private readonly Dictionary<string, List<(int Rank, ShardSpec Spec)>> _parts = new();
    private long _bytesRead;

    public ShardedCheckpointSource(string folder)
    {
        var (plan, files) = ShardedCheckpoint.ReadIndex(folder);
        Plan = plan;
        _shapes = plan.FullShapes();
        Path = folder;
        Names = _shapes.Keys.ToList();
        Metadata = new Dictionary<string, string> { ["config"] = Models.ViTConfigJson.ToJson(plan.Config) };
        _readers = new SafetensorsReader[files.Count];
        try
        {
            for (int r = 0; r < files.Count; r++) _readers[r] = SafetensorsReader.Open(files[r]);
            CheckFilesAndFindParts();
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    // Every rank file holds every key, with the shard shape the index's plan gives that rank and one dtype per key,
    // checked from the headers before anything is read; and which ranks' parts make up each tensor.
    private void CheckFilesAndFindParts()
    {
        var mesh = new DeviceMesh(Plan.DataSize, Plan.ModelSize);
        foreach (var (name, shape) in _shapes)
        {
            ScalarType? dtype = null;
            var parts = _parts[name] = new List<(int Rank, ShardSpec Spec)>();
            var seen = new HashSet<string>();
            for (int r = 0; r < _readers.Length; r++)
            {
                var (data, model) = mesh.Coordinates(r);
                var spec = Plan.Spec(name, shape, model, data);
                if (seen.Add($"{spec.Dim}:{string.Join(",", spec.Segments)}")) parts.Add((r, spec));
                var expected = spec.LocalShape;
                var entry = _readers[r][name];                  // names the file and the key when it is missing
                if (!entry.Shape.SequenceEqual(expected))
                    throw new ArgumentException($"{_readers[r].Path}: '{name}' is [{string.Join(", ", entry.Shape)}], but the checkpoint's index gives rank {r} a shard of [{string.Join(", ", expected)}].");
                if (dtype is not null && entry.ScalarType != dtype)
                    throw new ArgumentException($"{_readers[r].Path}: '{name}' is stored as {entry.ScalarType}, but rank 0 stores it as {dtype}.");
                dtype = entry.ScalarType;
            }
        }
    }

    /// <summary>Bytes copied out of the rank files so far (tests check that a rank reads only what it holds).</summary>
    internal long BytesRead => Interlocked.Read(ref _bytesRead);

    /// <summary>The plan the checkpoint was written with.</summary>
    public ShardingPlan Plan { get; }

    public string Path { get; }

    public IReadOnlyList<string> Names { get; }

    public IReadOnlyDictionary<string, string> Metadata { get; }

    public bool Contains(string name) => _shapes.ContainsKey(name);

    public long[] ShapeOf(string name) =>
        _shapes.TryGetValue(name, out var shape) ? shape.ToArray()
            : throw new KeyNotFoundException($"Sharded checkpoint '{Path}' has no tensor '{name}'.");

    public Tensor Read(string name)
    {
        var shape = ShapeOf(name);
        if (shape.Length > 0) return ReadSlice(name, 0, new[] { (0L, shape[0]) });
        var scalar = _readers[0].Read(name);
        Interlocked.Add(ref _bytesRead, scalar.element_size());
        return scalar;
    }

    public Tensor ReadSlice(string name, int dim, IReadOnlyList<(long Start, long Length)> segments)
    {
        var shape = ShapeOf(name);
        TensorSlices.Check(Path, name, shape, dim, segments);
        var outShape = shape.ToArray();
        outShape[dim] = segments.Sum(g => g.Length);
        Tensor? result = null;
        try
        {
            using var noGrad = torch.no_grad();
            foreach (var (rank, spec) in _parts[name])
            {
                var reader = _readers[rank];
                if (spec.Dim == dim)
                {
                    // The shard is split along the requested dimension: copy the overlap of each requested range with
                    // each stored segment, reading only that overlap.
                    long local = 0;                                    // where each stored segment starts in the shard
                    foreach (var (s, m) in spec.Segments)
                    {
                        long q = 0;                                    // where each requested range starts in the result
                        foreach (var (a, l) in segments)
                        {
                            long from = Math.Max(a, s), to = Math.Min(a + l, s + m);
                            if (from < to)
                            {
                                using var piece = reader.ReadSlice(name, dim, new[] { (local + from - s, to - from) });
                                Interlocked.Add(ref _bytesRead, piece.numel() * piece.element_size());
                                result ??= torch.empty(outShape, dtype: piece.dtype);
                                using var target = result.narrow(dim, q + from - a, to - from);
                                target.copy_(piece);
                            }
                            q += l;
                        }
                        local += m;
                    }
                }
                else
                {
                    // Split along another dimension: the shard holds all of the requested ranges for its own ranges of
                    // that dimension; read the requested ranges of the shard once and place its segments.
                    using var piece = reader.ReadSlice(name, dim, segments);
                    Interlocked.Add(ref _bytesRead, piece.numel() * piece.element_size());
                    result ??= torch.empty(outShape, dtype: piece.dtype);
                    long local = 0;
                    foreach (var (s, m) in spec.Segments)
                    {
                        using var source = piece.narrow(spec.Dim, local, m);
                        using var target = result.narrow(spec.Dim, s, m);
                        target.copy_(source);
                        local += m;
                    }
                }
            }
            return result ?? throw new InvalidOperationException($"Sharded checkpoint '{Path}': no shard holds '{name}'.");
        }
        catch
        {
            result?.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        foreach (var r in _readers) r?.Dispose();
    }
}
