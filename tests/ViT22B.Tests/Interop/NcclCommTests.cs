using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using ViT22B.Tests.Fakes;
using static TorchSharp.torch;

namespace ViT22B.Tests.Interop;

public sealed class NcclCommTests
{
    [Fact]
    public void Bad_ranks_are_refused_before_nccl_is_touched()
    {
        using var nccl = new NcclStandIn();
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        Assert.Throws<ArgumentOutOfRangeException>(() => NcclComm.InitRank(nccl, default, rank: 2, size: 2, deadline));
        Assert.Throws<ArgumentOutOfRangeException>(() => NcclComm.InitRank(nccl, default, rank: -1, size: 2, deadline));
        Assert.Throws<ArgumentException>(() => NcclComm.InitLocal(nccl, Array.Empty<int>(), _ => { }, deadline));
        Assert.Empty(nccl.LaunchesOf(0));
    }

    [NcclFact]
    public void One_rank_collectives_on_device_zero()
    {
        var comms = NcclComm.InitLocal(Nccl.Native, new[] { 0 }, CudaDriver.MakeCurrent, DateTime.UtcNow + TimeSpan.FromSeconds(60));
        using var comm = comms[0];
        Assert.True(Nccl.Version() >= Nccl.MinimumVersion, $"NCCL {Nccl.Version()} is older than 2.14");
        using var x = torch.arange(12, dtype: ScalarType.BFloat16, device: torch.CUDA);
        using var y = torch.zeros_like(x);
        torch.cuda.synchronize();
        nint stream = CudaStreams.FromPool(0);
        var buffer = (Tensor t) => new NcclBuffer(TensorPointers.DataPointer(t), (nuint)t.numel(), NcclDataType.BFloat16);
        comm.AllReduce(buffer(x), buffer(y), NcclRedOp.Sum, stream, DateTime.UtcNow + TimeSpan.FromSeconds(60));
        comm.AllGather(buffer(x), buffer(y), stream, DateTime.UtcNow + TimeSpan.FromSeconds(60));
        using (var done = new CudaEvent(0))
        {
            done.Record(stream);
            done.Synchronize();
        }
        Assert.True(y.equal(x).all().item<bool>());
        Assert.Equal(NcclResult.Success, comm.AsyncError());
    }
}
