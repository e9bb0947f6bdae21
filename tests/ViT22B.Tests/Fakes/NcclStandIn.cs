using System.Runtime.InteropServices;
using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using static TorchSharp.torch;

namespace ViT22B.Tests.Fakes;

/// <summary>
/// NCCL and the few device operations <see cref="NcclCommunicator"/> uses, in process, on CPU tensors: ranks are
/// threads, buffers are the tensors' real addresses, streams are queues this class advances. It enforces NCCL's rules
/// rather than the in-process backend's, and is stricter than NCCL wherever NCCL would hang or corrupt silently:
/// <list type="bullet">
/// <item>Group depth is per thread; calls inside a group launch nothing until the outermost <c>ncclGroupEnd</c>
/// (an event recorded on a stream while the thread's group still holds calls for it is a violation).</item>
/// <item>Each rank's launches on a communicator are numbered in issue order; launch n must match across ranks
/// (operation, count, type, reduction, root; for send/receive, the count and type of every pair). A mismatch fails
/// every rank (asynchronous error <c>ncclInvalidUsage</c>, with every rank's launch in <c>ncclGetLastError</c>) where
/// NCCL would hang or exchange the wrong data. (So every launch must involve every rank of its communicator: the
/// library never issues anything else.)</item>
/// <item>Non-blocking communicators: initialization stays <c>ncclInProgress</c> until every rank has joined; every call
/// returns <c>ncclInProgress</c> and reaches its stream only when <c>ncclCommGetAsyncError</c> is polled; recording an
/// event on that stream, or calling NCCL again on the communicator, before then is a violation.</item>
/// <item>Buffers must come from <see cref="ICommDevice.DataPointer"/> and fit the counts; a launch must be preceded on
/// its stream by a wait on an event of the compute stream; a send buffer must not change between the call and the
/// launch's execution; a buffer must not be released (nor freed by a finalizer) while a launch that uses it is pending;
/// a compute stream made to wait for an event that has not passed holds its thread until the event passes (CPU compute
/// is synchronous: the next tensor operation must not read the data before it arrives), and reports a violation if
/// nothing ends the collective within <see cref="ComputeWaitLimit"/>.</item>
/// <item>Two ranks of one communicator on one device are refused (<c>ncclInvalidUsage</c>) unless
/// <c>multiRankGpu</c>; a communicator used for calls from two threads, a freed or aborted communicator used again,
/// or one destroyed with launches pending, are violations. Aborting stops the rank's pending launches (they complete
/// without moving data); its peers are not told and wait until their own timeout, as with NCCL.</item>
/// <item>The launches a host thread issues on one device, over all its communicators, run in the order they were
/// issued (NCCL before 2.26 needs one consistent order across the communicators of a device, and its implicit launch
/// order since then follows the host's issue order): ranks that issue two communicators' collectives in different
/// orders deadlock here instead of passing.</item>
/// <item>Sums are taken in reverse rank order and 16-bit types are rounded after every addition (NCCL's own order and
/// per-hop rounding differ from the in-process backend's rank order), so no test can depend on rank-order sums.</item>
/// <item>Send and receive buffers may overlap only in NCCL's in-place layouts; a buffer and an event must belong to the
/// device of their communicator and stream; a send buffer modified after the launch ran but before the communicator
/// gave it back is a violation too; a group mixing initialization with collectives, or blocking with non-blocking
/// communicators, is refused, and an error other than "invalid argument" inside a group fails the whole group.</item>
/// </list>
/// Violations are collected in <see cref="Violations"/> (a test asserts there are none with <see cref="AssertClean"/>).
/// Calls inside a group on a non-blocking communicator answer <c>ncclInProgress</c> (NCCL may; the group's end decides).
/// It counts, per device, the launches issued (<see cref="LaunchesOf"/>), the host reads of device values
/// (<see cref="HostReads"/>) and the event polls of the threads that issue collectives (<see cref="HostPolls"/>). What it cannot show: real stream concurrency (CPU compute is synchronous), real
/// kernels, NVLink/network behaviour, and anything about performance.
/// </summary>
internal sealed unsafe class NcclStandIn : INcclApi, ICommDevice, IDisposable
{
    private readonly object _lock = new();
    private readonly int _version;
    private readonly bool _multiRankGpu;
    private readonly Func<int, TimeSpan>? _delay;
    private readonly Dictionary<string, Clique> _cliques = new();
    private readonly Dictionary<nint, Comm> _comms = new();
    private readonly HashSet<nint> _freed = new();
    private readonly Dictionary<nint, Stream> _streams = new();
    private readonly List<Registered> _buffers = new();
    private readonly List<string> _violations = new();
    private readonly List<string> _mismatches = new();
    private readonly Dictionary<int, List<string>> _launchLog = new();
    private readonly Dictionary<int, int> _hostReads = new();
    private readonly Dictionary<int, int> _hostPolls = new();
    private readonly List<(int Device, string Function, NcclResult Result)> _failNext = new();
    private readonly List<(int Device, string Function)> _throwNext = new();
    private readonly Dictionary<(int Device, int Thread), List<Launch>> _issueOrder = new();
    private readonly HashSet<int> _broken = new();
    private readonly ThreadLocal<GroupState> _group = new(() => new GroupState(), trackAllValues: false);
    private readonly ThreadLocal<int> _currentDevice = new(() => -1);
    private readonly ThreadLocal<Dictionary<int, nint>> _computeStreams = new(() => new Dictionary<int, nint>());
    private long _nextHandle = 0x1000;
    private int _ids;

    /// <param name="version">What <c>ncclGetVersion</c> reports (default 2.30.7).</param>
    /// <param name="deviceCount">Devices the process "sees".</param>
    /// <param name="multiRankGpu">Allow two ranks of a communicator on one device (NCCL 2.30 with
    /// <c>NCCL_MULTI_RANK_GPU_ENABLE=1</c>).</param>
    /// <param name="delay">A delay before each launch is issued, by device (tests of timing independence).</param>
    public NcclStandIn(int version = 23007, int deviceCount = 8, bool multiRankGpu = false, Func<int, TimeSpan>? delay = null)
    {
        (_version, DeviceCount, _multiRankGpu, _delay) = (version, deviceCount, multiRankGpu, delay);
    }

    // ---------------------------------------------------------------- what tests read and inject

    /// <summary>Rule violations seen so far.</summary>
    public IReadOnlyList<string> Violations { get { lock (_lock) return _violations.ToArray(); } }

    /// <summary>Launches that did not match across ranks (each also failed every rank of its communicator).</summary>
    public IReadOnlyList<string> Mismatches { get { lock (_lock) return _mismatches.ToArray(); } }

    /// <summary>Descriptions of the launches issued by the communicators on <paramref name="device"/>, in order.</summary>
    public IReadOnlyList<string> LaunchesOf(int device) { lock (_lock) return _launchLog.TryGetValue(device, out var l) ? l.ToArray() : Array.Empty<string>(); }

    /// <summary>Host reads of device values (<see cref="ICommDevice.ReadToHost"/>) on <paramref name="device"/>.</summary>
    public int HostReads(int device) { lock (_lock) return _hostReads.GetValueOrDefault(device); }

    /// <summary>Event queries (<see cref="IDeviceEvent.IsComplete"/>) on <paramref name="device"/> from threads that
    /// issue collectives: a thread polling how far the device is.</summary>
    public int HostPolls(int device) { lock (_lock) return _hostPolls.GetValueOrDefault(device); }

    /// <summary>Host synchronizations on <paramref name="device"/>: reads of device values and event polls by the
    /// threads that issue collectives.</summary>
    public int HostSyncs(int device) { lock (_lock) return _hostReads.GetValueOrDefault(device) + _hostPolls.GetValueOrDefault(device); }

    /// <summary>How long a compute stream waits for an event before the stand-in reports it as never passing.</summary>
    public TimeSpan ComputeWaitLimit { get; init; } = TimeSpan.FromSeconds(120);

    /// <summary>Buffers registered and not released.</summary>
    public int LiveBuffers { get { lock (_lock) return _buffers.Count; } }

    /// <summary>Communicators created and neither destroyed nor aborted.</summary>
    public int LiveCommunicators { get { lock (_lock) return _comms.Count; } }

    /// <summary>Communication streams created and not given back.</summary>
    public int LiveCommStreams { get { lock (_lock) return _streams.Values.Count(s => !s.IsCompute && !s.Released); } }

    /// <summary>The calling thread's current device (−1: none).</summary>
    public int CurrentDeviceOfThread => _currentDevice.Value;

    /// <summary>From now on every event operation on <paramref name="device"/> fails, as after a sticky CUDA error.</summary>
    public void BreakDevice(int device)
    {
        lock (_lock) _broken.Add(device);
    }

    /// <summary>The calling thread's NCCL group depth.</summary>
    public int GroupDepth => _group.Value!.Depth;

    /// <summary>Sets an asynchronous error on every communicator of <paramref name="device"/> (a network failure, say).</summary>
    public void InjectAsyncError(int device, NcclResult error, string message)
    {
        lock (_lock)
            foreach (var c in _comms.Values.Where(c => c.Device == device))
                (c.AsyncError, c.LastError) = (error, message);
    }

    /// <summary>The next call of <paramref name="function"/> (e.g. <c>"ncclSend"</c>) by a communicator on
    /// <paramref name="device"/> returns <paramref name="result"/> and does nothing (NCCL's "the call had no effect").</summary>
    public void FailNextCall(int device, string function, NcclResult result)
    {
        lock (_lock) _failNext.Add((device, function, result));
    }

    /// <summary>The next call of <paramref name="function"/> by a communicator on <paramref name="device"/> throws (a
    /// failure in managed glue between NCCL calls, say) without doing anything.</summary>
    public void ThrowOnNextCall(int device, string function)
    {
        lock (_lock) _throwNext.Add((device, function));
    }

    /// <summary>Whether memory at <paramref name="address"/> was handed to NCCL (as the start of a buffer) and not yet
    /// released: a caller's tensor sent without a copy.</summary>
    public bool IsHandedToNccl(nint address)
    {
        lock (_lock) return _buffers.Any(b => b.Pointer == address);
    }

    /// <summary>Throws if any rule was violated.</summary>
    public void AssertClean()
    {
        var v = Violations;
        Assert.True(v.Count == 0, $"The NCCL stand-in saw {v.Count} violation(s):\n" + string.Join("\n", v));
    }

    public void Dispose()
    {
        _group.Dispose();
        _currentDevice.Dispose();
        _computeStreams.Dispose();
    }

    // ---------------------------------------------------------------- model

    private enum Kind { AllReduce, ReduceScatter, AllGather, Broadcast, Send, Recv }
    private enum LaunchState { Issuing, Queued, Done, Aborted }

    private sealed record Op(Kind Kind, nint Send, nint Recv, long Count, NcclDataType Type, NcclRedOp RedOp, int Root, int Peer, nint Stream)
    {
        public string Describe() => Kind switch
        {
            Kind.Send => $"Send(to {Peer}, {Count} × {Type})",
            Kind.Recv => $"Recv(from {Peer}, {Count} × {Type})",
            Kind.Broadcast => $"Broadcast(root {Root}, {Count} × {Type})",
            Kind.AllReduce or Kind.ReduceScatter => $"{Kind}({RedOp}, {Count} × {Type})",
            _ => $"{Kind}({Count} × {Type})",
        };

        // What must agree across ranks for a collective.
        public string Signature => Kind is Kind.Send or Kind.Recv ? "" : Describe();
    }

    private sealed class Clique(string key, int size)
    {
        public string Key { get; } = key;
        public int Size { get; } = size;
        public Comm?[] Members { get; } = new Comm?[size];
        public List<Launch>[] Issued { get; } = Enumerable.Range(0, size).Select(_ => new List<Launch>()).ToArray();
        public HashSet<int> Broken { get; } = new();
        public bool Complete => Members.All(m => m is not null);
    }

    private sealed class Comm(nint handle, Clique clique, int rank, int device, bool blocking)
    {
        public nint Handle { get; } = handle;
        public Clique Clique { get; } = clique;
        public int Rank { get; } = rank;
        public int Device { get; } = device;
        public bool Blocking { get; } = blocking;
        public NcclResult AsyncError { get; set; } = NcclResult.Success;
        public string LastError { get; set; } = "";
        public bool Aborted { get; set; }
        public List<Launch> Issuing { get; } = new();
        public int OwnerThread { get; set; } = -1;
        public string Name => $"rank {Rank} of communicator {Clique.Key[..8]} (device {Device})";
    }

    private sealed class Launch(Comm comm, int index, nint stream, List<Op> ops, ulong[] sendHashes, Registered[] uses)
    {
        public Comm Comm { get; } = comm;
        public Registered[] Uses { get; } = uses;
        public int Index { get; } = index;
        public nint Stream { get; } = stream;
        public List<Op> Ops { get; } = ops;
        public ulong[] SendHashes { get; } = sendHashes;
        public LaunchState State { get; set; } = LaunchState.Issuing;
        public (int Device, int Thread) OrderKey { get; set; }
        public string Describe() => Ops.Count == 1 ? Ops[0].Describe() : $"[{string.Join(", ", Ops.Select(o => o.Describe()))}]";
        public bool Pending => State is LaunchState.Issuing or LaunchState.Queued;
    }

    private sealed class Stream(nint handle, int device, bool compute)
    {
        public nint Handle { get; } = handle;
        public int Device { get; } = device;
        public bool IsCompute { get; } = compute;
        public List<object> Items { get; } = new();
        public int Head { get; set; }
        public bool WaitedOnCompute { get; set; }
        public bool Released { get; set; }
        public bool Idle => Head >= Items.Count;
    }

    private sealed record WaitItem(Event Event, long Generation);
    private sealed record RecordItem(Event Event, long Generation);
    private sealed record LaunchItem(Launch Launch);

    private sealed class Registered(nint pointer, long bytes, Tensor tensor, int device)
    {
        public nint Pointer { get; } = pointer;
        public long Bytes { get; } = bytes;
        public int Device { get; } = device;      // −1: registered on a thread with no current device
        public List<(nint Pointer, long Bytes, ulong Hash, string Launch)> Sends { get; } = new();
        public WeakReference<Tensor> Tensor { get; } = new(tensor);
        public bool Contains(nint p, long bytes) => p >= Pointer && p + bytes <= Pointer + Bytes;
        public bool Alive => Tensor.TryGetTarget(out var t) && !t.IsInvalid;
    }

    private sealed class GroupState
    {
        public int Depth;
        public NcclResult Error = NcclResult.Success;
        public bool HasInit;
        public readonly List<(Comm Comm, Op Op)> Calls = new();
    }

    private sealed class Event(NcclStandIn owner, int device) : IDeviceEvent
    {
        public int Device { get; } = device;
        public long Recorded { get; set; }
        public long Completed { get; set; }
        public nint RecordedOn { get; set; }

        public void Record(nint stream) => owner.RecordEvent(this, stream);
        public void Wait(nint stream) => owner.WaitEvent(this, stream);
        public bool IsComplete => owner.Query(this);
        public void Dispose() { }
    }

    private nint NewHandle() => (nint)Interlocked.Increment(ref _nextHandle);

    private void Violation(string what) => _violations.Add(what);

    // ---------------------------------------------------------------- INcclApi

    public NcclResult GetVersion(int* version)
    {
        *version = _version;
        return NcclResult.Success;
    }

    public NcclResult GetUniqueId(NcclUniqueId* id)
    {
        int n = Interlocked.Increment(ref _ids);
        var bytes = new byte[NcclUniqueId.Bytes];
        BitConverter.TryWriteBytes(bytes, n);
        BitConverter.TryWriteBytes(bytes.AsSpan(4), GetHashCode());
        new Random(n).NextBytes(bytes.AsSpan(8));
        *id = NcclUniqueId.FromBytes(bytes);
        return NcclResult.Success;
    }

    public NcclResult CommInitRankConfig(nint* comm, int nranks, NcclUniqueId id, int rank, NcclConfig* config)
    {
        *comm = 0;
        bool blocking = true;
        if (config is not null)
        {
            if (config->Magic != NcclConfig.ApiMagic || config->Size < 24 || config->Version < 21400)
                return NcclResult.InvalidArgument;   // "ncclConfig_t argument not initialized via NCCL_CONFIG_INITIALIZER"
            if (config->Blocking is not (0 or 1)) return NcclResult.InvalidArgument;
            blocking = config->Blocking != 0;
        }
        if (nranks < 1 || rank < 0 || rank >= nranks) return NcclResult.InvalidArgument;
        int device = _currentDevice.Value;
        Comm c;
        lock (_lock)
        {
            if (device < 0)
            {
                Violation($"ncclCommInitRankConfig (rank {rank}) on a thread with no current device: NCCL takes the device from the calling thread.");
                return NcclResult.InvalidUsage;
            }
            string key = Convert.ToHexString(id.ToArray().AsSpan(0, 16));
            if (!_cliques.TryGetValue(key, out var clique)) _cliques[key] = clique = new Clique(key, nranks);
            if (clique.Size != nranks) return NcclResult.InvalidArgument;
            if (clique.Members[rank] is not null) return NcclResult.InvalidUsage;
            int sharing = clique.Members.Count(m => m is not null && m.Device == device);
            if (sharing > 0 && (!_multiRankGpu || sharing >= 2)) return NcclResult.InvalidUsage;   // "Duplicate GPU detected"
            c = new Comm(NewHandle(), clique, rank, device, blocking);
            if (_group.Value!.Depth > 0) _group.Value.HasInit = true;
            clique.Members[rank] = c;
            _comms[c.Handle] = c;
            *comm = c.Handle;
            Monitor.PulseAll(_lock);
            if (!blocking) return NcclResult.InProgress;
            var until = DateTime.UtcNow + TimeSpan.FromSeconds(60);
            while (!clique.Complete && DateTime.UtcNow < until) Monitor.Wait(_lock, TimeSpan.FromMilliseconds(50));
            return clique.Complete ? NcclResult.Success : NcclResult.InternalError;
        }
    }

    public NcclResult CommGetAsyncError(nint comm, NcclResult* state)
    {
        lock (_lock)
        {
            if (!_comms.TryGetValue(comm, out var c))
            {
                if (_freed.Contains(comm)) Violation($"ncclCommGetAsyncError on a communicator that was already aborted or destroyed.");
                return NcclResult.InvalidArgument;
            }
            Progress();
            if (c.AsyncError != NcclResult.Success) *state = c.AsyncError;
            else if (!c.Clique.Complete) *state = NcclResult.InProgress;
            else
            {
                // The calls that returned ncclInProgress reach their streams now.
                foreach (var l in c.Issuing) Enqueue(l);
                c.Issuing.Clear();
                Progress();
                *state = NcclResult.Success;
            }
            return NcclResult.Success;
        }
    }

    // Frees a communicator's handle (abort and destroy); a handle already freed is a violation.
    private Comm? Free(nint comm, string function)
    {
        if (!_comms.Remove(comm, out var c))
        {
            Violation($"{function} on a communicator that was already aborted or destroyed.");
            return null;
        }
        _freed.Add(comm);
        return c;
    }

    public NcclResult CommAbort(nint comm)
    {
        lock (_lock)
        {
            if (Free(comm, "ncclCommAbort") is not { } c) return NcclResult.InvalidArgument;
            c.Aborted = true;
            foreach (var l in c.Clique.Issued[c.Rank].Where(l => l.Pending)) l.State = LaunchState.Aborted;
            c.Issuing.Clear();
            Progress();
            return NcclResult.Success;
        }
    }

    public NcclResult CommDestroy(nint comm)
    {
        lock (_lock)
        {
            if (Free(comm, "ncclCommDestroy") is not { } c) return NcclResult.InvalidArgument;
            Progress();
            var pending = c.Clique.Issued[c.Rank].Where(l => l.Pending).ToList();
            if (pending.Count > 0)
                Violation($"ncclCommDestroy on {c.Name} with {pending.Count} launch(es) still pending ({string.Join("; ", pending.Select(l => l.Describe()))}).");
            c.Aborted = true;
            return NcclResult.Success;
        }
    }

    public NcclResult AllReduce(nint send, nint recv, nuint count, NcclDataType type, NcclRedOp op, nint comm, nint stream) =>
        Call("ncclAllReduce", comm, new Op(Kind.AllReduce, send, recv, (long)count, type, op, -1, -1, stream));

    public NcclResult ReduceScatter(nint send, nint recv, nuint recvCount, NcclDataType type, NcclRedOp op, nint comm, nint stream) =>
        Call("ncclReduceScatter", comm, new Op(Kind.ReduceScatter, send, recv, (long)recvCount, type, op, -1, -1, stream));

    public NcclResult AllGather(nint send, nint recv, nuint sendCount, NcclDataType type, nint comm, nint stream) =>
        Call("ncclAllGather", comm, new Op(Kind.AllGather, send, recv, (long)sendCount, type, NcclRedOp.Sum, -1, -1, stream));

    public NcclResult Broadcast(nint send, nint recv, nuint count, NcclDataType type, int root, nint comm, nint stream) =>
        Call("ncclBroadcast", comm, new Op(Kind.Broadcast, send, recv, (long)count, type, NcclRedOp.Sum, root, -1, stream));

    public NcclResult Send(nint send, nuint count, NcclDataType type, int peer, nint comm, nint stream) =>
        Call("ncclSend", comm, new Op(Kind.Send, send, 0, (long)count, type, NcclRedOp.Sum, -1, peer, stream));

    public NcclResult Recv(nint recv, nuint count, NcclDataType type, int peer, nint comm, nint stream) =>
        Call("ncclRecv", comm, new Op(Kind.Recv, 0, recv, (long)count, type, NcclRedOp.Sum, -1, peer, stream));

    public NcclResult GroupStart()
    {
        _group.Value!.Depth++;
        return NcclResult.Success;
    }

    public NcclResult GroupEnd()
    {
        var g = _group.Value!;
        if (g.Depth == 0) return NcclResult.InvalidUsage;
        if (--g.Depth > 0) return NcclResult.Success;
        var calls = g.Calls.ToList();
        g.Calls.Clear();
        var (error, hasInit) = (g.Error, g.HasInit);
        (g.Error, g.HasInit) = (NcclResult.Success, false);
        if (error != NcclResult.Success) return error;                       // the whole group is cancelled
        if (hasInit && calls.Count > 0)
        {
            lock (_lock) Violation("One NCCL group held both communicator initialization and collectives; NCCL forbids mixing them.");
            return NcclResult.InvalidUsage;
        }
        if (calls.Select(x => x.Comm.Blocking).Distinct().Count() > 1) return NcclResult.InvalidArgument;
        var result = NcclResult.Success;
        foreach (var comm in calls.Select(x => x.Comm).Distinct())
        {
            var ops = calls.Where(x => x.Comm == comm).Select(x => x.Op).ToList();
            if (_delay is not null) Thread.Sleep(_delay(comm.Device));
            lock (_lock)
            {
                if (ops.Select(o => o.Stream).Distinct().Count() > 1)
                    Violation($"One NCCL group on {comm.Name} used several streams; NCCL would synchronize them all.");
                var r = Issue(comm, ops);
                if (r != NcclResult.Success) result = r;
            }
        }
        return result;
    }

    public string ErrorString(NcclResult result) => $"stand-in: {result}";

    public string LastError(nint comm)
    {
        lock (_lock) return _comms.TryGetValue(comm, out var c) ? c.LastError : "";
    }

    private NcclResult Call(string function, nint comm, Op op)
    {
        Comm c;
        lock (_lock)
        {
            if (!_comms.TryGetValue(comm, out c!))
            {
                if (_freed.Contains(comm)) Violation($"{function} on a communicator that was already aborted or destroyed.");
                return NcclResult.InvalidArgument;
            }
            int j = _throwNext.FindIndex(f => f.Device == c.Device && f.Function == function);
            if (j >= 0)
            {
                _throwNext.RemoveAt(j);
                throw new InvalidOperationException($"{function} threw (injected)");
            }
            int i = _failNext.FindIndex(f => f.Device == c.Device && f.Function == function);
            if (i >= 0)
            {
                var injected = _failNext[i].Result;
                _failNext.RemoveAt(i);
                c.LastError = $"{function} failed (injected {injected})";
                // "Invalid argument": the call had no effect. Any other error inside a group fails the whole group.
                if (injected != NcclResult.InvalidArgument && _group.Value!.Depth > 0) _group.Value.Error = injected;
                return injected;
            }
            if (!c.Clique.Complete)
            {
                Violation($"{function} on {c.Name} before the communicator finished initializing (poll ncclCommGetAsyncError until ncclSuccess first).");
                return NcclResult.InvalidUsage;
            }
            if (c.Issuing.Count > 0)
            {
                Violation($"{function} on {c.Name} while an earlier call was still being issued (it returned ncclInProgress and ncclCommGetAsyncError was not polled to ncclSuccess).");
                return NcclResult.InvalidUsage;
            }
            int thread = Environment.CurrentManagedThreadId;
            if (c.OwnerThread < 0) c.OwnerThread = thread;
            else if (c.OwnerThread != thread) Violation($"{function} on {c.Name} from a second thread; NCCL communicators must not be used from several threads.");
            if (!Validate(function, c, op, out var problem))
            {
                c.LastError = problem;
                return NcclResult.InvalidArgument;
            }
            var g = _group.Value!;
            if (g.Depth > 0)
            {
                g.Calls.Add((c, op));
                // NCCL answers a call on a non-blocking communicator with the communicator's state, which may be
                // ncclInProgress inside a group (provisional: ncclGroupEnd decides). Real NCCL usually answers
                // ncclSuccess there; always answering ncclInProgress makes every group exercise the case the code
                // must also handle (both are accepted by NcclComm).
                return c.Blocking ? NcclResult.Success : NcclResult.InProgress;
            }
        }
        if (_delay is not null) Thread.Sleep(_delay(c.Device));
        lock (_lock) return Issue(c, new List<Op> { op });
    }

    private bool Validate(string function, Comm c, Op op, out string problem)
    {
        problem = "";
        if (op.Count < 0 || !Enum.IsDefined(op.Type)) { problem = $"{function}: invalid count or type"; return false; }
        if (op.Kind is Kind.Send or Kind.Recv && (uint)op.Peer >= (uint)c.Clique.Size) { problem = $"{function}: peer {op.Peer} is outside [0, {c.Clique.Size})"; return false; }
        if (op.Kind == Kind.Broadcast && (uint)op.Root >= (uint)c.Clique.Size) { problem = $"{function}: root {op.Root} is outside [0, {c.Clique.Size})"; return false; }
        if (op.Stream == 0)
        {
            Violation($"{function} on {c.Name} on the legacy default stream (0): it would serialize with every other stream.");
            problem = $"{function}: stream 0";
            return false;
        }
        if (!_streams.TryGetValue(op.Stream, out var s) || s.Device != c.Device) { problem = $"{function}: unknown stream or one of another device"; return false; }
        long size = Nccl.ElementSize(op.Type), n = c.Clique.Size;
        var (sendBytes, recvBytes) = op.Kind switch
        {
            Kind.AllReduce or Kind.Broadcast => (op.Count * size, op.Count * size),
            Kind.ReduceScatter => (op.Count * size * n, op.Count * size),
            Kind.AllGather => (op.Count * size, op.Count * size * n),
            Kind.Send => (op.Count * size, 0L),
            _ => (0L, op.Count * size),
        };
        foreach (var (p, bytes, what) in new[] { (op.Send, sendBytes, "send"), (op.Recv, recvBytes, "receive") })
        {
            if (bytes == 0) continue;
            var b = Find(p, bytes);
            if (b is null)
            {
                Violation($"{function} on {c.Name}: the {what} buffer (0x{p:x}, {bytes} bytes) is not a live buffer of that size on the device.");
                problem = $"{function}: invalid {what} buffer";
                return false;
            }
            if (b.Device >= 0 && b.Device != c.Device)
            {
                Violation($"{function} on {c.Name}: the {what} buffer belongs to device {b.Device}.");
                problem = $"{function}: {what} buffer of another device";
                return false;
            }
        }
        if (sendBytes > 0 && recvBytes > 0 && op.Send < op.Recv + recvBytes && op.Recv < op.Send + sendBytes)
        {
            // In place only in NCCL's layouts: the same buffer, or the rank's block of the larger one.
            bool ok = op.Kind switch
            {
                Kind.AllGather => op.Send == op.Recv + (nint)(c.Rank * sendBytes),
                Kind.ReduceScatter => op.Recv == op.Send + (nint)(c.Rank * recvBytes),
                _ => op.Send == op.Recv,
            };
            if (!ok)
            {
                Violation($"{function} on {c.Name}: send and receive buffers overlap outside NCCL's in-place layout (the same buffer, or this rank's block of the larger one); NCCL would corrupt the data.");
                problem = $"{function}: overlapping buffers";
                return false;
            }
        }
        return true;
    }

    private NcclResult Issue(Comm c, List<Op> ops)
    {
        if (c.Aborted) return NcclResult.InvalidArgument;
        var clique = c.Clique;
        int index = clique.Issued[c.Rank].Count;
        var hashes = ops.Select(o => o.Kind is Kind.Recv ? 0UL : Hash(o.Send, SendBytes(o, clique.Size))).ToArray();
        var uses = ops.SelectMany(o => new[] { (o.Send, SendBytes(o, clique.Size)), (o.Recv, RecvBytes(o, clique.Size)) })
            .Where(x => x.Item2 > 0).Select(x => Find(x.Item1, x.Item2)!).Distinct().ToArray();
        var launch = new Launch(c, index, ops[0].Stream, ops, hashes, uses);
        clique.Issued[c.Rank].Add(launch);
        var key = (c.Device, Environment.CurrentManagedThreadId);
        if (!_issueOrder.TryGetValue(key, out var order)) _issueOrder[key] = order = new List<Launch>();
        order.Add(launch);
        launch.OrderKey = key;
        for (int i = 0; i < ops.Count; i++)
        {
            long bytes = SendBytes(ops[i], clique.Size);
            if (bytes > 0) Find(ops[i].Send, bytes)!.Sends.Add((ops[i].Send, bytes, hashes[i], $"{launch.Describe()} on {c.Name}"));
        }
        if (!_launchLog.TryGetValue(c.Device, out var log)) _launchLog[c.Device] = log = new List<string>();
        log.Add(launch.Describe());
        var stream = _streams[launch.Stream];
        if (!stream.IsCompute && !stream.WaitedOnCompute)
            Violation($"{launch.Describe()} on {c.Name} was issued on a communication stream that had not waited for an event of the compute stream since its last launch: it could read its input before it is written.");
        stream.WaitedOnCompute = false;
        CheckMatch(clique, index);
        if (c.Blocking)
        {
            Enqueue(launch);
            Progress();
            return NcclResult.Success;
        }
        c.Issuing.Add(launch);
        return NcclResult.InProgress;
    }

    private void Enqueue(Launch l)
    {
        if (l.State != LaunchState.Issuing) return;
        l.State = LaunchState.Queued;
        _streams[l.Stream].Items.Add(new LaunchItem(l));
    }

    private static long SendBytes(Op o, int n) => o.Kind switch
    {
        Kind.ReduceScatter => o.Count * Nccl.ElementSize(o.Type) * n,
        Kind.Recv => 0,
        _ => o.Count * Nccl.ElementSize(o.Type),
    };

    private void CheckMatch(Clique clique, int index)
    {
        if (clique.Issued.Any(l => l.Count <= index)) return;
        var launches = clique.Issued.Select(l => l[index]).ToArray();
        string? problem = null;
        var signatures = launches.Select(l => string.Join("; ", l.Ops.Select(o => o.Signature).Where(s => s.Length > 0))).ToArray();
        if (signatures.Distinct().Count() > 1) problem = "the collectives differ";
        for (int a = 0; a < clique.Size && problem is null; a++)
            for (int b = 0; b < clique.Size && problem is null; b++)
            {
                var sends = launches[a].Ops.Where(o => o.Kind == Kind.Send && o.Peer == b).Select(o => (o.Count, o.Type)).ToList();
                var recvs = launches[b].Ops.Where(o => o.Kind == Kind.Recv && o.Peer == a).Select(o => (o.Count, o.Type)).ToList();
                if (!sends.SequenceEqual(recvs))
                    problem = $"rank {a} sends [{string.Join(", ", sends.Select(x => $"{x.Count} × {x.Type}"))}] to rank {b}, which receives [{string.Join(", ", recvs.Select(x => $"{x.Count} × {x.Type}"))}] from it";
            }
        if (problem is null) return;
        clique.Broken.Add(index);
        string message = $"NCCL stand-in: launch #{index} does not match across the ranks of communicator {clique.Key[..8]} ({problem}): " +
                         string.Join("; ", launches.Select((l, r) => $"rank {r} issued {l.Describe()}")) +
                         $". Each rank's launches from #{Math.Max(0, index - 3)} on: " +
                         string.Join("; ", clique.Issued.Select((l, r) => $"rank {r}: [{string.Join(", ", l.Skip(Math.Max(0, index - 3)).Take(8).Select(x => x.Describe()))}]")) +
                         " (real NCCL would hang or exchange the wrong data).";
        _mismatches.Add(message);
        foreach (var m in clique.Members) if (m is not null) (m.AsyncError, m.LastError) = (NcclResult.InvalidUsage, message);
    }

    // ---------------------------------------------------------------- streams and execution

    private void Progress()
    {
        bool changed = true;
        while (changed)
        {
            changed = false;
            foreach (var s in _streams.Values)
            {
                while (!s.Idle)
                {
                    var item = s.Items[s.Head];
                    if (item is WaitItem w)
                    {
                        if (w.Event.Completed < w.Generation) break;
                    }
                    else if (item is RecordItem r)
                    {
                        r.Event.Completed = Math.Max(r.Event.Completed, r.Generation);
                    }
                    else if (item is LaunchItem { Launch: var l } && l.State is LaunchState.Queued && !TryExecute(l))
                    {
                        break;
                    }
                    s.Head++;
                    changed = true;
                }
                if (s.Head > 256 && s.Idle)
                {
                    s.Items.Clear();
                    s.Head = 0;
                }
            }
        }
    }

    // The launches one host thread issued on a device run in issue order, over all its communicators.
    private bool FirstPendingOfDevice(Launch l)
    {
        var order = _issueOrder[l.OrderKey];
        order.RemoveAll(x => !x.Pending);
        return order.Count > 0 && ReferenceEquals(order[0], l);
    }

    private bool AtHead(Launch l)
    {
        var s = _streams[l.Stream];
        return !s.Idle && s.Items[s.Head] is LaunchItem { Launch: var h } && ReferenceEquals(h, l);
    }

    private bool TryExecute(Launch launch)
    {
        var clique = launch.Comm.Clique;
        if (clique.Broken.Contains(launch.Index)) return false;
        var launches = new Launch[clique.Size];
        for (int r = 0; r < clique.Size; r++)
        {
            if (clique.Issued[r].Count <= launch.Index) return false;
            var l = clique.Issued[r][launch.Index];
            if (l.State != LaunchState.Queued || !AtHead(l) || !FirstPendingOfDevice(l)) return false;
            launches[r] = l;
        }
        Execute(launches, clique.Size);
        foreach (var l in launches) l.State = LaunchState.Done;
        return true;
    }

    private void Execute(Launch[] launches, int n)
    {
        // Every buffer must still be alive and every send buffer unchanged since its call.
        bool ok = true;
        foreach (var l in launches)
            foreach (var b in l.Uses)
                if (!_buffers.Contains(b) || !b.Alive)
                {
                    Violation($"{l.Describe()} on {l.Comm.Name} ran after one of its buffers was released or freed (a buffer must outlive the collective).");
                    ok = false;
                }
        if (!ok) return;
        foreach (var l in launches)
            for (int i = 0; i < l.Ops.Count; i++)
                if (l.Ops[i].Kind != Kind.Recv && Hash(l.Ops[i].Send, SendBytes(l.Ops[i], n)) != l.SendHashes[i])
                    Violation($"{l.Ops[i].Describe()} on {l.Comm.Name}: its send buffer changed between the call and the collective's execution (the caller modified its input before Wait()).");
        int ops = launches[0].Ops.Count(o => o.Kind is not (Kind.Send or Kind.Recv));
        for (int k = 0; k < ops; k++)
        {
            var col = launches.Select(l => l.Ops.Where(o => o.Kind is not (Kind.Send or Kind.Recv)).ElementAt(k)).ToArray();
            ExecuteCollective(col, n);
        }
        // Point-to-point: the j-th send of a to b feeds the j-th receive of b from a.
        var copies = new List<(nint To, byte[] Data)>();
        for (int b = 0; b < n; b++)
            foreach (var recv in launches[b].Ops.Where(o => o.Kind == Kind.Recv).GroupBy(o => o.Peer))
            {
                var sends = launches[recv.Key].Ops.Where(o => o.Kind == Kind.Send && o.Peer == b).ToList();
                foreach (var (r, s) in recv.Zip(sends))
                    copies.Add((r.Recv, Bytes(s.Send, s.Count * Nccl.ElementSize(s.Type))));
            }
        foreach (var (to, data) in copies) Write(to, data);
    }

    private static void ExecuteCollective(Op[] ops, int n)
    {
        var o = ops[0];
        long size = Nccl.ElementSize(o.Type);
        switch (o.Kind)
        {
            case Kind.AllGather:
            {
                var parts = ops.Select(x => Bytes(x.Send, x.Count * size)).ToArray();
                var all = parts.SelectMany(p => p).ToArray();
                foreach (var x in ops) Write(x.Recv, all);
                break;
            }
            case Kind.Broadcast:
            {
                var data = Bytes(ops[o.Root].Send, o.Count * size);
                foreach (var x in ops) Write(x.Recv, data);
                break;
            }
            case Kind.AllReduce:
            {
                var sum = Reduce(ops.Select(x => Bytes(x.Send, x.Count * size)).ToArray(), o.Type, o.RedOp);
                foreach (var x in ops) Write(x.Recv, sum);
                break;
            }
            case Kind.ReduceScatter:
            {
                var inputs = ops.Select(x => Bytes(x.Send, x.Count * size * n)).ToArray();
                for (int r = 0; r < n; r++)
                {
                    var blocks = inputs.Select(bytes => bytes.AsSpan((int)(r * o.Count * size), (int)(o.Count * size)).ToArray()).ToArray();
                    Write(ops[r].Recv, Reduce(blocks, o.Type, o.RedOp));
                }
                break;
            }
        }
    }

    // Sum (the only reduction the library uses) in reverse rank order, 16-bit types rounded after every addition:
    // not the in-process backend's order, so that nothing can depend on it.
    private static byte[] Reduce(byte[][] parts, NcclDataType type, NcclRedOp op)
    {
        if (op != NcclRedOp.Sum) throw new NotSupportedException($"The stand-in implements ncclSum only, not {op}.");
        parts = parts.Reverse().ToArray();
        var result = new byte[parts[0].Length];
        switch (type)
        {
            case NcclDataType.Float64: Sum<double>(parts, result); break;
            case NcclDataType.Float32: Sum<float>(parts, result); break;
            case NcclDataType.BFloat16 or NcclDataType.Float16:
            {
                bool bf16 = type == NcclDataType.BFloat16;
                float Value(ushort bits) => bf16 ? BitConverter.UInt32BitsToSingle((uint)bits << 16) : (float)BitConverter.UInt16BitsToHalf(bits);
                ushort Round(float f) => bf16 ? ToBFloat16(f) : BitConverter.HalfToUInt16Bits((Half)f);
                var outv = MemoryMarshal.Cast<byte, ushort>(result.AsSpan());
                MemoryMarshal.Cast<byte, ushort>(parts[0]).CopyTo(outv);
                foreach (var p in parts.Skip(1))
                {
                    var v = MemoryMarshal.Cast<byte, ushort>(p);
                    for (int i = 0; i < outv.Length; i++) outv[i] = Round(Value(outv[i]) + Value(v[i]));
                }
                break;
            }
            case NcclDataType.Int64: Sum<long>(parts, result); break;
            case NcclDataType.Int32: Sum<int>(parts, result); break;
            default:
                throw new NotSupportedException($"The stand-in does not reduce {type}.");
        }
        return result;
    }

    // result = Σ parts, element type T, added in the order of parts.
    private static void Sum<T>(byte[][] parts, byte[] result) where T : unmanaged, System.Numerics.INumber<T>
    {
        var acc = new T[result.Length / System.Runtime.CompilerServices.Unsafe.SizeOf<T>()];
        foreach (var p in parts)
        {
            var v = MemoryMarshal.Cast<byte, T>(p);
            for (int i = 0; i < acc.Length; i++) acc[i] += v[i];
        }
        MemoryMarshal.Cast<T, byte>(acc).CopyTo(result);
    }

    private static ushort ToBFloat16(float f)
    {
        uint bits = BitConverter.SingleToUInt32Bits(f);
        if (float.IsNaN(f)) return 0x7FC0;
        bits += 0x7FFFu + ((bits >> 16) & 1u);   // round to nearest even
        return (ushort)(bits >> 16);
    }

    private static byte[] Bytes(nint p, long count) => count == 0 ? Array.Empty<byte>() : new ReadOnlySpan<byte>((void*)p, checked((int)count)).ToArray();

    private static void Write(nint p, byte[] data)
    {
        if (data.Length > 0) data.CopyTo(new Span<byte>((void*)p, data.Length));
    }

    private static ulong Hash(nint p, long bytes)
    {
        ulong h = 14695981039346656037UL;
        var span = bytes == 0 ? ReadOnlySpan<byte>.Empty : new ReadOnlySpan<byte>((void*)p, checked((int)bytes));
        foreach (byte b in span) h = (h ^ b) * 1099511628211UL;
        return h;
    }

    // ---------------------------------------------------------------- ICommDevice

    public int DeviceCount { get; }

    public Device TorchDevice(int ordinal) => torch.CPU;

    public void MakeCurrent(int ordinal)
    {
        if (ordinal < 0 || ordinal >= DeviceCount) throw new InvalidOperationException($"Stand-in: device {ordinal} does not exist ({DeviceCount} devices).");
        _currentDevice.Value = ordinal;
    }

    public nint CurrentStream(int ordinal)
    {
        var mine = _computeStreams.Value!;
        if (mine.TryGetValue(ordinal, out var s)) return s;
        lock (_lock)
        {
            var stream = new Stream(NewHandle(), ordinal, compute: true);
            _streams[stream.Handle] = stream;
            return mine[ordinal] = stream.Handle;
        }
    }

    public nint CreateCommStream(int ordinal, bool highPriority)
    {
        lock (_lock)
        {
            var stream = new Stream(NewHandle(), ordinal, compute: false);
            _streams[stream.Handle] = stream;
            return stream.Handle;
        }
    }

    public void ReleaseCommStream(int ordinal, nint stream)
    {
        lock (_lock)
        {
            if (!_streams.TryGetValue(stream, out var s) || s.IsCompute || s.Released || s.Device != ordinal)
                Violation($"A communication stream (0x{stream:x}) was given back that is not a live one of device {ordinal}.");
            else s.Released = true;
        }
    }

    public IDisposable KeepCurrentDevice() => new KeptDevice(this, _currentDevice.Value);

    private sealed class KeptDevice(NcclStandIn owner, int device) : IDisposable
    {
        public void Dispose() => owner._currentDevice.Value = device;
    }

    public IDeviceEvent CreateEvent(int ordinal) => new Event(this, ordinal);

    public nint DataPointer(Tensor buffer)
    {
        if (buffer.device.type != DeviceType.CPU) throw new ArgumentException($"Stand-in buffers are CPU tensors; found one on {buffer.device}.");
        nint p = TensorPointers.DataPointer(buffer);
        lock (_lock)
        {
            if (!_buffers.Any(b => b.Tensor.TryGetTarget(out var t) && ReferenceEquals(t, buffer)))
                _buffers.Add(new Registered(p, buffer.numel() * buffer.element_size(), buffer, DeviceOfThread()));
        }
        return p;
    }

    // The newest live registration that holds [p, p + bytes).
    private Registered? Find(nint p, long bytes) => _buffers.LastOrDefault(b => b.Contains(p, bytes) && b.Alive);

    // Buffers belong to the device of the thread that registers them: the rank's thread, bound with MakeCurrent.
    private int DeviceOfThread() => _currentDevice.Value;

    public void Release(Tensor buffer)
    {
        lock (_lock)
        {
            int i = _buffers.FindIndex(b => b.Tensor.TryGetTarget(out var t) && ReferenceEquals(t, buffer));
            if (i >= 0)
            {
                var b = _buffers[i];
                Progress();
                var users = _cliques.Values.SelectMany(c => c.Issued.SelectMany(x => x)).Where(l => l.Pending && l.Uses.Contains(b)).ToList();
                if (users.Count > 0)
                    Violation($"A buffer was released while {string.Join(", ", users.Select(l => $"{l.Describe()} on {l.Comm.Name}"))} still used it.");
                foreach (var send in b.Sends.Where(x => Hash(x.Pointer, x.Bytes) != x.Hash))
                    Violation($"The send buffer of {send.Launch} was modified before the communicator gave it back (on a GPU, a race with the collective reading it).");
                _buffers.RemoveAt(i);
            }
        }
        buffer.Dispose();
    }

    private static long RecvBytes(Op o, int n) => o.Kind switch
    {
        Kind.AllGather => o.Count * Nccl.ElementSize(o.Type) * n,
        Kind.Send => 0,
        _ => o.Count * Nccl.ElementSize(o.Type),
    };

    public long[] ReadToHost(Tensor values)
    {
        lock (_lock) _hostReads[DeviceOfThread()] = _hostReads.GetValueOrDefault(DeviceOfThread()) + 1;
        return values.data<long>().ToArray();
    }

    private void CheckEvent(Event e, Stream s, string what)
    {
        if (_broken.Contains(e.Device)) throw new InvalidOperationException($"Stand-in: {what} on device {e.Device} failed (injected CUDA error).");
        if (s.Device != e.Device) Violation($"{what}: an event of device {e.Device} used with a stream of device {s.Device}.");
        if (s.Released) Violation($"{what} on a communication stream that was already given back.");
    }

    private void RecordEvent(Event e, nint stream)
    {
        lock (_lock)
        {
            if (!_streams.TryGetValue(stream, out var s)) throw new InvalidOperationException($"Stand-in: unknown stream 0x{stream:x}.");
            CheckEvent(e, s, "cuEventRecord");
            if (_group.Value!.Calls.Any(c => c.Op.Stream == stream))
                Violation("An event was recorded on a stream while the thread's NCCL group still held calls for it (ncclGroupEnd not called): the event does not cover them.");
            var issuing = _comms.Values.SelectMany(c => c.Issuing).Where(l => l.Stream == stream).ToList();
            if (issuing.Count > 0)
                Violation($"An event was recorded on a stream while {string.Join(", ", issuing.Select(l => $"{l.Describe()} on {l.Comm.Name}"))} was still being issued (ncclInProgress, not polled to ncclSuccess): the event does not cover it.");
            long g = ++e.Recorded;
            e.RecordedOn = stream;
            if (s.Idle) e.Completed = g;
            else s.Items.Add(new RecordItem(e, g));
            Progress();
        }
    }

    private void WaitEvent(Event e, nint stream)
    {
        lock (_lock)
        {
            if (!_streams.TryGetValue(stream, out var s)) throw new InvalidOperationException($"Stand-in: unknown stream 0x{stream:x}.");
            CheckEvent(e, s, "cuStreamWaitEvent");
            if (_streams.TryGetValue(e.RecordedOn, out var from) && from.IsCompute && !s.IsCompute) s.WaitedOnCompute = true;
            Progress();
            if (e.Completed >= e.Recorded) return;
            if (s.IsCompute)
            {
                // On a GPU the host goes on and the compute stream waits. On the CPU compute is synchronous, so the
                // thread itself waits here until the event passes (the peers' launches, or an abort, end it): the next
                // tensor operation must not read the data before it arrives. This is not the code's host
                // synchronization, and is not counted as one.
                long target = e.Recorded;
                var until = DateTime.UtcNow + ComputeWaitLimit;
                while (e.Completed < target && DateTime.UtcNow < until)
                {
                    Monitor.Wait(_lock, 2);
                    if (_broken.Contains(e.Device)) throw new InvalidOperationException($"Stand-in: cuStreamWaitEvent on device {e.Device} failed (injected CUDA error).");
                    Progress();
                }
                if (e.Completed < target)
                    Violation($"The compute stream of device {e.Device} waited {ComputeWaitLimit.TotalSeconds:0} s for an event that never passed: nothing aborted the collective it follows.");
                return;
            }
            s.Items.Add(new WaitItem(e, e.Recorded));
        }
    }

    private bool Query(Event e)
    {
        lock (_lock)
        {
            if (_broken.Contains(e.Device)) throw new InvalidOperationException($"Stand-in: cuEventQuery on device {e.Device} failed (injected CUDA error).");
            // A query from a thread that issues collectives is that thread asking the device how far it is: a host
            // synchronization when repeated until true. A watchdog's queries, from a thread that issues nothing, are not.
            int thread = Environment.CurrentManagedThreadId;
            if (_comms.Values.Any(c => c.OwnerThread == thread)) _hostPolls[e.Device] = _hostPolls.GetValueOrDefault(e.Device) + 1;
            Progress();
            return e.Completed >= e.Recorded;
        }
    }
}
