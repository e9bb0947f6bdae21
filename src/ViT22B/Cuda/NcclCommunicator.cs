using TorchSharp;
using ViT22B.Interop;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Cuda;

/// <summary>
/// <see cref="ICommunicator"/> on NCCL, one rank per GPU. Every operation runs on a non-blocking communication
/// stream from libtorch's pool: the stream first waits on an event recorded on the rank's current (compute) stream,
/// so the inputs are ready; the collective is enqueued; an event recorded after it orders the result back onto the
/// compute stream in <see cref="ICommWork.Wait"/>, which also polls <c>ncclCommGetAsyncError</c> until the
/// collective has finished or the timeout passes, and aborts the communicator on either failure, so a dead peer
/// surfaces as <see cref="CommunicatorException"/> rather than a hang. Input, output and staging tensors stay
/// referenced by the operation until its event has passed (libtorch has no <c>record_stream</c> here).
/// Uneven dimension-0 chunks are padded to the largest (their sizes are exchanged first, a small extra collective
/// and a host synchronization). Unlike <see cref="ThreadedCommunicator"/>, shapes and dtypes are not compared across
/// ranks: a mismatch is undefined behaviour in NCCL and shows up as a timeout or wrong values.
/// Use each instance from one thread only. Written from nccl.h, the NCCL user guide and TORCHSHARP.md §10; not yet
/// run on a GPU.
/// </summary>
public sealed class NcclCommunicator : ICommunicator, IDisposable
{
    private readonly NcclComm _comm;
    private readonly nint _stream;

    private NcclCommunicator(NcclComm comm, int device, string name, TimeSpan timeout)
    {
        (_comm, Device, Name, Timeout) = (comm, device, name, timeout);
        _stream = CudaStreams.FromPool(device);
    }

    /// <summary>One communicator per listed local device, in one process (<c>ncclCommInitAll</c>); drive each from its
    /// own thread.</summary>
    public static NcclCommunicator[] CreateLocal(IReadOnlyList<int> devices, TimeSpan timeout, string name = "nccl")
    {
        ArgumentNullException.ThrowIfNull(devices);
        var comms = NcclComm.InitAll(devices);
        return comms.Select((c, i) => new NcclCommunicator(c, devices[i], $"{name}[{i}]", timeout)).ToArray();
    }

    /// <summary>
    /// This process's communicator in a multi-process run (one process per GPU, on one or several machines): the
    /// device is <c>LOCAL_RANK</c>; rank 0 creates the NCCL id and hands it over with <see cref="Rendezvous"/> at
    /// <c>MASTER_ADDR:MASTER_PORT</c>; then <c>ncclCommInitRank</c>.
    /// </summary>
    public static NcclCommunicator FromEnvironment(LaunchEnvironment env, TimeSpan timeout, string name = "nccl")
    {
        ArgumentNullException.ThrowIfNull(env);
        CudaDriver.MakeCurrent(env.LocalRank);
        byte[]? id = env.Rank == 0 ? Nccl.GetUniqueId().ToArray() : null;
        var received = Rendezvous.Broadcast(env, id, timeout);
        CudaDriver.MakeCurrent(env.LocalRank);
        var comm = NcclComm.InitRank(NcclUniqueId.FromBytes(received), env.Rank, env.WorldSize);
        return new NcclCommunicator(comm, env.LocalRank, $"{name}[{env.Rank}]", timeout);
    }

    /// <summary>
    /// This process's <see cref="RankContext"/> on a <paramref name="data"/> × <paramref name="model"/> mesh of
    /// processes (one per GPU; <c>WORLD_SIZE</c> = data · model, rank numbering as <see cref="DeviceMesh"/>): rank 0
    /// creates one NCCL id per group (the model groups, then the data groups) and hands them all over in one
    /// <see cref="Rendezvous"/>; every rank then initializes its model group and then its data group, in that order on
    /// every rank, so the blocking initializations cannot wait on each other. The mesh's device is this process's
    /// GPU (<c>cuda:LOCAL_RANK</c>); other ranks' devices are not known here.
    /// </summary>
    public static RankContext CreateRankContext(LaunchEnvironment env, int data, int model, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(env);
        var mesh = new DeviceMesh(data, model, new[] { new Device(DeviceType.CUDA, env.LocalRank) });
        if (env.WorldSize != mesh.WorldSize)
            throw new ArgumentException($"A {data}×{model} mesh needs {mesh.WorldSize} processes but WORLD_SIZE is {env.WorldSize}.");
        CudaDriver.MakeCurrent(env.LocalRank);
        byte[]? ids = null;
        if (env.Rank == 0)
            ids = Enumerable.Range(0, data + model).SelectMany(_ => Nccl.GetUniqueId().ToArray()).ToArray();
        var received = Rendezvous.Broadcast(env, ids, timeout);
        var (modelId, dataId) = GroupIds(received, mesh, env.Rank);
        var (d, m) = mesh.Coordinates(env.Rank);
        CudaDriver.MakeCurrent(env.LocalRank);
        var modelComm = NcclComm.InitRank(NcclUniqueId.FromBytes(modelId), m, model);
        NcclComm dataComm;
        try
        {
            dataComm = NcclComm.InitRank(NcclUniqueId.FromBytes(dataId), d, data);
        }
        catch
        {
            modelComm.Dispose();
            throw;
        }
        return new RankContext(mesh, env.Rank,
            new NcclCommunicator(modelComm, env.LocalRank, $"model[data={d}]", timeout),
            new NcclCommunicator(dataComm, env.LocalRank, $"data[model={m}]", timeout));
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

    /// <summary>The CUDA device of this rank.</summary>
    public int Device { get; }
    /// <summary>How long <see cref="ICommWork.Wait"/> waits before aborting.</summary>
    public TimeSpan Timeout { get; }
    /// <inheritdoc />
    public int Rank => _comm.Rank;
    /// <inheritdoc />
    public int Size => _comm.Size;
    /// <inheritdoc />
    public string Name { get; }

    /// <inheritdoc />
    public ICommWork AllGatherAsync(Tensor local)
    {
        var rows = ExchangeRows(local.shape[0]);
        long max = rows.Max();
        var input = Own(local, max);
        var gathered = Rows.Empty(Size * max, local);
        return Enqueue("AllGather", input, gathered, () => _comm.AllGather(input, gathered, _stream),
            g => rows.All(r => r == max) ? g.alias() : torch.cat(rows.Select((r, i) => g.narrow(0, i * max, r)).ToArray(), 0));
    }

    /// <inheritdoc />
    public ICommWork ReduceScatterAsync(Tensor full, IReadOnlyList<long> counts)
    {
        ArgumentNullException.ThrowIfNull(counts);
        if (counts.Count != Size || counts.Sum() != full.shape[0])
            throw new ArgumentException($"{Name}: ReduceScatter counts [{string.Join(", ", counts)}] must have {Size} entries summing to dimension 0 = {full.shape[0]}.");
        long max = counts.Max(), mine = counts[Rank];
        Tensor input;
        using (var scope = NewDisposeScope())
        {
            long offset = 0;
            var parts = counts.Select(c => { var p = full.narrow(0, offset, c); offset += c; return p; }).ToArray();
            // Each rank's chunk padded to the largest, so NCCL sees equal blocks (a copy even when already equal:
            // the caller may reuse its tensor as soon as this returns).
            input = counts.All(c => c == max) ? full.detach().clone() : torch.cat(parts.Select(p => Padded(p, max)).ToArray(), 0);
            input = input.MoveToOuterDisposeScope();
        }
        var output = Rows.Empty(max, full);
        return Enqueue("ReduceScatter", input, output, () => _comm.ReduceScatter(input, output, NcclRedOp.Sum, _stream),
            o => mine == max ? o.alias() : o.narrow(0, 0, mine));
    }

    /// <inheritdoc />
    public ICommWork AllReduceAsync(Tensor tensor)
    {
        var input = Own(tensor, tensor.shape.Length == 0 ? 0 : tensor.shape[0]);
        var output = torch.empty_like(input);
        return Enqueue("AllReduce", input, output, () => _comm.AllReduce(input, output, NcclRedOp.Sum, _stream), o => o.alias());
    }

    /// <inheritdoc />
    public ICommWork BroadcastAsync(Tensor tensor, int root)
    {
        var input = Own(tensor, tensor.shape.Length == 0 ? 0 : tensor.shape[0]);
        var output = torch.empty_like(input);
        return Enqueue("Broadcast", input, output, () => _comm.Broadcast(input, output, root, _stream), o => o.alias());
    }

    /// <inheritdoc />
    public ICommWork PermuteAsync(Tensor send, int shift, long receiveRows = -1)
    {
        if (receiveRows < -1) throw new ArgumentOutOfRangeException(nameof(receiveRows), $"{Name}: receiveRows must be −1 (unknown) or a row count, found {receiveRows}.");
        int next = ((Rank + shift) % Size + Size) % Size, previous = ((Rank - shift) % Size + Size) % Size;
        long rows = receiveRows;
        if (rows < 0)
        {
            // The receiver learns the row count first (the sender's dimension 0 may differ from its own): a small
            // send/receive and a host synchronization, which the ring loops avoid by passing the count.
            var mineRows = torch.tensor(new[] { send.shape[0] }, device: Dev);
            var theirRows = torch.empty(1, dtype: ScalarType.Int64, device: Dev);
            using var r = Enqueue("Permute(rows)", mineRows, theirRows, () => _comm.SendRecv(mineRows, next, theirRows, previous, _stream), t => t.alias()).Wait();
            rows = r.cpu().item<long>();
        }
        var input = Own(send, send.shape[0]);
        var output = Rows.Empty(rows, send);
        return Enqueue("Permute", input, output, () => _comm.SendRecv(input, next, output, previous, _stream), o => o.alias());
    }

    /// <inheritdoc />
    public void Barrier()
    {
        using var one = torch.ones(1, device: Dev);
        AllReduceAsync(one).Wait().Dispose();
    }

    /// <summary>Aborts (if a collective failed) or destroys the NCCL communicator.</summary>
    public void Dispose() => _comm.Dispose();

    private Device Dev => torch.device($"cuda:{Device}");

    private long[] ExchangeRows(long rows)
    {
        var mine = torch.tensor(new[] { rows }, device: Dev);
        var all = torch.empty(Size, dtype: ScalarType.Int64, device: Dev);
        using var gathered = Enqueue("AllGather(rows)", mine, all, () => _comm.AllGather(mine, all, _stream), a => a.alias()).Wait();
        return gathered.cpu().data<long>().ToArray();
    }

    // A private copy of the caller's tensor (the contract lets the caller reuse it at once), padded along dimension 0.
    private static Tensor Own(Tensor x, long rows)
    {
        using var scope = NewDisposeScope();
        var own = x.shape.Length > 0 && x.shape[0] != rows ? Padded(x, rows) : x.detach().clone();
        return own.MoveToOuterDisposeScope();
    }

    private static Tensor Padded(Tensor x, long rows)
    {
        var padded = Rows.Zeros(rows, x);
        padded.narrow(0, 0, x.shape[0]).copy_(x);
        return padded;
    }


    // Orders the collective between the compute stream and the communication stream with events. The work item owns
    // the input and output buffers (detached from the caller's dispose scope) until the collective's event has
    // passed; Wait() returns a new tensor, in the caller's current dispose scope, made by finish from the output.
    private ICommWork Enqueue(string op, Tensor input, Tensor output, Action collective, Func<Tensor, Tensor> finish)
    {
        input.DetachFromDisposeScope();
        output.DetachFromDisposeScope();
        CudaEvent? ready = null, done = null;
        try
        {
            CudaDriver.MakeCurrent(Device);
            nint compute = CudaStreams.Current(Device);
            ready = new CudaEvent(Device);
            done = new CudaEvent(Device);
            ready.Record(compute);
            ready.Wait(_stream);
            collective();
            done.Record(_stream);
        }
        catch (Exception e)
        {
            ready?.Dispose();
            done?.Dispose();
            input.Dispose();
            output.Dispose();
            throw new CommunicatorException($"{Name}, rank {Rank}: {op} could not be enqueued: {e.Message}", e);
        }
        return new Work(() =>
        {
            try
            {
                var deadline = DateTime.UtcNow + Timeout;
                while (!done.IsComplete)
                {
                    var error = _comm.AsyncError();
                    if (error is not (NcclResult.Success or NcclResult.InProgress))
                    {
                        _comm.Abort();
                        throw new CommunicatorException($"{Name}, rank {Rank}: {op} failed: NCCL reported {error}; the communicator was aborted.");
                    }
                    if (DateTime.UtcNow > deadline)
                    {
                        _comm.Abort();
                        throw new CommunicatorException($"{Name}, rank {Rank}: {op} did not finish within {Timeout.TotalSeconds:F0} s (a peer is missing or its call does not match); the communicator was aborted.");
                    }
                    Thread.Yield();
                }
                done.Wait(CudaStreams.Current(Device));
                return finish(output);
            }
            finally
            {
                ready.Dispose();
                done.Dispose();
                input.Dispose();
                output.Dispose();
            }
        });
    }

    private sealed class Work(Func<Tensor> wait) : ICommWork
    {
        private bool _done;

        public Tensor Wait()
        {
            if (_done) throw new InvalidOperationException("Wait() was already called on this operation.");
            _done = true;
            return wait();
        }
    }
}
