using TorchSharp;
using ViT22B.Interop;
using static TorchSharp.torch;

namespace ViT22B.Cuda;

/// <summary>The GPU behind <see cref="ICommDevice"/>: libtorch's streams, driver events and tensor pointers.</summary>
internal sealed class CudaCommDevice : ICommDevice
{
    public static readonly CudaCommDevice Instance = new();

    private CudaCommDevice() { }

    public Device TorchDevice(int ordinal) => new(DeviceType.CUDA, ordinal);

    public int DeviceCount => (int)torch.cuda.device_count();

    public void MakeCurrent(int ordinal) => CudaDriver.MakeCurrent(ordinal);

    public nint CurrentStream(int ordinal) => CudaStreams.Current(ordinal);

    public IDisposable KeepCurrentDevice() => new KeptContext(CudaDriver.CurrentContext());

    public nint CreateCommStream(int ordinal, bool highPriority) => CudaStreams.FromPool(ordinal, highPriority);

    public void ReleaseCommStream(int ordinal, nint stream) => CudaStreams.Release(stream);

    public IDeviceEvent CreateEvent(int ordinal) => new CudaEvent(ordinal);

    public nint DataPointer(Tensor buffer)
    {
        if (buffer.device.type != DeviceType.CUDA) throw new ArgumentException($"NCCL buffers must be CUDA tensors; found one on {buffer.device}.");
        return TensorPointers.DataPointer(buffer);
    }

    public void Release(Tensor buffer) => buffer.Dispose();

    public long[] ReadToHost(Tensor values)
    {
        using var host = values.cpu();
        return host.data<long>().ToArray();
    }

    private sealed unsafe class KeptContext(nint context) : IDisposable
    {
        public void Dispose() => CudaDriver.Check(CudaDriver.F.CtxSetCurrent(context), "cuCtxSetCurrent");
    }
}
