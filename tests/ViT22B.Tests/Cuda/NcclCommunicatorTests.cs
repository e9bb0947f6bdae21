using ViT22B.Cuda;
using ViT22B.Interop;
using ViT22B.Parallel;

namespace ViT22B.Tests.Cuda;

public sealed class NcclCommunicatorTests
{
    [Fact]
    public void Each_rank_takes_its_model_and_data_group_ids_from_rank_0s_payload()
    {
        // 2 × 3 mesh: 2 model groups + 3 data groups; id bytes are the group's number so they can be told apart.
        var mesh = new DeviceMesh(2, 3);
        var payload = Enumerable.Range(0, 5).SelectMany(g => Enumerable.Repeat((byte)(g + 1), NcclUniqueId.Bytes)).ToArray();
        for (int rank = 0; rank < 6; rank++)
        {
            var (model, data) = NcclCommunicator.GroupIds(payload, mesh, rank);
            var (d, m) = mesh.Coordinates(rank);
            Assert.Equal(NcclUniqueId.Bytes, model.Length);
            Assert.All(model, b => Assert.Equal(d + 1, b));              // model[data=d]: ranks d·3 … d·3+2
            Assert.All(data, b => Assert.Equal(2 + m + 1, b));           // data[model=m]: after the model groups
        }
        var e = Assert.Throws<RendezvousException>(() => NcclCommunicator.GroupIds(payload.AsSpan(0, 4 * NcclUniqueId.Bytes).ToArray(), mesh, 0));
        Assert.Contains("needs 5 × 128 = 640", e.Message);
    }
}
