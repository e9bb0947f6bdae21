using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>
/// Raw data pointers of tensors of any dtype and device, for native libraries (NCCL, CUDA). TorchSharp's
/// <c>storage&lt;T&gt;().data_ptr()</c> ignores the storage offset and, for bfloat16, points at a converted copy
/// (docs/torchsharp-notes.md#tensor-data-pointers); this uses PyTorch 2.10's stable C ABI function <c>torch_get_mutable_data_ptr</c> from
/// <c>libtorch_cpu</c>, which is device-agnostic and includes the offset. Keep the managed tensor alive until every
/// native use of the pointer (including work queued on a stream) has finished.
/// </summary>
internal static unsafe class TensorPointers
{
    private static readonly LazyNativeLibrary TorchCpu = new("libtorch_cpu.so",
        new[] { "libtorch_cpu.so", Path.Combine(AppContext.BaseDirectory, "libtorch_cpu.so"), Path.Combine(AppContext.BaseDirectory, "cpu", "libtorch_cpu.so") },
        "It ships with the libtorch package the application references (libtorch-cpu-linux-x64 or a CUDA build, version 2.10).");

    private static readonly Lazy<nint> GetMutableDataPtr = new(() =>
    {
        _ = torch.CPU;   // make TorchSharp load libtorch first, so the name resolves to the already loaded library
        return TorchCpu.GetExport("torch_get_mutable_data_ptr");
    });

    /// <summary>The address of the tensor's first element (storage base + storage offset × element size).</summary>
    /// <param name="tensor">The tensor (kept alive by the caller).</param>
    /// <param name="requireContiguous">Refuse non-contiguous tensors (collectives and copies read a dense block).</param>
    /// <exception cref="ArgumentException">The tensor is not contiguous while <paramref name="requireContiguous"/>.</exception>
    public static nint DataPointer(Tensor tensor, bool requireContiguous = true)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        if (requireContiguous && !tensor.is_contiguous())
            throw new ArgumentException($"A raw pointer needs a contiguous tensor; this one has shape [{string.Join(", ", tensor.shape)}] and strides [{string.Join(", ", tensor.stride())}]. Call .contiguous() first.", nameof(tensor));
        var fn = (delegate* unmanaged<nint, nint*, int>)GetMutableDataPtr.Value;
        nint p;
        int err = fn(tensor.Handle, &p);
        if (err != 0) throw new InvalidOperationException($"torch_get_mutable_data_ptr failed with code {err} for a {tensor.dtype} tensor on {tensor.device}.");
        GC.KeepAlive(tensor);
        return p;
    }

    /// <summary>Fills a contiguous CPU tensor with exactly <paramref name="bytes"/> bytes read from <paramref name="stream"/>
    /// (its whole storage), in 1 MiB chunks straight into the tensor's memory.</summary>
    /// <exception cref="ArgumentException">The tensor is not a contiguous CPU tensor of exactly that many bytes.</exception>
    /// <exception cref="EndOfStreamException">The stream ends early.</exception>
    public static void ReadInto(Tensor tensor, Stream stream, long bytes)
    {
        ArgumentNullException.ThrowIfNull(stream);
        CheckCpuBytes(tensor, bytes);
        byte* p = (byte*)DataPointer(tensor);
        for (long done = 0; done < bytes;)
        {
            int n = (int)Math.Min(bytes - done, 1 << 20);
            stream.ReadExactly(new Span<byte>(p + done, n));
            done += n;
        }
        GC.KeepAlive(tensor);
    }

    private static void CheckCpuBytes(Tensor tensor, long bytes)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        if (tensor.device_type != DeviceType.CPU || !tensor.is_contiguous() || tensor.numel() * tensor.ElementSize != bytes)
            throw new ArgumentException($"Expected a contiguous CPU tensor of {bytes} bytes, found {tensor.dtype} [{string.Join(", ", tensor.shape)}] on {tensor.device}.", nameof(tensor));
    }
}
