using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// <see cref="ICommunicator"/> for ranks that are threads of one process (CPU tensors, or CUDA tensors of any
/// devices). Each call takes the rank's next sequence number; the rendezvous is keyed by it, so calls cannot be
/// mixed up, and a rank that issues a different operation fails every rank at once. Data moves when the waiting
/// rank calls <see cref="ICommWork.Wait"/>: it reads its peers' copies (made at call time, detached from their
/// dispose scopes) and builds its own result on its own device. GPU tensors move on a communication stream of the
/// receiver's device, ordered by events against the ranks' current streams, so the copies overlap compute and the
/// host does not wait for them (<see cref="IGpuTransport"/>, implemented in <c>ViT22B.Cuda</c>; give each rank its own compute stream with
/// <see cref="RankContext.UseDevice"/>). Use each instance from its rank's thread only.
/// </summary>
public sealed class ThreadedCommunicator : ICommunicator, IDisposable
{
    private readonly ThreadedGroup _group;
    private long _seq;
    private volatile bool _disposed;
    private readonly Dictionary<int, nint> _commStreams = new();   // per CUDA device, from libtorch's pool on first use

    internal ThreadedCommunicator(ThreadedGroup group, int rank) => (_group, Rank) = (group, rank);

    /// <inheritdoc />
    public int Rank { get; }

    /// <inheritdoc />
    public int Size => _group.Size;

    /// <inheritdoc />
    public string Name => _group.Name;

    /// <summary>The world rank of this member.</summary>
    public int WorldRank => _group.WorldRanks[Rank];

    /// <summary>Bytes this rank has sent so far, counted as a ring implementation sends them (all-gather: (k−1)·local;
    /// reduce-scatter: (k−1)/k·input; all-reduce: 2·(k−1)/k·input; permute: the tensor; broadcast: the root's
    /// tensor). Used to report communication volume.</summary>
    public long BytesSent { get; private set; }

    /// <summary>Collectives issued so far.</summary>
    public long Operations => _seq;

    private void Count(string op, Tensor? input, int root = -1)
    {
        if (input is null || Size == 1) return;
        long bytes = input.numel() * input.element_size();
        int k = Size;
        BytesSent += op switch
        {
            "AllGather" => (k - 1) * bytes,
            "ReduceScatter" => (k - 1) * bytes / k,
            "AllReduce" => 2 * (k - 1) * bytes / k,
            "Permute" => bytes,
            "Broadcast" => Rank == root ? bytes : 0,
            _ => 0,
        };
    }

    private sealed class Work(Func<Tensor> wait, Action abandon) : ICommWork
    {
        private bool _done;

        public Tensor Wait()
        {
            if (_done) throw new InvalidOperationException("Wait() was already called on this operation, or it was disposed.");
            _done = true;
            return wait();
        }

        public void Dispose()
        {
            if (_done) return;
            _done = true;
            abandon();
        }
    }

    // Copies the input now (the caller may reuse it) and delivers it, after the injected delay, on a pool thread.
    /// <summary>Ends this rank's use of the group, as destroying an NCCL communicator does: every later operation
    /// throws <see cref="ObjectDisposedException"/> (peers still waiting for this rank time out).</summary>
    public void Dispose() => _disposed = true;

    /// <inheritdoc />
    public void Synchronize() => ObjectDisposedException.ThrowIf(_disposed, this);

    /// <inheritdoc />
    public void Abort(Exception reason)
    {
        ArgumentNullException.ThrowIfNull(reason);
        _group.World.Poison(reason);
    }

    private ICommWork Start(string op, Tensor? input, object? arg, Func<Tensor?[], object?[], Tensor> compute)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long seq = _seq++;
        _group.World.ThrowIfPoisoned($"Group '{Name}', rank {Rank}, {op} #{seq}");
        Count(op, input, arg is int root && op == "Broadcast" ? root : -1);
        Tensor? copy = null;
        ITransferEvent? ready = null;
        if (input is not null)
        {
            using (torch.no_grad())
            {
                using var detached = input.detach();   // a local: kept alive through the native copy
                copy = detached.clone().DetachFromDisposeScope();
            }
            if (copy.device.type == DeviceType.CUDA) ready = GpuTransport.Current.MarkReady(copy);
        }
        var delay = _group.World.DelayFor(WorldRank);
        if (delay > TimeSpan.Zero)
        {
            var posted = Task.Run(async () =>
            {
                await Task.Delay(delay).ConfigureAwait(false);
                _group.Post(seq, Rank, op, copy, ready, arg);
            });
            return new Work(() =>
            {
                posted.GetAwaiter().GetResult();   // a mismatch found while posting surfaces here
                return _group.Complete(seq, Rank, op, compute, CommStream);
            }, () =>
            {
                try { posted.GetAwaiter().GetResult(); } catch (Exception) { return; }   // never posted: nothing to read
                _group.Abandon(seq);
            });
        }
        _group.Post(seq, Rank, op, copy, ready, arg);
        return new Work(() => _group.Complete(seq, Rank, op, compute, CommStream), () => _group.Abandon(seq));
    }

    private nint CommStream(int device)
    {
        if (!_commStreams.TryGetValue(device, out var stream)) _commStreams[device] = stream = GpuTransport.Current.NewCommStream(device);
        return stream;
    }

    private Device MyDevice(Tensor?[] inputs) => inputs[Rank]!.device;

    private static void CheckSameTrailing(string op, Tensor?[] inputs)
    {
        var first = inputs[0]!;
        for (int i = 1; i < inputs.Length; i++)
        {
            var t = inputs[i]!;
            if (t.dtype != first.dtype || t.dim() != first.dim() || !t.shape.Skip(1).SequenceEqual(first.shape.Skip(1)))
                throw new CommunicatorException(
                    $"{op}: rank 0 passed {first.dtype} [{string.Join(", ", first.shape)}] but rank {i} passed {t.dtype} [{string.Join(", ", t.shape)}]; all dimensions but the first and the dtype must agree.");
        }
    }

    private static void CheckSameShape(string op, Tensor?[] inputs)
    {
        var first = inputs[0]!;
        for (int i = 1; i < inputs.Length; i++)
        {
            var t = inputs[i]!;
            if (t.dtype != first.dtype || !t.shape.SequenceEqual(first.shape))
                throw new CommunicatorException(
                    $"{op}: rank 0 passed {first.dtype} [{string.Join(", ", first.shape)}] but rank {i} passed {t.dtype} [{string.Join(", ", t.shape)}]; shapes and dtypes must agree.");
        }
    }

    // Sum in rank order; 16-bit inputs accumulate in float32.
    private static Tensor SumInRankOrder(IEnumerable<Tensor> parts, Device device, ScalarType dtype)
    {
        var acc = dtype is ScalarType.BFloat16 or ScalarType.Float16 ? ScalarType.Float32 : dtype;
        Tensor? sum = null;
        foreach (var p in parts)
        {
            var x = p.to(device).to(acc);
            sum = sum is null ? x.clone() : sum.PlusInPlace(x);
        }
        return sum!.to(dtype);
    }

    /// <inheritdoc />
    public ICommWork AllGatherAsync(Tensor local, IReadOnlyList<long>? counts = null)
    {
        ArgumentNullException.ThrowIfNull(local);
        if (counts is not null && (counts.Count != Size || counts[Rank] != local.shape[0] || counts.Any(c => c < 0)))
            throw new ArgumentException($"AllGather on group '{Name}': counts [{string.Join(", ", counts)}] must have {Size} non-negative entries, rank {Rank}'s being its {local.shape[0]} rows.", nameof(counts));
        return Start("AllGather", local, counts?.ToArray(), (inputs, args) =>
        {
            CheckSameTrailing($"Group '{Name}' AllGather", inputs);
            var given = args.Select(a => (long[]?)a).ToArray();
            if (given.Any(a => a is not null))
                for (int i = 0; i < Size; i++)
                    if (given[i] is null || !given[i]!.SequenceEqual(inputs.Select(t => t!.shape[0])))
                        throw new CommunicatorException($"Group '{Name}' AllGather: rank {i} passed counts [{(given[i] is null ? "none" : string.Join(", ", given[i]!))}] but the ranks hold [{string.Join(", ", inputs.Select(t => t!.shape[0]))}] rows.");
            var dev = MyDevice(inputs);
            using (torch.no_grad()) return torch.cat(inputs.Select(t => t!.to(dev)).ToArray(), 0);
        });
    }

    /// <inheritdoc />
    public ICommWork ReduceScatterAsync(Tensor full, IReadOnlyList<long> counts)
    {
        ArgumentNullException.ThrowIfNull(full);
        ArgumentNullException.ThrowIfNull(counts);
        if (counts.Count != Size) throw new ArgumentException($"ReduceScatter on group '{Name}' needs {Size} counts, found {counts.Count}.", nameof(counts));
        if (counts.Sum() != full.shape[0] || counts.Any(c => c < 0))
            throw new ArgumentException($"ReduceScatter on group '{Name}': counts [{string.Join(", ", counts)}] do not split dimension 0 of size {full.shape[0]}.", nameof(counts));
        var mine = counts.ToArray();
        return Start("ReduceScatter", full, mine, (inputs, args) =>
        {
            CheckSameShape($"Group '{Name}' ReduceScatter", inputs);
            for (int i = 1; i < args.Length; i++)
                if (!((long[])args[i]!).SequenceEqual((long[])args[0]!))
                    throw new CommunicatorException($"Group '{Name}' ReduceScatter: rank 0 split as [{string.Join(", ", (long[])args[0]!)}] but rank {i} as [{string.Join(", ", (long[])args[i]!)}].");
            long start = mine.Take(Rank).Sum();
            var dev = MyDevice(inputs);
            using (torch.no_grad()) return SumInRankOrder(inputs.Select(t => t!.narrow(0, start, mine[Rank])), dev, inputs[0]!.dtype);
        });
    }

    /// <inheritdoc />
    public ICommWork AllReduceAsync(Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        return Start("AllReduce", tensor, null, (inputs, _) =>
        {
            CheckSameShape($"Group '{Name}' AllReduce", inputs);
            using (torch.no_grad()) return SumInRankOrder(inputs.Select(t => t!), MyDevice(inputs), inputs[0]!.dtype);
        });
    }

    /// <inheritdoc />
    public ICommWork BroadcastAsync(Tensor tensor, int root)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        if (root < 0 || root >= Size) throw new ArgumentOutOfRangeException(nameof(root), $"Broadcast root {root} is not a rank of group '{Name}' (size {Size}).");
        return Start("Broadcast", tensor, root, (inputs, args) =>
        {
            CheckSameShape($"Group '{Name}' Broadcast", inputs);
            if (args.Any(a => (int)a! != root)) throw new CommunicatorException($"Group '{Name}' Broadcast: ranks disagree on the root.");
            using (torch.no_grad()) return inputs[root]!.to(MyDevice(inputs)).clone();
        });
    }

    /// <inheritdoc />
    public ICommWork PermuteAsync(Tensor send, int shift, long receiveRows = -1)
    {
        ArgumentNullException.ThrowIfNull(send);
        if (receiveRows < -1) throw new ArgumentOutOfRangeException(nameof(receiveRows), $"Permute on group '{Name}': receiveRows must be −1 (unknown) or a row count, found {receiveRows}.");
        return Start("Permute", send, shift, (inputs, args) =>
        {
            if (args.Any(a => (int)a! != shift)) throw new CommunicatorException($"Group '{Name}' Permute: ranks disagree on the shift.");
            CheckSameTrailing($"Group '{Name}' Permute", inputs);
            int src = (((Rank - shift) % Size) + Size) % Size;
            if (receiveRows >= 0 && inputs[src]!.shape[0] != receiveRows)
                throw new CommunicatorException($"Group '{Name}' Permute: rank {Rank} expected {receiveRows} rows from rank {src}, which sent {inputs[src]!.shape[0]}.");
            using (torch.no_grad()) return inputs[src]!.to(MyDevice(inputs)).clone();
        });
    }

    /// <inheritdoc />
    public void Barrier()
    {
        Start("Barrier", null, null, (_, _) => torch.empty(0)).Wait().Dispose();
    }
}
