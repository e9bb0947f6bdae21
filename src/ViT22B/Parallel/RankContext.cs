using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>What one rank needs: its place in the mesh, its device and the communicators of its two axes.</summary>
/// <remarks>Disposing it disposes its communicators that are disposable (both of the library's are, and refuse use
/// afterwards); a <see cref="ShardedVisionTransformer"/> built on it owns it and disposes it with itself. A class, not a
/// record: a copy made with <c>with</c> would share the communicators and dispose them twice.</remarks>
public sealed class RankContext : IDisposable
{
    /// <summary>Creates a rank's context.</summary>
    /// <param name="mesh">The mesh.</param>
    /// <param name="rank">World rank.</param>
    /// <param name="model">Communicator of this rank's tensor-parallel group (rank = model index).</param>
    /// <param name="data">Communicator of this rank's data-parallel group (rank = data index).</param>
    public RankContext(DeviceMesh mesh, int rank, ICommunicator model, ICommunicator data)
    {
        ArgumentNullException.ThrowIfNull(mesh);
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        (Mesh, Rank, Model, Data) = (mesh, rank, model, data);
    }

    /// <summary>The mesh.</summary>
    public DeviceMesh Mesh { get; }

    /// <summary>World rank.</summary>
    public int Rank { get; }

    /// <summary>Communicator of this rank's tensor-parallel group (rank = model index).</summary>
    public ICommunicator Model { get; }

    /// <summary>Communicator of this rank's data-parallel group (rank = data index).</summary>
    public ICommunicator Data { get; }

    /// <summary>Disposes the communicators that are disposable (each once).</summary>
    public void Dispose()
    {
        try
        {
            (Model as IDisposable)?.Dispose();
        }
        finally
        {
            if (!ReferenceEquals(Data, Model)) (Data as IDisposable)?.Dispose();
        }
    }

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
        return GpuTransport.Current.BindThread(Device);
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
        a.index == b.index || (a.index < 0 || b.index < 0) && GpuTransport.Current.Ordinal(a) == GpuTransport.Current.Ordinal(b);

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
