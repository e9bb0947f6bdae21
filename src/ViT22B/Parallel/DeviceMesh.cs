using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// A 2-D logical mesh of ranks, <c>data × model</c>, each rank bound to a device. Rank numbering is
/// <c>rank = dataIndex · ModelSize + modelIndex</c> (model axis fastest, so a tensor-parallel group is a run of
/// consecutive ranks, as in Megatron). Several ranks may share one device (all ranks on the CPU, or on one GPU):
/// that is how sharding plans are tested and tried on a single machine.
/// </summary>
public sealed class DeviceMesh
{
    private readonly Device[] _devices;

    /// <summary>Creates a mesh. <paramref name="devices"/>: one device per rank, or a single device for all ranks
    /// (default: the CPU).</summary>
    public DeviceMesh(int data, int model, IReadOnlyList<Device>? devices = null)
    {
        if (data < 1 || model < 1) throw new ArgumentException($"Mesh axes must be at least 1, found data = {data}, model = {model}.");
        (DataSize, ModelSize) = (data, model);
        devices ??= new[] { torch.CPU };
        if (devices.Count != 1 && devices.Count != WorldSize)
            throw new ArgumentException($"A {data}×{model} mesh has {WorldSize} ranks; give one device per rank or one device for all, found {devices.Count}.", nameof(devices));
        _devices = Enumerable.Range(0, WorldSize).Select(r => devices[devices.Count == 1 ? 0 : r]).ToArray();
    }

    /// <summary>Size of the data-parallel axis.</summary>
    public int DataSize { get; }

    /// <summary>Size of the tensor-parallel (model) axis.</summary>
    public int ModelSize { get; }

    /// <summary>Number of ranks.</summary>
    public int WorldSize => DataSize * ModelSize;

    /// <summary>The device of a rank.</summary>
    public Device DeviceOf(int rank) => _devices[CheckRank(rank)];

    /// <summary>The (data, model) coordinates of a rank.</summary>
    public (int Data, int Model) Coordinates(int rank) => (CheckRank(rank) / ModelSize, rank % ModelSize);

    /// <summary>The rank at given coordinates.</summary>
    public int RankAt(int data, int model)
    {
        if (data < 0 || data >= DataSize || model < 0 || model >= ModelSize)
            throw new ArgumentOutOfRangeException($"({data}, {model}) is outside the {DataSize}×{ModelSize} mesh.");
        return data * ModelSize + model;
    }

    /// <summary>The ranks of the tensor-parallel group with data index <paramref name="data"/>, in model order.</summary>
    public int[] ModelGroup(int data) => Enumerable.Range(0, ModelSize).Select(m => RankAt(data, m)).ToArray();

    /// <summary>The ranks of the data-parallel group with model index <paramref name="model"/>, in data order.</summary>
    public int[] DataGroup(int model) => Enumerable.Range(0, DataSize).Select(d => RankAt(d, model)).ToArray();

    /// <inheritdoc />
    public override string ToString() => $"DeviceMesh(data={DataSize}, model={ModelSize})";

    private int CheckRank(int rank) => rank >= 0 && rank < WorldSize ? rank
        : throw new ArgumentOutOfRangeException(nameof(rank), $"Rank {rank} is outside the {DataSize}×{ModelSize} mesh ({WorldSize} ranks).");
}

/// <summary>What one rank needs: its place in the mesh, its device and the communicators of its two axes.</summary>
/// <param name="Mesh">The mesh.</param>
/// <param name="Rank">World rank.</param>
/// <param name="Model">Communicator of this rank's tensor-parallel group (rank = model index).</param>
/// <param name="Data">Communicator of this rank's data-parallel group (rank = data index).</param>
public sealed record RankContext(DeviceMesh Mesh, int Rank, ICommunicator Model, ICommunicator Data)
{
    /// <summary>The rank's device.</summary>
    public Device Device => Mesh.DeviceOf(Rank);

    /// <summary>
    /// Binds the calling thread to the rank's device until disposed: on a CUDA device, makes a stream from
    /// libtorch's pool the current stream for TorchSharp ops on this thread, so ranks that share a GPU compute on
    /// separate streams (and the in-process communicator's copies overlap them); on the CPU, does nothing. Call it
    /// first in the rank's body and dispose it on the same thread.
    /// </summary>
    public IDisposable UseDevice()
    {
        if (Device.type != DeviceType.CUDA) return NoScope.Instance;
        int index = ViT22B.Cuda.CudaDriver.Ordinal(Device);
        ViT22B.Cuda.CudaDriver.MakeCurrent(index);
        return new ViT22B.Cuda.StreamScope(ViT22B.Cuda.CudaStreams.FromPool(index), index);
    }

    /// <summary>
    /// True when this rank shares its CUDA device with another rank of an in-process world. Such ranks can run
    /// forward passes (under <c>torch.no_grad()</c>) but not backward: libtorch's autograd engine runs every backward
    /// step of one GPU on one worker thread, so one rank's backward collective would wait forever for a peer whose
    /// backward is queued behind it on that thread.
    /// </summary>
    public bool SharesGpuInProcess =>
        Device.type == DeviceType.CUDA && (Model is ThreadedCommunicator || Data is ThreadedCommunicator)
        && Enumerable.Range(0, Mesh.WorldSize).Any(r => r != Rank && Mesh.DeviceOf(r).type == DeviceType.CUDA && SameGpu(Mesh.DeviceOf(r), Device));

    // Equal indices (two unindexed "cuda" devices are both libtorch's current device); only a mix of an unindexed and an
    // indexed device needs libtorch to say which GPU "cuda" is.
    private static bool SameGpu(Device a, Device b) =>
        a.index == b.index || (a.index < 0 || b.index < 0) && ViT22B.Cuda.CudaDriver.Ordinal(a) == ViT22B.Cuda.CudaDriver.Ordinal(b);

    private sealed class NoScope : IDisposable
    {
        public static readonly NoScope Instance = new();
        public void Dispose() { }
    }

    /// <summary>Creates the contexts of every rank of <paramref name="mesh"/> on an in-process world.</summary>
    /// <exception cref="ArgumentException">The mesh has more ranks than the world (or fewer).</exception>
    public static RankContext[] CreateThreaded(ThreadedWorld world, DeviceMesh mesh)
    {
        ArgumentNullException.ThrowIfNull(world);
        ArgumentNullException.ThrowIfNull(mesh);
        if (mesh.WorldSize != world.Size)
            throw new ArgumentException($"The {mesh.DataSize}×{mesh.ModelSize} mesh needs {mesh.WorldSize} ranks but the world has {world.Size}.", nameof(mesh));
        var model = new ICommunicator[mesh.WorldSize];
        var data = new ICommunicator[mesh.WorldSize];
        for (int d = 0; d < mesh.DataSize; d++)
        {
            var ranks = mesh.ModelGroup(d);
            var comms = world.CreateGroup($"model[data={d}]", ranks);
            for (int i = 0; i < ranks.Length; i++) model[ranks[i]] = comms[i];
        }
        for (int m = 0; m < mesh.ModelSize; m++)
        {
            var ranks = mesh.DataGroup(m);
            var comms = world.CreateGroup($"data[model={m}]", ranks);
            for (int i = 0; i < ranks.Length; i++) data[ranks[i]] = comms[i];
        }
        return Enumerable.Range(0, mesh.WorldSize).Select(r => new RankContext(mesh, r, model[r], data[r])).ToArray();
    }
}
