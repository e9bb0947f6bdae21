using System.Runtime.CompilerServices;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Cuda;

/// <summary>
/// <see cref="IGpuTransport"/> on CUDA: the driver for devices and events, libtorch's stream pool, and
/// <see cref="InProcessTransfer"/>'s copy protocol. Registered with <see cref="GpuTransport"/> when the library loads;
/// registering touches no native library.
/// </summary>
internal sealed class CudaGpuTransport : IGpuTransport
{
#pragma warning disable CA2255 // A module initializer in a library: registering this implementation is what keeps Parallel free of any reference to Cuda, and it does nothing but store an object.
    [ModuleInitializer]
    internal static void Register() => GpuTransport.Register(new CudaGpuTransport());
#pragma warning restore CA2255

    public int Ordinal(Device device) => CudaDriver.Ordinal(device);

    public IDisposable BindThread(Device device)
    {
        int index = CudaDriver.Ordinal(device);
        CudaDriver.MakeCurrent(index);
        return new StreamScope(CudaStreams.FromPool(index), index);
    }

    public nint NewCommStream(int device) => CudaStreams.FromPool(device);

    public ITransferEvent MarkReady(Tensor copy) => InProcessTransfer.MarkReady(copy);

    public (Tensor Result, ITransferEvent Done) Receive(int device, nint commStream, IEnumerable<ITransferEvent?> ready, Func<Tensor> build) =>
        InProcessTransfer.Receive(device, commStream, ready.Cast<CudaEvent?>(), build);
}
