using System.Diagnostics;

namespace ViT22B.Interop;

/// <summary>A device buffer as NCCL sees it: address, element count, element type.</summary>
internal readonly record struct NcclBuffer(nint Pointer, nuint Count, NcclDataType Type);

/// <summary>
/// One NCCL communicator (<c>ncclComm_t</c>), created non-blocking (<c>blocking = 0</c>), and the raw calls on it, on
/// buffers the caller has already resolved to addresses. The thin layer under <see cref="Cuda.NcclCommunicator"/>:
/// <list type="bullet">
/// <item>Initialization and every call may return <c>ncclInProgress</c>; the state is then polled with
/// <c>ncclCommGetAsyncError</c> until it is <c>ncclSuccess</c> (the work is on the stream) or the deadline passes,
/// so a peer that never arrives becomes an exception instead of a thread blocked inside NCCL.</item>
/// <item>Every failed call aborts the communicator: ranks issue collectives in lockstep, and a rank whose call failed
/// (even with <c>ncclInvalidArgument</c>, which NCCL treats as "no effect") can no longer match its peers'
/// sequence, so continuing would pair the wrong calls.</item>
/// <item>A group is always closed: <c>ncclGroupEnd</c> runs in a <c>finally</c>, and nothing that can throw happens
/// between <c>ncclGroupStart</c> and it. NCCL's group depth is per thread; a group left open would make every later
/// NCCL call on the thread queue without launching.</item>
/// </list>
/// Use one communicator from one thread (NCCL's rule), except that <see cref="AsyncError"/>, <see cref="LastError"/>
/// and <see cref="Abort"/> may come from a watchdog thread, as NCCL allows; a lock keeps them from overlapping a call
/// in progress (an abort frees the communicator). Calls go through <see cref="INcclApi"/>: libnccl, or the
/// tests' stand-in.
/// </summary>
internal sealed unsafe class NcclComm : IDisposable
{
    private readonly INcclApi _api;
    private readonly Lock _gate = new();     // a call in progress and an abort from the watchdog never overlap
    private nint _comm;

    private NcclComm(INcclApi api, nint comm, int rank, int size) => (_api, _comm, Rank, Size) = (api, comm, rank, size);

    /// <summary>This rank.</summary>
    public int Rank { get; }
    /// <summary>Ranks in the communicator.</summary>
    public int Size { get; }
    /// <summary>Whether the communicator was aborted after a failure.</summary>
    public bool IsAborted { get => _aborted; private set => _aborted = value; }

    private volatile bool _aborted;

    /// <summary>
    /// <c>ncclCommInitRankConfig</c> (non-blocking): one rank of a communicator of <paramref name="size"/> ranks; every
    /// rank passes the same <paramref name="id"/>. The calling thread must have the rank's device current. Returns once
    /// every rank has joined; a rank missing at <paramref name="deadline"/> aborts this rank's communicator and throws.
    /// </summary>
    public static NcclComm InitRank(INcclApi api, NcclUniqueId id, int rank, int size, DateTime deadline, Func<string, string?>? variable = null)
    {
        ArgumentNullException.ThrowIfNull(api);
        if (size < 1 || rank < 0 || rank >= size) throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is outside [0, {size}).");
        RefuseBlockingOverride(variable);
        var config = NcclConfig.NonBlocking();
        nint handle = 0;
        var result = api.CommInitRankConfig(&handle, size, id, rank, &config);
        if (result is not (NcclResult.Success or NcclResult.InProgress))
        {
            string last = handle != 0 ? api.LastError(handle) : "";
            if (handle != 0) api.CommAbort(handle);
            Nccl.Check(api, result, "ncclCommInitRankConfig", last);
        }
        var comm = new NcclComm(api, handle, rank, size);
        comm.WaitUntilIssued("ncclCommInitRankConfig (waiting for every rank to join)", deadline);
        return comm;
    }

    /// <summary>One communicator per listed device, all in this process: <c>ncclGetUniqueId</c>, then one
    /// <c>ncclCommInitRankConfig</c> per device inside one group (a single thread initializing several devices must
    /// group them), with <paramref name="makeCurrent"/> selecting each device first. Drive each from its own thread.</summary>
    public static NcclComm[] InitLocal(INcclApi api, IReadOnlyList<int> devices, Action<int> makeCurrent, DateTime deadline, Func<string, string?>? variable = null)
    {
        ArgumentNullException.ThrowIfNull(api);
        ArgumentNullException.ThrowIfNull(devices);
        ArgumentNullException.ThrowIfNull(makeCurrent);
        if (devices.Count == 0) throw new ArgumentException("At least one device is needed.", nameof(devices));
        RefuseBlockingOverride(variable);
        var id = Nccl.GetUniqueId(api);
        int n = devices.Count;
        var comms = new NcclComm[n];
        try
        {
            var results = Enumerable.Repeat(NcclResult.InvalidUsage, n).ToArray();
            var config = NcclConfig.NonBlocking();
            Nccl.Check(api, api.GroupStart(), "ncclGroupStart");
            NcclResult end;
            try
            {
                for (int i = 0; i < n; i++)
                {
                    makeCurrent(devices[i]);
                    nint h = 0;
                    results[i] = api.CommInitRankConfig(&h, n, id, i, &config);
                    comms[i] = new NcclComm(api, h, i, n);
                    if (results[i] is not (NcclResult.Success or NcclResult.InProgress)) break;
                }
            }
            finally
            {
                end = api.GroupEnd();
            }
            for (int i = 0; i < n; i++)
                if (results[i] is not (NcclResult.Success or NcclResult.InProgress)) comms[i].Fail("ncclCommInitRankConfig", results[i]);
            if (end is not (NcclResult.Success or NcclResult.InProgress)) comms[0].Fail("ncclGroupEnd", end);
            foreach (var c in comms) c.WaitUntilIssued("ncclCommInitRankConfig (local group)", deadline);
            return comms;
        }
        catch
        {
            // Whatever was created (its initialization waits for ranks that will not come) is aborted.
            foreach (var c in comms) c?.Abort();
            throw;
        }
    }

    /// <summary>NCCL lets <c>NCCL_COMM_BLOCKING=1</c> override the configuration, which would make every NCCL call
    /// wait for its peers without a deadline: refused, with the reason.</summary>
    private static void RefuseBlockingOverride(Func<string, string?>? variable)
    {
        if ((variable ?? Environment.GetEnvironmentVariable)("NCCL_COMM_BLOCKING") is { Length: > 0 } v && v.Trim() != "0")
            throw new InvalidOperationException(
                $"NCCL_COMM_BLOCKING={v} is set: it would make NCCL's calls block without a deadline, so a missing peer would hang the process instead of failing. Unset it (the library polls non-blocking communicators against its own timeouts).");
    }

    /// <summary>The communicator's state: <c>ncclSuccess</c>, <c>ncclInProgress</c> while a non-blocking call is still
    /// being carried out, or the asynchronous error (network failures, a dead peer).</summary>
    public NcclResult AsyncError()
    {
        lock (_gate)
        {
            NcclResult state;
            var r = _api.CommGetAsyncError(Handle, &state);
            if (r != NcclResult.Success) Fail("ncclCommGetAsyncError", r);
            return state;
        }
    }

    /// <summary>NCCL's text for this communicator's last failure (may be empty).</summary>
    public string LastError()
    {
        lock (_gate) return _comm == 0 || IsAborted ? "" : _api.LastError(_comm);
    }

    /// <summary>All-reduce (in place allowed).</summary>
    public void AllReduce(NcclBuffer send, NcclBuffer recv, NcclRedOp op, nint stream, DateTime deadline)
    {
        lock (_gate) Issue("ncclAllReduce", _api.AllReduce(send.Pointer, recv.Pointer, send.Count, send.Type, op, Handle, stream), deadline);
    }

    /// <summary>Reduce-scatter: <paramref name="send"/> holds Size equal blocks of <paramref name="recv"/>'s count.</summary>
    public void ReduceScatter(NcclBuffer send, NcclBuffer recv, NcclRedOp op, nint stream, DateTime deadline)
    {
        lock (_gate) Issue("ncclReduceScatter", _api.ReduceScatter(send.Pointer, recv.Pointer, recv.Count, send.Type, op, Handle, stream), deadline);
    }

    /// <summary>All-gather: <paramref name="recv"/> holds Size blocks of <paramref name="send"/>'s count, in rank order.</summary>
    public void AllGather(NcclBuffer send, NcclBuffer recv, nint stream, DateTime deadline)
    {
        lock (_gate) Issue("ncclAllGather", _api.AllGather(send.Pointer, recv.Pointer, send.Count, send.Type, Handle, stream), deadline);
    }

    /// <summary>Broadcast from <paramref name="root"/>.</summary>
    public void Broadcast(NcclBuffer send, NcclBuffer recv, int root, nint stream, DateTime deadline)
    {
        if ((uint)root >= (uint)Size) throw new ArgumentOutOfRangeException(nameof(root), $"root {root} is outside [0, {Size}).");
        lock (_gate) Issue("ncclBroadcast", _api.Broadcast(send.Pointer, recv.Pointer, send.Count, send.Type, root, Handle, stream), deadline);
    }

    /// <summary>One ring step: send to <paramref name="next"/> and receive from <paramref name="previous"/> in one NCCL
    /// group (separately they would deadlock). Both counts are known here; NCCL needs the receive count to equal the
    /// peer's send count. Inside the group, a non-blocking communicator may answer <c>ncclInProgress</c> (NCCL returns
    /// the communicator's state from every call); that is provisional, and <c>ncclGroupEnd</c> decides.</summary>
    public void SendRecv(NcclBuffer send, int next, NcclBuffer recv, int previous, nint stream, DateTime deadline)
    {
        if ((uint)next >= (uint)Size || (uint)previous >= (uint)Size)
            throw new ArgumentOutOfRangeException(nameof(next), $"peers {next} and {previous} must be in [0, {Size}).");
        lock (_gate)
        {
            nint h = Handle;
            var start = _api.GroupStart();
            if (start != NcclResult.Success) Fail("ncclGroupStart", start);
            NcclResult sent = NcclResult.InvalidUsage, received = NcclResult.Success, end;
            try
            {
                sent = _api.Send(send.Pointer, send.Count, send.Type, next, h, stream);
                if (Accepted(sent)) received = _api.Recv(recv.Pointer, recv.Count, recv.Type, previous, h, stream);
            }
            finally
            {
                end = _api.GroupEnd();   // a group's errors surface here
            }
            if (!Accepted(sent)) Fail("ncclSend", sent);
            if (!Accepted(received)) Fail("ncclRecv", received);
            Issue("ncclGroupEnd", end, deadline);
        }

        static bool Accepted(NcclResult r) => r is NcclResult.Success or NcclResult.InProgress;
    }

    /// <summary><c>ncclCommAbort</c>: stops this rank's pending operations and frees the communicator. Peers are not
    /// told; their pending calls with this rank fail at their own deadline. Safe from another thread (a watchdog):
    /// it waits for a call in progress on this communicator to return first.</summary>
    public void Abort()
    {
        lock (_gate)
        {
            if (_comm == 0 || IsAborted) return;
            IsAborted = true;
            _api.CommAbort(_comm);
        }
    }

    /// <summary>Destroys the communicator (an aborted one is already released).</summary>
    public void Dispose()
    {
        // No ncclCommFinalize first: when it was not called, ncclCommDestroy finalizes the communicator itself
        // (commReclaim in NCCL's src/init.cc), which is what a separate call would do before destroying.
        lock (_gate)
        {
            if (_comm == 0) return;
            if (!IsAborted) _api.CommDestroy(_comm);
            _comm = 0;
        }
    }

    private nint Handle
    {
        get
        {
            ObjectDisposedException.ThrowIf(_comm == 0, this);
            if (IsAborted) throw new InvalidOperationException("The NCCL communicator was aborted after an error; create a new one.");
            return _comm;
        }
    }

    // A call's result: issued (success), being issued in the background (in progress: poll until it is on the stream),
    // or failed (abort, throw).
    private void Issue(string operation, NcclResult result, DateTime deadline)
    {
        if (result == NcclResult.Success) return;
        if (result == NcclResult.InProgress) WaitUntilIssued(operation, deadline);
        else Fail(operation, result);
    }

    private void WaitUntilIssued(string operation, DateTime deadline)
    {
        var watch = Stopwatch.StartNew();
        var spin = new SpinWait();
        while (true)
        {
            var state = AsyncError();
            if (state == NcclResult.Success) return;
            if (state != NcclResult.InProgress) Fail(operation, state);
            if (DateTime.UtcNow > deadline)
            {
                Abort();
                throw new NcclException(operation, NcclResult.InProgress,
                    $"still in progress after {watch.Elapsed.TotalSeconds:F1} s (a peer did not arrive); the communicator was aborted");
            }
            Pause(ref spin, watch.Elapsed);
        }
    }

    /// <summary>Spins briefly, then yields, then sleeps a millisecond at a time: a short wait costs no latency, a long
    /// one no CPU.</summary>
    internal static void Pause(ref SpinWait spin, TimeSpan waited)
    {
        if (waited < TimeSpan.FromMilliseconds(20)) spin.SpinOnce(sleep1Threshold: -1);
        else Thread.Sleep(1);
    }

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void Fail(string operation, NcclResult result)
    {
        string last = _comm != 0 && !IsAborted ? _api.LastError(_comm) : "";
        Abort();
        Nccl.Check(_api, result, operation, last.Length > 0 ? $"{last} (the communicator was aborted)" : "the communicator was aborted");
        throw new UnreachableException();
    }
}
