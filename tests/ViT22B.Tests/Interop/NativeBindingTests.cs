using System.Runtime.CompilerServices;
using TorchSharp;
using ViT22B.Interop;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Interop;

public sealed class NativeBindingTests
{
    [Fact]
    public void Nccl_enums_and_id_match_nccl_h()
    {
        // nccl.h 2.30 (docs/gpu.md).
        Assert.Equal(new[] { 0, 1, 2, 3, 4, 5, 6, 7, 8 }, Enum.GetValues<NcclResult>().Select(v => (int)v));
        Assert.Equal(6, (int)NcclDataType.Float16);
        Assert.Equal(7, (int)NcclDataType.Float32);
        Assert.Equal(8, (int)NcclDataType.Float64);
        Assert.Equal(9, (int)NcclDataType.BFloat16);
        Assert.Equal(new[] { 0, 1, 2, 3, 4 }, Enum.GetValues<NcclRedOp>().Select(v => (int)v));
        Assert.Equal(128, Unsafe.SizeOf<NcclUniqueId>());
        Assert.Equal(4, Unsafe.SizeOf<NcclResult>());   // C enums are int-sized
        var bytes = Enumerable.Range(0, 128).Select(i => (byte)(i * 3)).ToArray();
        Assert.Equal(bytes, NcclUniqueId.FromBytes(bytes).ToArray());
        Assert.Throws<ArgumentException>(() => NcclUniqueId.FromBytes(new byte[127]));
    }

    [Fact]
    public void Dtypes_map_to_nccl_types_and_fatal_codes_are_classified()
    {
        Assert.Equal(NcclDataType.BFloat16, Nccl.DataType(ScalarType.BFloat16));
        Assert.Equal(NcclDataType.Float16, Nccl.DataType(ScalarType.Float16));
        Assert.Equal(NcclDataType.Float32, Nccl.DataType(ScalarType.Float32));
        Assert.Throws<NotSupportedException>(() => Nccl.DataType(ScalarType.Bool));
        Assert.False(Nccl.IsFatal(NcclResult.InvalidArgument));
        Assert.False(Nccl.IsFatal(NcclResult.InProgress));
        Assert.True(Nccl.IsFatal(NcclResult.UnhandledCudaError));
        Assert.True(Nccl.IsFatal(NcclResult.RemoteError));
        Assert.True(Nccl.IsFatal(NcclResult.Timeout));
        Nccl.Check(NcclResult.Success, "ncclAllReduce");
        var e = Assert.Throws<NcclException>(() => Nccl.Check(NcclResult.SystemError, "ncclAllReduce"));
        Assert.Contains("ncclAllReduce failed: SystemError (2)", e.Message);
        Assert.True(e.IsFatal);
    }

    [Fact]
    public void Missing_library_and_missing_symbol_are_named()
    {
        var missing = new LazyNativeLibrary("libnot-there.so.9", new[] { "libnot-there.so.9" }, "Install it.");
        Assert.False(missing.IsLoaded);
        var e = Assert.Throws<NativeLibraryException>(() => missing.GetExport("f"));
        Assert.Contains("libnot-there.so.9", e.Message);
        Assert.Contains("Install it.", e.Message);

        var libc = new LazyNativeLibrary("libc.so.6", new[] { "libc.so.6" }, "");
        Assert.NotEqual(0, libc.GetExport("strlen"));
        var s = Assert.Throws<NativeLibraryException>(() => libc.GetExport("ncclAllReduce"));
        Assert.Contains("'ncclAllReduce'", s.Message);
        Assert.Contains("libc.so.6", s.Message);
    }

    [CpuOnlyFact]
    public void A_cpu_run_never_loads_cuda_or_nccl()
    {
        // Model work and every CPU-side binding path (enums, ids, error mapping) must leave the GPU libraries unopened.
        var cfg = new ViTConfig { ImgSize = 16, PatchSize = 8, EmbedDim = 32, Depth = 1, NumHeads = 2, MlpDim = 64, NumClasses = 3 };
        using (var model = new VisionTransformer(cfg, torch.CPU, ScalarType.Float32))
        using (var x = torch.rand(1, 3, 16, 16))
            model.forward(x).Dispose();
        var mesh = new ViT22B.Parallel.DeviceMesh(1, 2);
        var world = new ViT22B.Parallel.ThreadedWorld(2);
        var contexts = ViT22B.Parallel.RankContext.CreateThreaded(world, mesh);
        ViT22B.Parallel.Spmd.Run(world, r =>
        {
            using var device = contexts[r].UseDevice();
            using var scope = torch.NewDisposeScope();
            using var x = torch.ones(2);
            using var sum = ViT22B.Parallel.CommunicatorExtensions.AllReduce(contexts[r].Model, x);
            return sum.sum().item<float>();
        });
        _ = Nccl.DataType(ScalarType.Float32);
        _ = Assert.Throws<NcclException>(() => Nccl.Check(NcclResult.InvalidUsage, "ncclCommInitRank"));
        if (!File.Exists("/proc/self/maps")) return;   // the check below reads Linux's memory map
        Assert.False(Nccl.Library.IsLoaded);
        Assert.False(TestUtil.IsMappedInProcess("libnccl"), "libnccl is mapped into a CPU-only run");
        Assert.False(TestUtil.IsMappedInProcess("libcuda.so"), "libcuda is mapped into a CPU-only run");
        Assert.True(TestUtil.IsMappedInProcess("libtorch_cpu"), "the check itself must see libtorch_cpu");
    }
}
