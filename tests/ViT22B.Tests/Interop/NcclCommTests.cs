using TorchSharp;
using ViT22B.Interop;
using static TorchSharp.torch;

namespace ViT22B.Tests.Interop;

public sealed class NcclCommTests
{
    [Fact]
    public void Bad_ranks_are_refused_before_nccl_is_touched()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => NcclComm.InitRank(default, rank: 2, size: 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => NcclComm.InitRank(default, rank: -1, size: 2));
        Assert.Throws<ArgumentException>(() => NcclComm.InitAll(Array.Empty<int>()));
    }

    [NcclFact]
    public void One_rank_collectives_on_device_zero()
    {
        var comms = NcclComm.InitAll(new[] { 0 });
        using var comm = comms[0];
        Assert.True(Nccl.Version() >= 21000, $"NCCL {Nccl.Version()} is older than 2.10");
        using var x = torch.arange(12, dtype: ScalarType.BFloat16, device: torch.CUDA);
        using var y = torch.zeros_like(x);
        comm.AllReduce(x, y, NcclRedOp.Sum, stream: 0);
        comm.AllGather(x, y, stream: 0);
        torch.cuda.synchronize();
        Assert.True(y.equal(x).all().item<bool>());
        Assert.Equal(NcclResult.Success, comm.AsyncError());
    }
}
