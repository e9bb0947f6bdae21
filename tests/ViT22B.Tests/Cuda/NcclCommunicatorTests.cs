using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using ViT22B.Parallel;
using static TorchSharp.torch;

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

    [NcclFact]
    public void Collectives_with_one_rank_per_gpu_match_their_definitions()
    {
        int n = (int)torch.cuda.device_count();
        var comms = NcclCommunicator.CreateLocal(Enumerable.Range(0, n).ToArray(), TimeSpan.FromSeconds(60));
        // Rank r holds r + 1 rows (uneven chunks) of value r + 1, width 3.
        var errors = new string?[n];
        var threads = Enumerable.Range(0, n).Select(r => new Thread(() =>
        {
            try
            {
                using var comm = comms[r];
                using var scope = torch.NewDisposeScope();
                var dev = torch.device($"cuda:{r}");
                var local = torch.full(r + 1, 3, r + 1.0, dtype: ScalarType.Float32, device: dev);
                var gathered = comm.AllGather(local).cpu();
                var expectedRows = Enumerable.Range(0, n).SelectMany(k => Enumerable.Repeat(k + 1.0f, k + 1)).ToArray();
                if (!gathered.select(1, 0).data<float>().ToArray().SequenceEqual(expectedRows)) errors[r] = "all-gather";
                var sum = comm.AllReduce(local.narrow(0, 0, 1)).cpu();
                if (sum[0, 0].item<float>() != n * (n + 1) / 2f) errors[r] = "all-reduce";
                var counts = Enumerable.Range(0, n).Select(k => (long)(k + 1)).ToArray();
                var full = torch.ones(counts.Sum(), 3, device: dev);
                var scattered = comm.ReduceScatter(full, counts).cpu();
                if (scattered.shape[0] != r + 1 || scattered.max().item<float>() != n) errors[r] = "reduce-scatter";
                var permuted = comm.Permute(local, 1).cpu();
                int prev = (r - 1 + n) % n;
                if (permuted.shape[0] != prev + 1 || permuted.max().item<float>() != prev + 1) errors[r] = "permute";
                comm.Barrier();
            }
            catch (Exception e)
            {
                errors[r] = e.ToString();
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        Assert.All(errors, e => Assert.Null(e));
    }
}
