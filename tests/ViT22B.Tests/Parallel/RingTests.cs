using TorchSharp;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>The decomposed rings (and the plain variants) equal the matmul on the full tensors, forward and backward,
/// on both backends.</summary>
public class RingTests
{
    public static TheoryData<Backend, int, CommMode> Cases()
    {
        var d = new TheoryData<Backend, int, CommMode>();
        foreach (var b in Backends.All)
            foreach (int k in new[] { 1, 2, 3, 4 })
                foreach (var m in new[] { CommMode.Overlapped, CommMode.Plain })
                    d.Add(b, k, m);
        return d;
    }

    private static Tensor Rand(long seed, params long[] shape) =>
        torch.randn(shape, dtype: ScalarType.Float64, generator: new torch.Generator((ulong)seed));

    [Theory]
    [MemberData(nameof(Cases))]
    public void AllGather_matmul_equals_full_matmul_with_gradients(Backend backend, int k, CommMode mode)
    {
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries (the rank threads open their own)
        const long tokens = 11, batch = 2, din = 6, doutPerRank = 5;     // 11 tokens: uneven chunks for k = 2, 3, 4
        var counts = TokenPartition.Counts(tokens, k);
        var x = Rand(1, tokens, batch, din);
        var w = Rand(2, k * doutPerRank, din);                           // full weight; rank r owns rows r
        var dy = Rand(3, tokens, batch, k * doutPerRank);
        // Reference: y = x·Wᵀ, dX = dY·W, dW = dYᵀ·X.
        var y = x.matmul(w.t());
        var results = Backends.RunGroup(backend, k, comm =>
        {
            int r = comm.Rank;
            using var scope = torch.NewDisposeScope();
            var xr = x.narrow(0, TokenPartition.Start(counts, r), counts[r]).clone().requires_grad_();
            var wr = w.narrow(0, r * doutPerRank, doutPerRank).clone().requires_grad_();
            var yr = Regions.AllGatherMatmul(xr, wr, comm, counts, mode);
            (yr * dy.narrow(2, r * doutPerRank, doutPerRank)).sum().backward();
            return (yr.detach().DetachFromDisposeScope(), xr.grad!.DetachFromDisposeScope(), wr.grad!.DetachFromDisposeScope());
        });
        var dx = dy.matmul(w);
        var dw = dy.reshape(-1, k * doutPerRank).t().matmul(x.reshape(-1, din));
        for (int r = 0; r < k; r++)
        {
            Assert.True(TestUtil.MaxAbs(results[r].Item1, y.narrow(2, r * doutPerRank, doutPerRank)) < 1e-12);
            Assert.True(TestUtil.MaxAbs(results[r].Item2, dx.narrow(0, TokenPartition.Start(counts, r), counts[r])) < 1e-12);
            Assert.True(TestUtil.MaxAbs(results[r].Item3, dw.narrow(0, r * doutPerRank, doutPerRank)) < 1e-12);
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Matmul_reduce_scatter_equals_full_matmul_with_gradients(Backend backend, int k, CommMode mode)
    {
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries (the rank threads open their own)
        const long tokens = 11, batch = 2, dinPerRank = 4, dout = 7;
        var counts = TokenPartition.Counts(tokens, k);
        var h = Rand(4, tokens, batch, k * dinPerRank);                   // rank r owns input features r
        var w = Rand(5, dout, k * dinPerRank);                             // rank r owns columns r
        var dOut = Rand(6, tokens, batch, dout);
        var y = h.matmul(w.t());
        var results = Backends.RunGroup(backend, k, comm =>
        {
            int r = comm.Rank;
            using var scope = torch.NewDisposeScope();
            var hr = h.narrow(2, r * dinPerRank, dinPerRank).clone().requires_grad_();
            var wr = w.narrow(1, r * dinPerRank, dinPerRank).clone().requires_grad_();
            var outR = Regions.MatmulReduceScatter(hr, wr, comm, counts, mode);
            (outR * dOut.narrow(0, TokenPartition.Start(counts, r), counts[r])).sum().backward();
            return (outR.detach().DetachFromDisposeScope(), hr.grad!.DetachFromDisposeScope(), wr.grad!.DetachFromDisposeScope());
        });
        var dh = dOut.matmul(w);
        var dw = dOut.reshape(-1, dout).t().matmul(h.reshape(-1, k * dinPerRank));
        for (int r = 0; r < k; r++)
        {
            Assert.True(TestUtil.MaxAbs(results[r].Item1, y.narrow(0, TokenPartition.Start(counts, r), counts[r])) < 1e-12);
            Assert.True(TestUtil.MaxAbs(results[r].Item2, dh.narrow(2, r * dinPerRank, dinPerRank)) < 1e-12);
            Assert.True(TestUtil.MaxAbs(results[r].Item3, dw.narrow(1, r * dinPerRank, dinPerRank)) < 1e-12);
        }
    }

    [Theory]
    [OnEveryBackend]
    public void Overlapped_ring_is_deterministic_under_random_delays(Backend backend)
    {
        const int k = 4;
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries (the rank threads open their own)
        var counts = TokenPartition.Counts(9, k);
        var h = Rand(7, 9, 3, k * 4);
        var w = Rand(8, 5, k * 4);
        Tensor[] Run(Func<int, TimeSpan>? delay) =>
            Backends.RunGroup(backend, k, comm =>
            {
                int r = comm.Rank;
                using var scope = torch.NewDisposeScope();
                return Rings.MatmulReduceScatter(h.narrow(2, r * 4, 4), w.narrow(1, r * 4, 4), comm, counts, CommMode.Overlapped).DetachFromDisposeScope();
            }, delay: delay);
        var rng = new Random(3);
        var delayed = Run(_ => { lock (rng) return TimeSpan.FromMilliseconds(rng.Next(0, 10)); });
        var plain = Run(null);
        for (int r = 0; r < k; r++) Assert.True(delayed[r].equal(plain[r]).all().item<bool>(), "bit-identical with and without delays");
    }
}
