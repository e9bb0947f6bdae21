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
