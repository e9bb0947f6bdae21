using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

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
