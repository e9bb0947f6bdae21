using ViT22B.Interop;
using ViT22B.Tests.Fakes;

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
}
