using System.Diagnostics;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Cuda;

/// <summary>
/// <see cref="ICommunicator"/> on NCCL, one rank per GPU (or, with NCCL ≥ 2.30 and
/// <c>NCCL_MULTI_RANK_GPU_ENABLE=1</c>, up to two processes sharing one). How one collective runs:
/// <list type="number">
/// <item>The caller's tensor is used in place when it is contiguous (a new handle on its storage: disposing the
/// caller's handle frees nothing the collective still reads); only non-contiguous inputs and uneven chunks, which
/// NCCL's all-gather and reduce-scatter pad to the largest, are copied. So the caller must not modify an input in
/// place before <see cref="ICommWork.Wait"/> returns.</item>
/// <item>A ready event recorded on the calling thread's current (compute) stream is waited on by a non-blocking
/// communication stream; the collective is issued there (polling until NCCL has put it on the stream, for a
/// non-blocking communicator); a done event is recorded after it. Sizes the caller passes (the token partition) are
/// used as they are; only a size nobody passed is exchanged first, which costs a collective and a host
/// synchronization.</item>
/// <item><see cref="ICommWork.Wait"/> makes the compute stream wait for the done event and returns the result: the
/// host does not wait, so it keeps queuing work (in the ring loops, the next steps' matmuls and permutes) while the
/// collective runs. The buffers go back to the allocator at once: they were allocated on the stream current when the
/// collective was issued, that stream is the one made to wait (and the caller's current stream too, if another), and
/// anything that reuses them from that stream's pool is queued behind the wait. Work disposed without being waited for
/// is waited for the same way.</item>
/// <item>A watchdog (a timer thread) watches the collectives in flight: when one has not finished within
/// <see cref="Timeout"/> of its issue, or <c>ncclCommGetAsyncError</c> reports an error, it aborts the communicator.
/// NCCL then ends the collectives (a compute stream waiting for them resumes, their results meaningless) and every
/// later call throws, so the failure surfaces at the next call on this communicator, or at
/// <see cref="Synchronize"/>, which blocks the host until everything issued has finished (<see cref="Barrier"/> uses
/// it, and the sharded model calls it at the end of each forward, backward and gradient synchronization, so a failure
/// is reported by the step it happened in). Disposal waits the same way, aborting what does not finish, and throws
/// nothing. After a failure whose event never passes, the buffers are kept rather than freed while NCCL might still
/// use them.</item>
/// </list>
/// Any failure once a collective has been issued — an error code (even "invalid argument"), an asynchronous error, a
/// timeout, any exception — aborts the communicator and surfaces as <see cref="CommunicatorException"/>: the ranks
/// issue collectives in lockstep, and a rank that missed one would pair its later calls with the wrong ones of its
/// peers. Unlike <see cref="ThreadedCommunicator"/>, shapes are not compared across ranks; a mismatch shows up as a
/// timeout (or, in the NCCL stand-in of the tests, an error naming both sides). Issue collectives from one thread
/// (only the watchdog reads the communicator's state or aborts it from another).
/// </summary>
public sealed class NcclCommunicator : ICommunicator, IDisposable
{
    private static readonly List<Work> KeptForever = new();   // buffers a failed collective might still use
    private readonly NcclComm _comm;
    private readonly ICommDevice _dev;
    private readonly nint _stream;
    private readonly Lock _lock = new();                        // guards the lists and _failure
    private readonly object _observing = new();                 // one observer of the in-flight events at a time
    private readonly List<Work> _outstanding = new();           // issued, not yet waited for or disposed
    private readonly List<Work> _inFlight = new();              // issued, not yet seen finished on the device
    private readonly Timer _watchdog;
    private CommunicatorException? _failure;

    internal NcclCommunicator(NcclComm comm, ICommDevice dev, int device, string name, TimeSpan timeout, bool highPriorityStream)
    {
        if (timeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(timeout), "The timeout must be positive.");
        (_comm, _dev, Device, Name, Timeout) = (comm, dev, device, name, timeout);
        _stream = dev.CreateCommStream(device, highPriorityStream);
        var period = TimeSpan.FromMilliseconds(Math.Clamp(timeout.TotalMilliseconds / 20, 1, 50));
        _watchdog = new Timer(_ => Watch(), null, period, period);
    }

    /// <summary>The variable NCCL 2.30 reads to allow two ranks on one GPU.</summary>
    public const string MultiRankGpuVariable = "NCCL_MULTI_RANK_GPU_ENABLE";

    /// <summary>One communicator per listed local device, in one process (one NCCL group of non-blocking
    /// initializations); drive each from its own thread.</summary>
    /// <param name="devices">CUDA ordinals, one per rank (distinct: NCCL refuses two ranks of one process on a GPU).</param>
    /// <param name="timeout">How long initialization and each collective may take.</param>
    /// <param name="name">Prefix of the communicators' names.</param>
    /// <param name="highPriorityStream">Put the communication on a high-priority stream (as TransformerEngine does;
    /// not yet measured here).</param>
    public static NcclCommunicator[] CreateLocal(IReadOnlyList<int> devices, TimeSpan timeout, string name = "nccl", bool highPriorityStream = false) =>
        CreateLocal(Nccl.Native, CudaCommDevice.Instance, devices, timeout, name, highPriorityStream);

    internal static NcclCommunicator[] CreateLocal(INcclApi api, ICommDevice dev, IReadOnlyList<int> devices, TimeSpan timeout, string name, bool highPriorityStream)
    {
        ArgumentNullException.ThrowIfNull(devices);
        if (devices.Distinct().Count() != devices.Count)
            throw new ArgumentException($"Devices [{string.Join(", ", devices)}] repeat a GPU: one process runs one rank per GPU (several ranks on one GPU need one process each).", nameof(devices));
        NcclComm[] comms;
        using (dev.KeepCurrentDevice()) comms = NcclComm.InitLocal(api, devices, dev.MakeCurrent, DateTime.UtcNow + timeout);
        var result = new NcclCommunicator[comms.Length];
        try
        {
            for (int i = 0; i < comms.Length; i++)
                result[i] = new NcclCommunicator(comms[i], dev, devices[i], $"{name}[{i}]", timeout, highPriorityStream);
            return result;
        }
        catch
        {
            for (int i = 0; i < comms.Length; i++)
            {
                if (result[i] is { } made) made.Dispose();
                else DisposeAborted(comms[i]);
            }
            throw;
        }
    }

    // A communicator that will not be used: aborted (its peers, if any, fail at their timeout) and released.
    private static void DisposeAborted(NcclComm comm)
    {
        comm.Abort();
        comm.Dispose();
    }

    private static NcclCommunicator Wrap(NcclComm comm, ICommDevice dev, int device, string name, TimeSpan timeout, bool highPriorityStream)
    {
        try
        {
            return new NcclCommunicator(comm, dev, device, name, timeout, highPriorityStream);
        }
        catch
        {
            DisposeAborted(comm);
            throw;
        }
    }

    /// <summary>
    /// This process's communicator in a multi-process run (one process per GPU, on one or several machines): the GPU is
    /// <c>LOCAL_RANK</c> modulo the GPUs visible; rank 0 creates the NCCL id and hands it over with
    /// <see cref="Rendezvous"/> at <c>MASTER_ADDR:MASTER_PORT</c>; then every rank initializes, each within
    /// <paramref name="timeout"/>.
    /// </summary>
    public static NcclCommunicator FromEnvironment(LaunchEnvironment env, TimeSpan timeout, string name = "nccl", bool highPriorityStream = false)
    {
        ArgumentNullException.ThrowIfNull(env);
        var (api, dev) = (Nccl.Native, CudaCommDevice.Instance);
        int gpu = GpuOf(env, dev.DeviceCount, Nccl.Version(api), Environment.GetEnvironmentVariable);
        dev.MakeCurrent(gpu);
        byte[]? id = env.Rank == 0 ? Nccl.GetUniqueId(api).ToArray() : null;
        var received = Rendezvous.Broadcast(env, id, timeout);
        dev.MakeCurrent(gpu);
        var comm = NcclComm.InitRank(api, NcclUniqueId.FromBytes(received), env.Rank, env.WorldSize, DateTime.UtcNow + timeout);
        return Wrap(comm, dev, gpu, $"{name}[{env.Rank}]", timeout, highPriorityStream);
    }

    /// <summary>
    /// This process's <see cref="RankContext"/> on a <paramref name="data"/> × <paramref name="model"/> mesh of
    /// processes (one per GPU; <c>WORLD_SIZE</c> = data · model, rank numbering as <see cref="DeviceMesh"/>): rank 0
    /// creates one NCCL id per group (the model groups, then the data groups) and hands them all over in one
    /// <see cref="Rendezvous"/>; every rank then initializes its model group and then its data group, each within
    /// <paramref name="timeout"/>. The mesh's device is this process's GPU (<c>LOCAL_RANK</c> modulo the GPUs
    /// visible); other ranks' devices are not known here.
    /// </summary>
    public static RankContext CreateRankContext(LaunchEnvironment env, int data, int model, TimeSpan timeout, bool highPriorityStream = false)
    {
        ArgumentNullException.ThrowIfNull(env);
        var (api, dev) = (Nccl.Native, CudaCommDevice.Instance);
        int gpu = GpuOf(env, dev.DeviceCount, Nccl.Version(api), Environment.GetEnvironmentVariable);
        var mesh = new DeviceMesh(data, model, new[] { dev.TorchDevice(gpu) });
        if (env.WorldSize != mesh.WorldSize)
            throw new ArgumentException($"A {data}×{model} mesh needs {mesh.WorldSize} processes but WORLD_SIZE is {env.WorldSize}.");
        dev.MakeCurrent(gpu);
        byte[]? ids = env.Rank == 0 ? NewGroupIds(api, mesh) : null;
        var received = Rendezvous.Broadcast(env, ids, timeout);
        return InitRankContext(api, dev, mesh, env.Rank, gpu, received, timeout, highPriorityStream);
    }

    /// <summary>One NCCL id per group of <paramref name="mesh"/>: the model groups (by data index), then the data
    /// groups (by model index), concatenated (what rank 0 hands to every rank).</summary>
    internal static byte[] NewGroupIds(INcclApi api, DeviceMesh mesh) =>
        Enumerable.Range(0, mesh.DataSize + mesh.ModelSize).SelectMany(_ => Nccl.GetUniqueId(api).ToArray()).ToArray();

    /// <summary>Rank <paramref name="rank"/>'s context from the ids rank 0 handed out: its model communicator, then its
    /// data communicator (the same order on every rank, so no initialization waits on one that comes later).</summary>
    internal static RankContext InitRankContext(INcclApi api, ICommDevice dev, DeviceMesh mesh, int rank, int device, byte[] payload, TimeSpan timeout, bool highPriorityStream = false)
    {
        var (modelId, dataId) = GroupIds(payload, mesh, rank);
        var (d, m) = mesh.Coordinates(rank);
        dev.MakeCurrent(device);
        var model = Wrap(NcclComm.InitRank(api, NcclUniqueId.FromBytes(modelId), m, mesh.ModelSize, DateTime.UtcNow + timeout),
            dev, device, $"model[data={d}]", timeout, highPriorityStream);
        try
        {
            var dataComm = NcclComm.InitRank(api, NcclUniqueId.FromBytes(dataId), d, mesh.DataSize, DateTime.UtcNow + timeout);
            return new RankContext(mesh, rank, model, Wrap(dataComm, dev, device, $"data[model={m}]", timeout, highPriorityStream));
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>The ids of <paramref name="rank"/>'s model and data groups in the payload rank 0 sends: one id per
    /// model group (indexed by the data coordinate), then one per data group (indexed by the model coordinate).</summary>
    internal static (byte[] Model, byte[] Data) GroupIds(byte[] payload, DeviceMesh mesh, int rank)
    {
        int size = NcclUniqueId.Bytes, groups = mesh.DataSize + mesh.ModelSize;
        if (payload.Length != groups * size)
            throw new RendezvousException($"Rank 0 sent {payload.Length} bytes of NCCL ids; a {mesh.DataSize}×{mesh.ModelSize} mesh needs {groups} × {size} = {groups * size} (do all ranks pass the same --data and --model?).");
        var (d, m) = mesh.Coordinates(rank);
        return (payload.AsSpan(d * size, size).ToArray(), payload.AsSpan((mesh.DataSize + m) * size, size).ToArray());
    }

    /// <summary>
    /// The GPU of a process: <c>LOCAL_RANK</c> modulo the GPUs it sees. When the machine's processes
    /// (<c>LOCAL_WORLD_SIZE</c>) outnumber its GPUs, several share one, which NCCL allows only from 2.30 on, with
    /// <c>NCCL_MULTI_RANK_GPU_ENABLE=1</c>, and for at most two ranks per GPU; anything else is refused here with the
    /// reason instead of failing inside NCCL's initialization.
    /// </summary>
    internal static int GpuOf(LaunchEnvironment env, int gpus, int ncclVersion, Func<string, string?> variable)
    {
        if (gpus < 1) throw new ArgumentException("This process sees no CUDA device.");
        int gpu = env.LocalRank % gpus;
        int local = env.LocalWorldSize ?? 1;
        if (local > gpus)
        {
            int perGpu = (local + gpus - 1) / gpus;
            string? why = ncclVersion < 23000 ? $"NCCL {FormatVersion(ncclVersion)} refuses that (from 2.30 on, {MultiRankGpuVariable}=1 allows up to 2 ranks per GPU)"
                : variable(MultiRankGpuVariable) != "1" ? $"NCCL {FormatVersion(ncclVersion)} allows it only with {MultiRankGpuVariable}=1, which is not set"
                : perGpu > 2 ? $"NCCL allows at most 2 ranks per GPU, this would put {perGpu} on one"
                : null;
            if (why is not null)
                throw new ArgumentException($"{local} processes on this machine share {gpus} GPU(s): {why}. Start at most {gpus} process(es) per machine, or run the ranks as threads (--device cuda).");
        }
        return gpu;
    }

    private static string FormatVersion(int v) => v >= 10000 ? $"{v / 10000}.{v / 100 % 100}.{v % 100}" : $"{v / 1000}.{v / 100 % 10}.{v % 100}";

    /// <summary>The CUDA device of this rank.</summary>
    public int Device { get; }
    /// <summary>How long a collective may run, from its issue, before the watchdog aborts the communicator.</summary>
    public TimeSpan Timeout { get; }
    /// <inheritdoc />
    public int Rank => _comm.Rank;
    /// <inheritdoc />
    public int Size => _comm.Size;
    /// <inheritdoc />
    public string Name { get; }
    /// <summary>Whether the communicator was aborted after a failure (every later call fails).</summary>
    public bool IsAborted => _comm.IsAborted;

    /// <summary>Collectives issued and not yet waited for or disposed.</summary>
    internal int Outstanding { get { lock (_lock) return _outstanding.Count; } }

    /// <inheritdoc />
    public ICommWork AllGatherAsync(Tensor local, IReadOnlyList<long>? counts = null)
    {
        ArgumentNullException.ThrowIfNull(local);
        var type = Nccl.DataType(local.dtype);
        long[] rows;
        if (counts is null) rows = ExchangeRows(local.shape[0]);
        else
        {
            if (counts.Count != Size || counts.Any(c => c < 0) || counts[Rank] != local.shape[0])
                throw new ArgumentException($"{Name}: AllGather counts [{string.Join(", ", counts)}] must have {Size} non-negative entries, this rank's being its {local.shape[0]} rows.", nameof(counts));
            rows = counts.ToArray();
        }
        long max = rows.Max();
        bool even = rows.All(r => r == max);
        var input = even ? Share(local) : Padded(local, max);
        var gathered = EmptyRows(Size * max, local);
        return Enqueue("AllGather", input, gathered,
            (s, deadline) => _comm.AllGather(Buf(input, type), Buf(gathered, type), s, deadline),
            g => even ? g.alias() : Unpadded(g, rows, max));
    }

    // The gathered blocks of max rows each, cut to each rank's rows and joined. The narrowed views live in a dispose scope:
    // referenced only by the array handed to cat, they could be finalized while cat reads them.
    private static Tensor Unpadded(Tensor gathered, long[] rows, long max)
    {
        using var scope = NewDisposeScope();
        return torch.cat(rows.Select((r, i) => gathered.narrow(0, i * max, r)).ToArray(), 0).MoveToOuterDisposeScope();
    }

    /// <inheritdoc />
    public ICommWork ReduceScatterAsync(Tensor full, IReadOnlyList<long> counts)
    {
        ArgumentNullException.ThrowIfNull(full);
        ArgumentNullException.ThrowIfNull(counts);
        var type = Nccl.DataType(full.dtype);
        if (counts.Count != Size || counts.Any(c => c < 0) || counts.Sum() != full.shape[0])
            throw new ArgumentException($"{Name}: ReduceScatter counts [{string.Join(", ", counts)}] must have {Size} non-negative entries summing to dimension 0 = {full.shape[0]}.");
        long max = counts.Max(), mine = counts[Rank];
        Tensor input;
        if (counts.All(c => c == max)) input = Share(full);
        else
        {
            // Each rank's chunk padded to the largest, so NCCL sees equal blocks.
            using var scope = NewDisposeScope();
            long offset = 0;
            var parts = counts.Select(c => { var p = full.detach().narrow(0, offset, c); offset += c; return Padded(p, max); }).ToArray();
            input = torch.cat(parts, 0).MoveToOuterDisposeScope();
        }
        var output = EmptyRows(max, full);
        return Enqueue("ReduceScatter", input, output,
            (s, deadline) => _comm.ReduceScatter(Buf(input, type), Buf(output, type), NcclRedOp.Sum, s, deadline),
            o => mine == max ? o.alias() : o.narrow(0, 0, mine));
    }

    /// <inheritdoc />
    public ICommWork AllReduceAsync(Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        var type = Nccl.DataType(tensor.dtype);
        var input = Share(tensor);
        var output = torch.empty(input.shape, dtype: input.dtype, device: input.device);
        return Enqueue("AllReduce", input, output,
            (s, deadline) => _comm.AllReduce(Buf(input, type), Buf(output, type), NcclRedOp.Sum, s, deadline), o => o.alias());
    }

    /// <inheritdoc />
    public ICommWork BroadcastAsync(Tensor tensor, int root)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        if ((uint)root >= (uint)Size) throw new ArgumentOutOfRangeException(nameof(root), $"{Name}: root {root} is outside [0, {Size}).");
        var type = Nccl.DataType(tensor.dtype);
        var input = Share(tensor);
        var output = torch.empty(input.shape, dtype: input.dtype, device: input.device);
        return Enqueue("Broadcast", input, output,
            (s, deadline) => _comm.Broadcast(Buf(input, type), Buf(output, type), root, s, deadline), o => o.alias());
    }

    /// <inheritdoc />
    public ICommWork PermuteAsync(Tensor send, int shift, long receiveRows = -1)
    {
        ArgumentNullException.ThrowIfNull(send);
        if (receiveRows < -1) throw new ArgumentOutOfRangeException(nameof(receiveRows), $"{Name}: receiveRows must be −1 (unknown) or a row count, found {receiveRows}.");
        var type = Nccl.DataType(send.dtype);
        int next = ((Rank + shift) % Size + Size) % Size, previous = ((Rank - shift) % Size + Size) % Size;
        long rows = receiveRows >= 0 ? receiveRows : ExchangePermutedRows(send.shape[0], next, previous);
        var input = Share(send);
        var output = EmptyRows(rows, send);
        return Enqueue("Permute", input, output,
            (s, deadline) => _comm.SendRecv(Buf(input, type), next, Buf(output, type), previous, s, deadline), o => o.alias());
    }

    /// <inheritdoc />
    public void Barrier()
    {
        using var one = torch.ones(1, device: _dev.TorchDevice(Device));
        AllReduceAsync(one).Wait().Dispose();
        Synchronize();
    }

    /// <inheritdoc />
    /// <remarks>A host synchronization (the sharded model calls it once at the end of a forward, a backward and a
    /// gradient synchronization; <see cref="Barrier"/> uses it; a ring step never does): it polls the collectives'
    /// done events until all have passed, and throws if one failed or did not finish within <see cref="Timeout"/> of
    /// its issue.</remarks>
    public void Synchronize()
    {
        ThrowIfFailed("Synchronize");
        var watch = Stopwatch.StartNew();
        var spin = new SpinWait();
        while (true)
        {
            Observe();
            ThrowIfFailed("Synchronize");
            lock (_lock) if (_inFlight.Count == 0) return;
            NcclComm.Pause(ref spin, watch.Elapsed);
        }
    }

    /// <summary>Waits for (or, after a failure, abandons) what is still outstanding, then destroys the NCCL
    /// communicator (an aborted one is already released).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        try
        {
            // Open work first, while the watchdog still runs: abandoning makes the compute stream wait for it, and only
            // the watchdog would abort one that never finishes.
            Work[] open;
            lock (_lock) open = _outstanding.ToArray();
            foreach (var w in open) w.Dispose();
            using (var stopped = new ManualResetEvent(false))
                if (_watchdog.Dispose(stopped)) stopped.WaitOne();   // no tick runs after this
            // Destroying a communicator with collectives pending would block inside NCCL: wait for them (after an
            // abort NCCL stops them, so their events pass quickly), and abort instead if they do not finish in time.
            var limit = _comm.IsAborted ? TimeSpan.FromSeconds(5) : Timeout;
            var watch = Stopwatch.StartNew();
            var spin = new SpinWait();
            while (true)
            {
                Observe();
                lock (_lock) if (_inFlight.Count == 0) break;
                if (watch.Elapsed > limit)
                {
                    if (_comm.IsAborted) break;
                    Fail("collectives were still running when the communicator was disposed");
                    (limit, watch) = (TimeSpan.FromSeconds(5), Stopwatch.StartNew());   // aborted: their events pass soon
                }
                NcclComm.Pause(ref spin, watch.Elapsed);
            }
            lock (_lock)
            {
                // Work the device never finished keeps its buffers and events for the life of the process.
                foreach (var w in _inFlight) w.KeepForever();
                lock (KeptForever) KeptForever.AddRange(_inFlight);
                _inFlight.Clear();
            }
        }
        finally
        {
            _comm.Dispose();
            _dev.ReleaseCommStream(Device, _stream);   // a driver-created stream is destroyed once its queued work is done
        }
    }

    private bool _disposed;

    // The size exchanges: only for sizes the caller did not pass (each is an extra collective and a host read).
    private long[] ExchangeRows(long rows)
    {
        var dev = _dev.TorchDevice(Device);
        var mine = torch.tensor(new[] { rows }, device: dev);
        var all = torch.empty(Size, dtype: ScalarType.Int64, device: dev);
        using var gathered = Enqueue("AllGather(sizes)", mine, all,
            (s, deadline) => _comm.AllGather(Buf(mine, NcclDataType.Int64), Buf(all, NcclDataType.Int64), s, deadline), a => a.alias()).Wait();
        var exchanged = _dev.ReadToHost(gathered);
        ThrowIfFailed("AllGather(sizes)");          // aborted meanwhile: the values read are meaningless
        return exchanged;
    }

    private long ExchangePermutedRows(long rows, int next, int previous)
    {
        var dev = _dev.TorchDevice(Device);
        var mine = torch.tensor(new[] { rows }, device: dev);
        var theirs = torch.empty(1, dtype: ScalarType.Int64, device: dev);
        using var received = Enqueue("Permute(sizes)", mine, theirs,
            (s, deadline) => _comm.SendRecv(Buf(mine, NcclDataType.Int64), next, Buf(theirs, NcclDataType.Int64), previous, s, deadline), t => t.alias()).Wait();
        long exchanged = _dev.ReadToHost(received)[0];
        ThrowIfFailed("Permute(sizes)");
        return exchanged;
    }

    private NcclBuffer Buf(Tensor t, NcclDataType type) => new(_dev.DataPointer(t), (nuint)t.numel(), type);

    // The caller's tensor itself when contiguous (a new handle on its storage), else a contiguous copy.
    private static Tensor Share(Tensor x)
    {
        using var noGrad = torch.no_grad();
        var d = x.detach();
        if (d.is_contiguous()) return d;
        var c = d.contiguous();
        d.Dispose();
        return c;
    }

    private static Tensor Padded(Tensor x, long rows)
    {
        using var noGrad = torch.no_grad();
        var padded = ZeroRows(rows, x);
        using (var head = padded.narrow(0, 0, x.shape[0])) head.copy_(x);   // a local: kept alive through the native copy
        return padded;
    }

    private void ThrowIfFailed(string op)
    {
        CommunicatorException? failure;
        lock (_lock) failure = _failure;
        if (failure is not null || _comm.IsAborted)
            throw new CommunicatorException($"{Name}, rank {Rank}: {op}: the NCCL communicator was aborted after an earlier failure{(failure is null ? "" : $" ({failure.Message})")}.", failure);
    }

    // Orders the collective between the compute stream and the communication stream with events. The work item owns
    // the buffers (detached from the caller's dispose scope) until the compute stream has been made to wait for its
    // done event (or, if it never is, until the event has passed).
    private Work Enqueue(string op, Tensor input, Tensor output, Action<nint, DateTime> issue, Func<Tensor, Tensor> finish)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);    // the NCCL communicator is gone: nothing may reach it
        input.DetachFromDisposeScope();
        output.DetachFromDisposeScope();
        var w = new Work(this, op, input, output, finish);
        try
        {
            ThrowIfFailed(op);
            nint compute = _dev.CurrentStream(Device);
            w.Compute = compute;
            w.Ready = _dev.CreateEvent(Device);
            w.Done = _dev.CreateEvent(Device);
            w.Ready.Record(compute);
            w.Ready.Wait(_stream);
            w.Deadline = Stopwatch.GetTimestamp() + (long)(Timeout.TotalSeconds * Stopwatch.Frequency);
            w.Issued = true;
            issue(_stream, DateTime.UtcNow + Timeout);
            w.Done.Record(_stream);
            w.DoneRecorded = true;
        }
        catch (Exception e)
        {
            var failure = e as CommunicatorException ?? Fail($"{op} could not be issued: {e.Message}", e);
            if (w.Issued && !w.DoneRecorded && w.Done is not null)
            {
                // Mark the end of whatever reached the stream, so the buffers go only after it.
                try { w.Done.Record(_stream); w.DoneRecorded = true; }
                catch (Exception) { /* the buffers are then kept for good */ }
            }
            lock (_lock) if (w.DoneRecorded) _inFlight.Add(w);   // the watchdog frees its buffers once the event passes
            Settle(w, streamWaited: false);
            throw failure;
        }
        lock (_lock)
        {
            _outstanding.Add(w);
            _inFlight.Add(w);
        }
        return w;
    }

    // Wait(): the compute stream waits for the collective on the device; the host does not. A failure the watchdog
    // finds later (a timeout, an asynchronous NCCL error) aborts the communicator, which makes the collective end
    // (its data then meaningless) and every later call throw.
    private Tensor Complete(Work w)
    {
        bool waited = false;
        try
        {
            ThrowIfFailed(w.Op);
            // The stream the buffers came from waits (so they can go back to its pool), and the caller's current
            // stream, if another, too (it consumes the result).
            w.Done!.Wait(w.Compute);
            waited = true;
            nint current = _dev.CurrentStream(Device);
            if (current != w.Compute) w.Done.Wait(current);
            ThrowIfFailed(w.Op);
            return w.Finish(w.Output);
        }
        catch (CommunicatorException)
        {
            throw;
        }
        catch (Exception e)
        {
            throw Fail($"{w.Op} failed: {e.Message}", e);
        }
        finally
        {
            Settle(w, waited);
        }
    }

    // Work disposed without Wait() (a ring loop left by an exception): the compute stream still waits for it, so that
    // its buffers can go back to the compute stream's allocator; never throws, since the caller is usually unwinding
    // another exception. A failure aborts the communicator, so later calls report it.
    private void Abandon(Work w)
    {
        bool waited = false;
        try
        {
            if (w.DoneRecorded)
            {
                w.Done!.Wait(w.Compute);
                waited = true;
            }
        }
        catch (Exception e)
        {
            Fail($"{w.Op} failed while it was being abandoned: {e.Message}", e);
        }
        finally
        {
            Settle(w, waited);
        }
    }

    // The owner is done with the work: its buffers go if nothing on the device can still use them before the compute
    // stream's next work (never issued, or the compute stream waits for its done event); otherwise they stay with the
    // work until the watchdog sees the event pass (or for good).
    private void Settle(Work w, bool streamWaited)
    {
        lock (_lock)
        {
            _outstanding.Remove(w);
            w.OwnerDone = true;
            if (!w.Issued || streamWaited) w.ReleaseBuffers(_dev);
            if (!w.Issued || w.SeenFinished) w.ReleaseAll(_dev);
            if (w.Issued && !w.DoneRecorded) w.KeepForever();
        }
    }

    // The watchdog's tick (a timer thread): sees in-flight collectives finish, and aborts the communicator when one
    // passes its deadline or NCCL reports an asynchronous error. Aborting makes NCCL end the collectives, so a compute
    // stream waiting for them resumes and the next call on this communicator throws.
    private void Watch()
    {
        if (!Monitor.TryEnter(_observing)) return;
        try
        {
            ObserveLocked();
        }
        catch (Exception)
        {
            // ObserveLocked records failures itself; a timer callback must not throw.
        }
        finally
        {
            Monitor.Exit(_observing);
        }
    }

    private void Observe()
    {
        lock (_observing) ObserveLocked();
    }

    private void ObserveLocked()
    {
        Work[] pending;
        lock (_lock) pending = _inFlight.ToArray();
        if (pending.Length == 0) return;
        long now = Stopwatch.GetTimestamp();
        foreach (var w in pending)
        {
            bool finished;
            try
            {
                finished = w.DoneRecorded && w.Done!.IsComplete;
            }
            catch (Exception e)
            {
                lock (_lock) { _inFlight.Remove(w); w.KeepForever(); }
                Fail($"{w.Op} failed: {e.Message}", e);
                continue;
            }
            if (finished)
            {
                lock (_lock)
                {
                    _inFlight.Remove(w);
                    w.SeenFinished = true;
                    if (w.OwnerDone) w.ReleaseAll(_dev);
                }
            }
            else if (now > w.Deadline && !_comm.IsAborted)
            {
                Fail($"{w.Op} did not finish within {Timeout.TotalSeconds:0.###} s (a peer is missing, failed, or issued a different collective)");
            }
        }
        if (_comm.IsAborted) return;
        try
        {
            var state = _comm.AsyncError();
            if (state is not (NcclResult.Success or NcclResult.InProgress))
            {
                string last = _comm.LastError();
                Fail($"{pending[0].Op} failed: NCCL reported {state}{(last.Length > 0 ? $" ({last})" : "")}");
            }
        }
        catch (Exception e)
        {
            Fail($"{pending[0].Op} failed: {e.Message}", e);
        }
    }

    // The failure is recorded before the abort: the abort releases a thread waiting on the compute stream, which then
    // reports the recorded failure (recorded after, the thread could find the communicator aborted with no cause).
    private CommunicatorException Fail(string what, Exception? inner = null)
    {
        var e = new CommunicatorException($"{Name}, rank {Rank}: {what}; the NCCL communicator was aborted.", inner);
        lock (_lock) _failure ??= e;
        _comm.Abort();
        return e;
    }

    /// <inheritdoc />
    public void Abort(Exception reason)
    {
        ArgumentNullException.ThrowIfNull(reason);
        Fail($"a failure on this rank left the collective sequence: {reason.Message}", reason);
    }

    private sealed class Work(NcclCommunicator owner, string op, Tensor input, Tensor output, Func<Tensor, Tensor> finish) : ICommWork
    {
        private bool _finished, _buffersReleased, _eventsReleased;

        /// <summary>The device could not say whether the buffers are still in use: they are never released.</summary>
        public bool KeptForever { get; private set; }

        public string Op { get; } = op;
        public Tensor Output { get; } = output;
        public Func<Tensor, Tensor> Finish { get; } = finish;
        public IDeviceEvent? Ready { get; set; }
        public IDeviceEvent? Done { get; set; }
        public long Deadline { get; set; }            // Stopwatch timestamp
        public nint Compute { get; set; }             // the stream the buffers were allocated on
        public bool Issued { get; set; }
        public bool DoneRecorded { get; set; }
        public bool OwnerDone { get; set; }
        public bool SeenFinished { get; set; }

        public Tensor Wait()
        {
            if (_finished) throw new InvalidOperationException("Wait() was already called on this operation, or it was disposed.");
            _finished = true;
            return owner.Complete(this);
        }

        public void Dispose()
        {
            if (_finished) return;
            _finished = true;
            owner.Abandon(this);
        }

        public void KeepForever() => KeptForever = true;

        // Never throws: the buffers were no longer in use, so a failure to free them leaves nothing to protect.
        public void ReleaseBuffers(ICommDevice dev)
        {
            if (_buffersReleased || KeptForever) return;
            _buffersReleased = true;
            try
            {
                dev.Release(input);
                dev.Release(Output);
            }
            catch (Exception)
            {
            }
        }

        public void ReleaseAll(ICommDevice dev)
        {
            if (KeptForever) return;
            ReleaseBuffers(dev);
            if (_eventsReleased) return;
            _eventsReleased = true;
            try
            {
                Ready?.Dispose();
                Done?.Dispose();
            }
            catch (Exception)
            {
            }
        }
    }

    // New tensors like `like` but with `rows` rows (padded collective buffers).
    private static Tensor EmptyRows(long rows, Tensor like) => torch.empty(RowsShape(rows, like), dtype: like.dtype, device: like.device);

    private static Tensor ZeroRows(long rows, Tensor like) => torch.zeros(RowsShape(rows, like), dtype: like.dtype, device: like.device);

    private static long[] RowsShape(long rows, Tensor like) => new[] { rows }.Concat(like.shape.Skip(1)).ToArray();
}
