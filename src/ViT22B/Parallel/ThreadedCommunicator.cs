using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// The shared state of an in-process world: ranks are threads of one process (PyTorch's threaded process group is
/// the model). Holds the timeout, the optional delay injection used by tests, and the poison flag: the first
/// failure on any rank poisons the world, wakes every waiting rank and makes every later collective fail with a
/// message naming the failed rank.
/// </summary>
public sealed class ThreadedWorld
{
    private readonly Lock _poisonLock = new();
    private readonly List<ThreadedGroup> _groups = new();
    private volatile Exception? _poison;
    private readonly Func<int, TimeSpan>? _delay;

    /// <summary>Creates a world of <paramref name="size"/> ranks.</summary>
    /// <param name="size">Number of ranks (threads).</param>
    /// <param name="timeout">How long a rank waits for its peers to reach a collective (default 5 minutes: a peer may
    /// legitimately be computing a large matmul on a CPU).</param>
    /// <param name="delay">Optional delay injected before each rank's contribution is delivered (tests use random
    /// delays to check that results do not depend on timing); it receives the world rank.</param>
    public ThreadedWorld(int size, TimeSpan? timeout = null, Func<int, TimeSpan>? delay = null)
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), $"A world needs at least one rank, found {size}.");
        Size = size;
        Timeout = timeout ?? TimeSpan.FromMinutes(5);
        if (Timeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(timeout), "The timeout must be positive.");
        _delay = delay;
    }

    /// <summary>Number of ranks.</summary>
    public int Size { get; }

    /// <summary>How long a rank waits for its peers.</summary>
    public TimeSpan Timeout { get; }

    /// <summary>True once any rank has failed.</summary>
    public bool IsPoisoned => _poison is not null;

    /// <summary>Creates a group over the given world ranks and returns one communicator per member (index = group rank).
    /// Create all groups before starting the rank threads.</summary>
    public ThreadedCommunicator[] CreateGroup(string name, IReadOnlyList<int> worldRanks)
    {
        ArgumentNullException.ThrowIfNull(worldRanks);
        if (worldRanks.Count == 0) throw new ArgumentException($"Group '{name}' has no ranks.", nameof(worldRanks));
        foreach (int r in worldRanks)
            if (r < 0 || r >= Size) throw new ArgumentException($"Group '{name}' names rank {r}, but the world has {Size} ranks.", nameof(worldRanks));
        if (worldRanks.Distinct().Count() != worldRanks.Count) throw new ArgumentException($"Group '{name}' lists a rank twice.", nameof(worldRanks));
        var group = new ThreadedGroup(this, name, worldRanks.ToArray());
        lock (_poisonLock) _groups.Add(group);
        return Enumerable.Range(0, worldRanks.Count).Select(i => new ThreadedCommunicator(group, i)).ToArray();
    }

    /// <summary>Marks the world failed (first failure wins) and wakes every waiting rank.</summary>
    public void Poison(Exception reason)
    {
        ThreadedGroup[] groups;
        lock (_poisonLock)
        {
            _poison ??= reason;
            groups = _groups.ToArray();
        }
        foreach (var g in groups) g.WakeAll();
    }

    internal void ThrowIfPoisoned(string where)
    {
        var p = _poison;
        if (p is not null)
            throw new CommunicatorException($"{where}: the world is poisoned: {p.Message}", p);
    }

    internal TimeSpan DelayFor(int worldRank) => _delay?.Invoke(worldRank) ?? TimeSpan.Zero;
}

/// <summary>The shared rendezvous state of one group.</summary>
internal sealed class ThreadedGroup
{
    private readonly object _lock = new();
    private readonly Dictionary<long, Slot> _slots = new();

    public ThreadedGroup(ThreadedWorld world, string name, int[] worldRanks) => (World, Name, WorldRanks) = (world, name, worldRanks);

    public ThreadedWorld World { get; }
    public string Name { get; }
    public int[] WorldRanks { get; }
    public int Size => WorldRanks.Length;

    private sealed class Slot
    {
        public string Op = "";
        public readonly Tensor?[] Inputs;
        public readonly object?[] Args;
        public readonly bool[] Arrived;
        public readonly ITransferEvent?[] Ready, Done;   // GPU inputs only: copy queued (sender) / reads queued (receiver)
        public int ArrivedCount, Consumed;
        public Slot(int n) => (Inputs, Args, Arrived, Ready, Done) = (new Tensor?[n], new object?[n], new bool[n], new ITransferEvent?[n], new ITransferEvent?[n]);
    }

    public void WakeAll()
    {
        lock (_lock) Monitor.PulseAll(_lock);
    }

    /// <summary>Deposits rank <paramref name="rank"/>'s contribution to collective number <paramref name="seq"/>.</summary>
    public void Post(long seq, int rank, string op, Tensor? input, ITransferEvent? ready, object? arg)
    {
        lock (_lock)
        {
            if (!_slots.TryGetValue(seq, out var slot)) _slots[seq] = slot = new Slot(Size) { Op = op };
            if (slot.Op != op)
            {
                ready?.Synchronize();
                ready?.Dispose();
                input?.Dispose();
                int other = Array.FindIndex(slot.Arrived, a => a);
                var e = new CommunicatorException(
                    $"Group '{Name}', collective #{seq}: rank {rank} called {op} but rank {other} called {slot.Op}; every rank must issue the same collectives in the same order.");
                World.Poison(e);
                throw e;
            }
            slot.Inputs[rank] = input;
            slot.Ready[rank] = ready;
            slot.Args[rank] = arg;
            slot.Arrived[rank] = true;
            slot.ArrivedCount++;
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>Waits until every rank has posted collective <paramref name="seq"/>, then runs <paramref name="compute"/>
    /// on the inputs (read-only) and releases them once every rank has computed its result. With GPU inputs the
    /// result is built on <paramref name="commStream"/> (see <see cref="IGpuTransport"/>).</summary>
    public Tensor Complete(long seq, int rank, string op, Func<Tensor?[], object?[], Tensor> compute, Func<int, nint> commStream)
    {
        // The collective's arithmetic runs in a dispose scope of its own, so that its temporaries stay referenced through
        // every native call (callers such as backward have no scope; a tensor referenced only by a native call's
        // argument could be finalized during it); the result is moved out.
        static Tensor Scoped(Func<Tensor?[], object?[], Tensor> compute, Slot slot)
        {
            using var scope = torch.NewDisposeScope();
            return compute(slot.Inputs, slot.Args).MoveToOuterDisposeScope();
        }

        Slot slot;
        var watch = Stopwatch.StartNew();
        lock (_lock)
        {
            while (true)
            {
                World.ThrowIfPoisoned($"Group '{Name}', rank {rank}, {op} #{seq}");
                if (_slots.TryGetValue(seq, out slot!) && slot.ArrivedCount == Size) break;
                var left = World.Timeout - watch.Elapsed;
                if (left <= TimeSpan.Zero)
                {
                    string arrived = slot is null ? "none" : string.Join(", ", Enumerable.Range(0, Size).Where(i => slot.Arrived[i]));
                    string missing = slot is null ? "all" : string.Join(", ", Enumerable.Range(0, Size).Where(i => !slot.Arrived[i]));
                    var e = new CommunicatorException(
                        $"Group '{Name}', {op} #{seq}: timed out after {World.Timeout.TotalSeconds:0.###} s waiting on rank(s) {missing} (arrived: {arrived}); a rank skipped or reordered a collective, or is stuck.");
                    World.Poison(e);
                    throw e;
                }
                Monitor.Wait(_lock, left);
            }
        }
        try
        {
            if (slot.Inputs[rank] is not { } mine || mine.device.type != DeviceType.CUDA) return Scoped(compute, slot);
            var gpu = GpuTransport.Current;
            int device = gpu.Ordinal(mine.device);
            var (result, done) = gpu.Receive(device, commStream(device), slot.Ready, () => Scoped(compute, slot));
            slot.Done[rank] = done;
            return result;
        }
        catch (Exception e)
        {
            var failure = e as CommunicatorException ?? new CommunicatorException($"Group '{Name}', rank {rank}, {op} #{seq}: {e.Message}", e);
            World.Poison(failure);
            if (ReferenceEquals(failure, e)) throw;
            throw failure;
        }
        finally
        {
            Consume(seq, slot);
        }
    }

    /// <summary>A rank disposed collective <paramref name="seq"/> without waiting for it: it reads nothing, but
    /// counts as a reader, so the inputs are still freed once the others have read them.</summary>
    public void Abandon(long seq)
    {
        Slot? slot;
        lock (_lock) _slots.TryGetValue(seq, out slot);
        if (slot is not null) Consume(seq, slot);
    }

    // The last reader frees the inputs, outside the lock. On GPUs the readers' copies may still be queued: the inputs
    // then wait in a list, checked (never waited on) by later collectives, until every reader's done event has passed.
    private void Consume(long seq, Slot slot)
    {
        bool last;
        lock (_lock)
        {
            last = ++slot.Consumed == Size;
            if (last) _slots.Remove(seq);
        }
        if (last)
            lock (_retired) _retired.Add(slot);
        ReleaseRetired();
    }

    private readonly List<Slot> _retired = new();

    private void ReleaseRetired()
    {
        Slot[] ready;
        lock (_retired)
        {
            ready = _retired.Where(s => s.Done.All(e => e is null || e.IsComplete)).ToArray();
            foreach (var s in ready) _retired.Remove(s);
        }
        foreach (var s in ready)                           // CPU inputs: no events, just disposal
        {
            foreach (var t in s.Inputs) t?.Dispose();
            foreach (var e in s.Done.Concat(s.Ready)) e?.Dispose();
        }
    }
}

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
            sum = sum is null ? x.clone() : sum.add_(x);
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
