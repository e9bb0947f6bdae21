using System.Diagnostics;
using TorchSharp;
using ViT22B.Parallel;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>The in-process collectives against their definitions.</summary>
public class CommunicatorTests
{
    public static TheoryData<int, ScalarType> RanksAndDtypes()
    {
        var data = new TheoryData<int, ScalarType>();
        foreach (int k in new[] { 1, 2, 3, 4 })
            foreach (var dt in new[] { ScalarType.Float32, ScalarType.Float64, ScalarType.BFloat16 })
                data.Add(k, dt);
        return data;
    }

    /// <summary>Rank r's input: (r + 2) rows (uneven), trailing shape [3, 2], values seeded by rank.</summary>
    private static Tensor Input(int rank, ScalarType dtype, long? rows = null) =>
        torch.randn(new[] { rows ?? rank + 2, 3L, 2 }, dtype: ScalarType.Float64, generator: new torch.Generator((ulong)(100 + rank))).to(dtype);

    private static ICommunicator[] Group(int k, ThreadedWorld? world = null)
    {
        world ??= new ThreadedWorld(k, TimeSpan.FromSeconds(20));
        return world.CreateGroup("g", Enumerable.Range(0, k).ToArray());
    }

    private static Tensor[] RunAll(int k, Func<ICommunicator, Tensor> op, ThreadedWorld? world = null)
    {
        world ??= new ThreadedWorld(k, TimeSpan.FromSeconds(20));
        var comms = Group(k, world);
        return Spmd.Run(world, r =>
        {
            using var scope = torch.NewDisposeScope();
            return op(comms[r]).MoveToOuterDisposeScope().DetachFromDisposeScope();
        });
    }

    [Theory]
    [MemberData(nameof(RanksAndDtypes))]
    public void AllGather_concatenates_uneven_chunks_in_rank_order(int k, ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        var results = RunAll(k, c => c.AllGather(Input(c.Rank, dtype)));
        var expected = torch.cat(Enumerable.Range(0, k).Select(r => Input(r, dtype)).ToArray(), 0);
        foreach (var r in results) Assert.True(r.equal(expected).all().item<bool>() && r.shape.SequenceEqual(expected.shape));
    }

    [Theory]
    [MemberData(nameof(RanksAndDtypes))]
    public void ReduceScatter_gives_each_rank_the_sum_of_its_chunk(int k, ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        long[] counts = Enumerable.Range(0, k).Select(r => (long)(r % 2 + 1)).ToArray();   // uneven: 1, 2, 1, 2
        long rows = counts.Sum();
        var results = RunAll(k, c => c.ReduceScatter(Input(c.Rank, dtype, rows), counts));
        for (int r = 0; r < k; r++)
        {
            long start = counts.Take(r).Sum();
            var acc = dtype == ScalarType.BFloat16 ? ScalarType.Float32 : dtype;
            var sum = Input(0, dtype, rows).narrow(0, start, counts[r]).to(acc);
            for (int j = 1; j < k; j++) sum = sum.Plus(Input(j, dtype, rows).narrow(0, start, counts[r]).to(acc));
            Assert.True(results[r].equal(sum.to(dtype)).all().item<bool>(), $"rank {r}");
        }
    }

    [Theory]
    [MemberData(nameof(RanksAndDtypes))]
    public void AllReduce_sums_in_rank_order_identically_on_every_rank(int k, ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        var results = RunAll(k, c => c.AllReduce(Input(c.Rank, dtype, 4)));
        var acc = dtype == ScalarType.BFloat16 ? ScalarType.Float32 : dtype;
        var sum = Input(0, dtype, 4).to(acc);
        for (int j = 1; j < k; j++) sum = sum.Plus(Input(j, dtype, 4).to(acc));
        foreach (var r in results) Assert.True(r.equal(sum.to(dtype)).all().item<bool>());
    }

    [Theory]
    [MemberData(nameof(RanksAndDtypes))]
    public void Broadcast_copies_the_root(int k, ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        int root = k - 1;
        var results = RunAll(k, c => c.Broadcast(Input(c.Rank, dtype, 3), root));
        foreach (var r in results) Assert.True(r.equal(Input(root, dtype, 3)).all().item<bool>());
    }

    [Theory]
    [MemberData(nameof(RanksAndDtypes))]
    public void Permute_moves_uneven_chunks_around_the_ring(int k, ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        foreach (int shift in new[] { 1, -1 })
        {
            var results = RunAll(k, c => c.Permute(Input(c.Rank, dtype), shift));
            for (int r = 0; r < k; r++)
                Assert.True(results[r].equal(Input(((r - shift) % k + k) % k, dtype)).all().item<bool>(), $"rank {r}, shift {shift}");
        }
    }

    [Fact]
    public void Permute_with_known_receive_rows_checks_them()
    {
        using var scope = torch.NewDisposeScope();
        // Rank r sends r + 2 rows and receives from rank r − 1, which sends r + 1 rows.
        var right = RunAll(3, c => c.Permute(Input(c.Rank, ScalarType.Float32), 1, receiveRows: (c.Rank + 2) % 3 + 2));
        for (int r = 0; r < 3; r++) Assert.True(right[r].equal(Input((r + 2) % 3, ScalarType.Float32)).all().item<bool>());

        var e = Assert.Throws<AggregateException>(() => RunAll(3, c => c.Permute(Input(c.Rank, ScalarType.Float32), 1, receiveRows: c.Rank + 2)));
        Assert.Contains("expected", e.InnerExceptions[0].Message);
        Assert.Contains("which sent", e.InnerExceptions[0].Message);
        Assert.Throws<AggregateException>(() => RunAll(2, c => c.Permute(Input(c.Rank, ScalarType.Float32), 1, receiveRows: -2)));
    }

    [Fact]
    public void Async_operations_overlap_and_complete_in_any_wait_order()
    {
        using var scope = torch.NewDisposeScope();
        var results = RunAll(3, c =>
        {
            var a = c.AllGatherAsync(Input(c.Rank, ScalarType.Float32));
            var b = c.PermuteAsync(Input(c.Rank, ScalarType.Float32), 1);
            var pb = b.Wait();                                   // wait in the opposite order of issue
            var pa = a.Wait();
            return torch.cat(new[] { pa, pb }, 0);
        });
        for (int r = 0; r < 3; r++)
        {
            var gathered = torch.cat(Enumerable.Range(0, 3).Select(j => Input(j, ScalarType.Float32)).ToArray(), 0);
            var expected = torch.cat(new[] { gathered, Input((r + 2) % 3, ScalarType.Float32) }, 0);
            Assert.True(results[r].equal(expected).all().item<bool>());
        }
    }

    [Fact]
    public void Random_delays_change_no_result()
    {
        using var scope = torch.NewDisposeScope();
        var rng = new Random(7);
        var world = new ThreadedWorld(4, TimeSpan.FromSeconds(20), _ => { lock (rng) return TimeSpan.FromMilliseconds(rng.Next(0, 15)); });
        Tensor Body(ICommunicator c)
        {
            var x = Input(c.Rank, ScalarType.Float32);
            var g = c.AllGather(x);
            var p = c.Permute(g.narrow(0, 0, c.Rank + 1), 1);
            var s = c.ReduceScatter(g, new long[] { 2, 4, 3, 5 });
            return torch.cat(new[] { g.sum().reshape(1), p.sum().reshape(1), s.sum().reshape(1), c.AllReduce(x.sum().reshape(1)) }, 0);
        }
        var delayed = RunAll(4, Body, world);
        var plain = RunAll(4, Body);
        for (int r = 0; r < 4; r++) Assert.True(delayed[r].equal(plain[r]).all().item<bool>());
    }

    [Fact]
    public void A_missing_collective_fails_every_rank_within_the_timeout()
    {
        var world = new ThreadedWorld(3, TimeSpan.FromSeconds(2));
        var comms = Group(3, world);
        var watch = Stopwatch.StartNew();
        var e = Assert.Throws<AggregateException>(() => Spmd.Run(world, r =>
        {
            using var scope = torch.NewDisposeScope();
            if (r != 1) comms[r].AllReduce(torch.ones(2));             // rank 1 skips it ...
            comms[r].Barrier();                                        // ... and everyone meets here
            return 0;
        }));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(10), $"took {watch.Elapsed}");
        Assert.Equal(3, e.InnerExceptions.Count);
        Assert.All(e.InnerExceptions, x => Assert.IsType<CommunicatorException>(x.InnerException));
        // The message names rank 1 and whichever of ranks 0 and 2 had arrived first (a race, so either).
        Assert.Contains(e.InnerExceptions, x => System.Text.RegularExpressions.Regex.IsMatch(x.Message,
            "rank 1 called Barrier but rank [02] called AllReduce|rank [02] called AllReduce but rank 1 called Barrier"));
    }

    [Fact]
    public void A_rank_that_never_arrives_times_out_naming_it()
    {
        var world = new ThreadedWorld(2, TimeSpan.FromSeconds(1));
        var comms = Group(2, world);
        var e = Assert.Throws<AggregateException>(() => Spmd.Run(world, r =>
        {
            using var scope = torch.NewDisposeScope();
            if (r == 0) comms[r].AllReduce(torch.ones(2));
            return 0;
        }));
        Assert.Contains("timed out after 1 s waiting on rank(s) 1", e.InnerExceptions.Single().Message);
    }

    [Fact]
    public void An_exception_on_one_rank_surfaces_on_all()
    {
        var world = new ThreadedWorld(3, TimeSpan.FromSeconds(30));
        var comms = Group(3, world);
        var watch = Stopwatch.StartNew();
        var e = Assert.Throws<AggregateException>(() => Spmd.Run(world, r =>
        {
            using var scope = torch.NewDisposeScope();
            if (r == 2) throw new InvalidOperationException("boom on rank 2");
            comms[r].AllReduce(torch.ones(2));
            return 0;
        }));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(10), "peers must not wait for the timeout");
        Assert.Equal(3, e.InnerExceptions.Count);
        Assert.Contains("boom on rank 2", e.InnerExceptions[0].Message);
        Assert.All(e.InnerExceptions.Skip(1), x => Assert.Contains("boom on rank 2", x.Message));
        Assert.True(world.IsPoisoned);
    }

    [Fact]
    public void Mismatched_shapes_fail_every_rank_with_both_shapes()
    {
        var world = new ThreadedWorld(2, TimeSpan.FromSeconds(10));
        var comms = Group(2, world);
        var e = Assert.Throws<AggregateException>(() => Spmd.Run(world, r =>
        {
            using var scope = torch.NewDisposeScope();
            return comms[r].AllReduce(torch.ones(r + 2)).DetachFromDisposeScope();
        }));
        Assert.Equal(2, e.InnerExceptions.Count);
        Assert.Contains("rank 0 passed Float32 [2] but rank 1 passed Float32 [3]", e.InnerExceptions[0].Message);
    }

    [Fact]
    public void Mesh_groups_and_errors()
    {
        var mesh = new DeviceMesh(2, 3);
        Assert.Equal(new[] { 3, 4, 5 }, mesh.ModelGroup(1));
        Assert.Equal(new[] { 1, 4 }, mesh.DataGroup(1));
        Assert.Equal((1, 2), mesh.Coordinates(5));
        var e = Assert.Throws<ArgumentException>(() => RankContext.CreateThreaded(new ThreadedWorld(4), mesh));
        Assert.Contains("needs 6 ranks but the world has 4", e.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => mesh.DeviceOf(6));
        Assert.Contains("one device per rank", Assert.Throws<ArgumentException>(() => new DeviceMesh(2, 2, new[] { torch.CPU, torch.CPU })).Message);
    }

    [Fact]
    public void Two_by_two_mesh_axes_reduce_independently()
    {
        var mesh = new DeviceMesh(2, 2);
        var world = new ThreadedWorld(4, TimeSpan.FromSeconds(20));
        var ctx = RankContext.CreateThreaded(world, mesh);
        var results = Spmd.Run(world, r =>
        {
            using var scope = torch.NewDisposeScope();
            var m = ctx[r].Model.AllReduce(torch.tensor(new double[] { r }));
            var d = ctx[r].Data.AllReduce(torch.tensor(new double[] { r }));
            return (m.item<double>(), d.item<double>());
        });
        Assert.Equal(new[] { (1.0, 2.0), (1.0, 4.0), (5.0, 2.0), (5.0, 4.0) }, results);
    }
}
