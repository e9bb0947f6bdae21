using System.Diagnostics;
using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using ViT22B.Layers;
using ViT22B.Parallel;
using ViT22B.Tests.Fakes;
using ViT22B.Tests.Parallel;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Cuda;

/// <summary>
/// <see cref="NcclCommunicator"/>'s own logic (ordering, sizes, buffer lifetimes, failures) on the CPU, against the NCCL
/// stand-in, which enforces NCCL's rules. Each test names the defect of the line-by-line review it pins down.
/// </summary>
public sealed class NcclCommunicatorStandInTests
{
    private static T[] OnNccl<T>(int k, Func<NcclCommunicator, T> body, NcclStandIn nccl, double timeoutSeconds = 60) =>
        Backends.RunGroup(Backend.NcclStandIn, k, c => body((NcclCommunicator)c), TimeSpan.FromSeconds(timeoutSeconds), standIn: nccl);

    // Rank r holds r + 2 rows of small integers (exact in every dtype, sums included).
    private static Tensor Input(int rank, ScalarType dtype) => ScalarMath.Arange((rank + 2) * 4, ScalarType.Float64, torch.CPU).Plus(rank * 8.0).reshape(rank + 2, 4).to(dtype);

    [Theory]
    [InlineData(ScalarType.Float64)]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Collectives_match_their_definitions(ScalarType dtype)
    {
        const int k = 3;
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries (the rank threads open their own)
        using var nccl = new NcclStandIn(deviceCount: k);
        var results = OnNccl(k, comm =>
        {
            int r = comm.Rank, prev = (r + k - 1) % k, next = (r + 1) % k;
            using var scope = torch.NewDisposeScope();
            var x = Input(r, dtype);
            var two = x.narrow(0, 0, 2);
            Tensor Host(Tensor t) => t.to(ScalarType.Float64).DetachFromDisposeScope();
            return new[]
            {
                Host(comm.AllGather(x, new long[] { 2, 3, 4 })),
                Host(comm.AllGather(x)),                                            // sizes exchanged first
                Host(comm.Permute(x, 1, receiveRows: prev + 2)),
                Host(comm.Permute(x, -1)),                                          // size exchanged first
                Host(comm.AllReduce(two)),
                Host(comm.ReduceScatter(torch.cat(new[] { two, two }, 0), new long[] { 1, 1, 2 })),
                Host(comm.Broadcast(r == 2 ? two : torch.zeros_like(two), 2)),
                Host(comm.ReduceScatter(torch.cat(new[] { two, two, two.narrow(0, 0, 1), two.narrow(0, 0, 1) }, 0), new long[] { 2, 2, 2 })),
            };
        }, nccl);
        var all = torch.cat(Enumerable.Range(0, k).Select(j => Input(j, ScalarType.Float64)).ToArray(), 0);
        var sum2 = Enumerable.Range(0, k).Select(j => Input(j, ScalarType.Float64).narrow(0, 0, 2)).Aggregate((a, b) => a.Plus(b));
        var doubled = torch.cat(new[] { sum2, sum2 }, 0);
        long[] starts = { 0, 1, 2 }, counts = { 1, 1, 2 };
        var even = torch.cat(new[] { sum2, sum2, sum2.narrow(0, 0, 1), sum2.narrow(0, 0, 1) }, 0);
        for (int r = 0; r < k; r++)
        {
            var res = results[r];
            Assert.True(res[0].equal(all).all().item<bool>(), $"rank {r} all-gather (known counts)");
            Assert.True(res[1].equal(all).all().item<bool>(), $"rank {r} all-gather (exchanged counts)");
            Assert.True(res[2].equal(Input((r + k - 1) % k, ScalarType.Float64)).all().item<bool>(), $"rank {r} permute +1");
            Assert.True(res[3].equal(Input((r + 1) % k, ScalarType.Float64)).all().item<bool>(), $"rank {r} permute −1");
            Assert.True(res[4].equal(sum2).all().item<bool>(), $"rank {r} all-reduce");
            Assert.True(res[5].equal(doubled.narrow(0, starts[r], counts[r])).all().item<bool>(), $"rank {r} reduce-scatter (uneven)");
            Assert.True(res[6].equal(Input(2, ScalarType.Float64).narrow(0, 0, 2)).all().item<bool>(), $"rank {r} broadcast");
            Assert.True(res[7].equal(even.narrow(0, 2 * r, 2)).all().item<bool>(), $"rank {r} reduce-scatter (even)");
        }
    }

    [Fact]
    public void A_ring_step_exchanges_no_sizes_and_reads_nothing_on_the_host()
    {
        // Defect 1: each permute of the rings passes the size it will receive, so NCCL sees one grouped send/receive of
        // the data per step and nothing else: no size exchange, no host read before the step's matmul is queued.
        const int k = 3;
        const long tokens = 11, batch = 2, din = 6, doutPerRank = 5;
        var counts = TokenPartition.Counts(tokens, k);                        // [4, 4, 3]
        using var nccl = new NcclStandIn(deviceCount: k);
        var x = torch.randn(new[] { tokens, batch, din }, dtype: ScalarType.Float64, generator: new torch.Generator(1));
        var w = torch.randn(new[] { k * doutPerRank, din }, dtype: ScalarType.Float64, generator: new torch.Generator(2));
        var syncs = OnNccl(k, comm =>
        {
            int r = comm.Rank;
            using var scope = torch.NewDisposeScope();
            var xr = x.narrow(0, TokenPartition.Start(counts, r), counts[r]).clone();
            Rings.AllGatherMatmul(xr, w.narrow(0, r * doutPerRank, doutPerRank), comm, counts, CommMode.Overlapped);
            return nccl.HostSyncs(r);    // before the communicator's disposal, which does wait on the host
        }, nccl);
        for (int r = 0; r < k; r++)
        {
            // Step s sends chunk (r − s) and receives chunk (r − s − 1), [rows, batch, din] each.
            var expected = Enumerable.Range(0, k - 1).Select(s =>
                $"[Send(to {(r + 1) % k}, {counts[(r - s + 2 * k) % k] * batch * din} × Float64), Recv(from {(r + k - 1) % k}, {counts[(r - s - 1 + 2 * k) % k] * batch * din} × Float64)]");
            Assert.Equal(expected, nccl.LaunchesOf(r));
            // No host synchronization either: no read of device values, and Wait() only makes the compute stream wait
            // (the thread never polls an event; the watchdog's polls come from its own thread).
            Assert.Equal(0, syncs[r]);
        }
    }

    [Theory]
    [InlineData(CommMode.Overlapped, false)]
    [InlineData(CommMode.Overlapped, true)]
    [InlineData(CommMode.Plain, true)]
    public void A_sharded_training_step_never_exchanges_sizes(CommMode mode, bool fsdp)
    {
        // Defects 1 and 7: every size is known from the token partition or the FSDP shard rows; a whole forward,
        // backward and gradient synchronization on a 2 × 2 mesh issues no int64 size collective and no host read.
        var c = ShardedModelTests.Config(BlockKind.Parallel);
        var plan = new ShardingPlan(c, 2, 2, fsdp);
        using var images = TestUtil.RandomImages(c, 4, seed: 3, ScalarType.Float32);
        using var nccl = new NcclStandIn(deviceCount: 4);
        Backends.Run(Backend.NcclStandIn, new DeviceMesh(2, 2), ctx =>
        {
            using var shard = new ShardedVisionTransformer(plan, ctx, mode, ScalarType.Float32);
            using var scope = torch.NewDisposeScope();
            var loss = shard.Forward(images.narrow(0, 2 * shard.DataIndex, 2)).Squared().mean();
            shard.Backward(loss);
            shard.SynchronizeGradients();
            return 0;
        }, standIn: nccl);
        for (int d = 0; d < 4; d++)
        {
            Assert.NotEmpty(nccl.LaunchesOf(d));
            Assert.DoesNotContain(nccl.LaunchesOf(d), l => l.Contains("Int64"));
            // No size read on the host. (The step does synchronize with the host by design, once at the end of the
            // forward, the backward and the gradient synchronization; a ring step never does: the test above.)
            Assert.Equal(0, nccl.HostReads(d));
        }
    }

    [Fact]
    public void Unknown_sizes_cost_a_collective_and_a_host_read_known_ones_nothing()
    {
        using var nccl = new NcclStandIn(deviceCount: 2);
        OnNccl(2, comm =>
        {
            using var scope = torch.NewDisposeScope();
            var x = torch.ones(comm.Rank + 1, 3);
            comm.AllGather(x, new long[] { 1, 2 });
            comm.AllGather(x);
            return 0;
        }, nccl);
        for (int r = 0; r < 2; r++)
        {
            Assert.Equal(new[] { "AllGather(6 × Float32)", "AllGather(1 × Int64)", "AllGather(6 × Float32)" }, nccl.LaunchesOf(r));
            Assert.Equal(1, nccl.HostReads(r));
        }
    }

    [Fact]
    public void A_contiguous_input_is_sent_without_a_copy()
    {
        // Defect 7: the ring steps used to clone every send buffer on the compute stream.
        using var nccl = new NcclStandIn(deviceCount: 2);
        var handed = OnNccl(2, comm =>
        {
            using var scope = torch.NewDisposeScope();
            var x = ScalarMath.Full(new long[] { 3, 4 }, comm.Rank + 1.0, ScalarType.Float32, torch.CPU);
            using var work = comm.PermuteAsync(x, 1, receiveRows: 3);
            bool direct = nccl.IsHandedToNccl(TensorPointers.DataPointer(x));
            var y = work.Wait();
            return (direct, y[0, 0].item<float>());
        }, nccl);
        Assert.All(handed, h => Assert.True(h.direct));
        Assert.Equal(new[] { 2f, 1f }, handed.Select(h => h.Item2));
    }

    [Fact]
    public void Non_contiguous_inputs_are_sent_as_contiguous_copies()
    {
        // Defect 6: clone() kept a transposed tensor's strides, and its pointer was refused.
        using var nccl = new NcclStandIn(deviceCount: 2);
        using var testScope = torch.NewDisposeScope();   // this thread's temporaries (the rank threads open their own)
        static Tensor Input(int r) => ScalarMath.Arange(6, ScalarType.Float32, torch.CPU).reshape(2, 3).Plus(10 * r).t();   // [3, 2], strides (1, 3)
        var results = OnNccl(2, comm =>
        {
            using var scope = torch.NewDisposeScope();
            var x = Input(comm.Rank);
            Assert.False(x.is_contiguous());
            return new[] { comm.AllReduce(x), comm.AllGather(x, new long[] { 3, 3 }), comm.Permute(x, 1, 3), comm.Broadcast(x, 1) }
                .Select(t => t.DetachFromDisposeScope()).ToArray();
        }, nccl);
        for (int r = 0; r < 2; r++)
        {
            Assert.True(results[r][0].equal(Input(0).Plus(Input(1))).all().item<bool>());
            Assert.True(results[r][1].equal(torch.cat(new[] { Input(0), Input(1) }, 0)).all().item<bool>());
            Assert.True(results[r][2].equal(Input(1 - r)).all().item<bool>());
            Assert.True(results[r][3].equal(Input(1)).all().item<bool>());
        }
    }

    [Fact]
    public void An_exception_inside_a_send_receive_group_closes_the_group_and_aborts()
    {
        // Defect 2: an exception between ncclGroupStart and ncclGroupEnd left the thread's group open, so every later
        // NCCL call on the thread queued without launching and reported success.
        using var nccl = new NcclStandIn(deviceCount: 2);
        nccl.ThrowOnNextCall(0, "ncclSend");
        var results = Backends.Run(Backend.NcclStandIn, new DeviceMesh(1, 2), ctx =>
        {
            using var scope = torch.NewDisposeScope();
            var x = ScalarMath.Full(new long[] { 3, 2 }, ctx.Rank + 1.0, ScalarType.Float32, torch.CPU);
            var e = Assert.Throws<CommunicatorException>(() => ctx.Model.Permute(x, 1, receiveRows: 3));
            int depth = nccl.GroupDepth;
            // The thread's other communicator (the data axis, one rank) still works: nothing is stuck in a group.
            float after = ctx.Data.AllReduce(x)[0, 0].item<float>();
            return (e.Message, depth, after, ((NcclCommunicator)ctx.Model).IsAborted);
        }, TimeSpan.FromSeconds(2), standIn: nccl);
        Assert.Contains("ncclSend threw (injected)", results[0].Message);
        Assert.Contains("did not finish within 2 s", results[1].Message);   // rank 0 never sent: rank 1 times out
        Assert.All(results, r => Assert.Equal(0, r.depth));
        Assert.Equal(new[] { 1f, 2f }, results.Select(r => r.after));
        Assert.All(results, r => Assert.True(r.IsAborted));
    }

    [Fact]
    public void A_failed_call_aborts_so_that_no_later_call_pairs_with_the_wrong_peer_call()
    {
        // Defect 3: ncclInvalidArgument ("the call had no effect") left the rank one collective behind its peer, so its
        // next permute was paired with the peer's previous one and delivered the wrong chunk without any error.
        using var nccl = new NcclStandIn(deviceCount: 2);
        nccl.FailNextCall(0, "ncclSend", NcclResult.InvalidArgument);
        var results = OnNccl(2, comm =>
        {
            using var scope = torch.NewDisposeScope();
            var first = ScalarMath.Full(new long[] { 3, 2 }, 10.0 + comm.Rank, ScalarType.Float32, torch.CPU);
            var second = ScalarMath.Full(new long[] { 3, 2 }, 20.0 + comm.Rank, ScalarType.Float32, torch.CPU);
            var messages = new List<string>();
            foreach (var x in comm.Rank == 0 ? new[] { first, second } : new[] { first })
            {
                try
                {
                    messages.Add($"received {comm.Permute(x, 1, receiveRows: 3)[0, 0].item<double>()}");
                }
                catch (CommunicatorException e)
                {
                    messages.Add(e.Message);
                }
            }
            return messages;
        }, nccl, timeoutSeconds: 2);
        Assert.Contains("InvalidArgument", results[0][0]);
        Assert.Contains("aborted after an earlier failure", results[0][1]);
        Assert.Contains("did not finish within 2 s", Assert.Single(results[1]));   // never "received 20"
    }

    [Theory]
    [InlineData(Backend.Threaded)]
    [InlineData(Backend.NcclStandIn)]
    public void A_ring_left_by_an_exception_waits_for_its_permute_before_its_buffers_can_go(Backend backend)
    {
        // Defect 4: a permute in flight when the loop threw was dropped; a finalizer could then free its buffers while
        // NCCL still wrote them. Rank 0's matmul throws after its permute was posted; rank 1 posts its own a little
        // later, after rank 0 has collected garbage. No buffer may be freed early (the stand-in checks), and nothing
        // may stay outstanding on rank 0.
        const int k = 2;
        var counts = TokenPartition.Counts(6, k);
        var x = torch.randn(new long[] { 6, 2, 4 }, dtype: ScalarType.Float64, generator: new torch.Generator(5));
        using var gate = new ManualResetEventSlim();
        var results = Backends.RunGroup(backend, k, comm =>
        {
            if (comm.Rank == 1) gate.Wait(TimeSpan.FromSeconds(1));
            using var scope = torch.NewDisposeScope();
            var w = torch.ones(3, comm.Rank == 0 ? 5 : 4, dtype: ScalarType.Float64);     // rank 0's cannot multiply
            try
            {
                Rings.AllGatherMatmul(x.narrow(0, TokenPartition.Start(counts, comm.Rank), counts[comm.Rank]), w, comm, counts, CommMode.Overlapped);
                return "finished";
            }
            catch (Exception e) when (comm.Rank == 0 && e is not CommunicatorException)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
                GC.Collect();
                gate.Set();
                // The rank left the ring half-way, so its communicator was aborted: its next call fails instead of
                // pairing with a peer's next permute.
                var next = Record.Exception(() => comm.AllReduceAsync(torch.ones(1, dtype: ScalarType.Float64)).Wait());
                return (comm is NcclCommunicator n ? $"matmul failed; outstanding {n.Outstanding}" : "matmul failed") + $"; then {next?.GetType().Name}";
            }
            catch (CommunicatorException) when (comm.Rank == 1)
            {
                return "peer aborted";
            }
        }, TimeSpan.FromSeconds(20));
        Assert.StartsWith("matmul failed", results[0]);
        Assert.EndsWith("; then CommunicatorException", results[0]);
        if (backend == Backend.NcclStandIn)
        {
            Assert.Equal("matmul failed; outstanding 0; then CommunicatorException", results[0]);
            Assert.Equal("finished", results[1]);   // rank 0 aborted only after its permute had run
        }
        else
        {
            // In process the abort poisons the world: rank 1 fails at once if it had not collected its permute yet.
            Assert.Contains(results[1], new[] { "finished", "peer aborted" });
        }
    }

    [Theory]
    [InlineData(Backend.Threaded)]
    [InlineData(Backend.NcclStandIn)]
    public void A_failure_inside_a_backward_region_takes_the_rank_out_of_the_group(Backend backend)
    {
        // Review of issue 11's fixes: a backward region that failed for a reason of its own (an out-of-memory error in a
        // ring's matmul, say) gave zero gradients and went on, leaving the communicator usable: the rank then issued
        // the next regions' collectives without the rest of that ring, out of step with its peers (on NCCL, calls
        // paired with the wrong ones). The failure must make the communicator refuse every later call.
        var results = Backends.RunGroup(backend, 2, comm =>
        {
            if (comm.Rank == 1) return "";
            using var scope = torch.NewDisposeScope();
            var grads = BackwardFailures.Guard(comm, () => throw new InvalidOperationException("out of memory (injected)"),
                () => new List<Tensor> { torch.zeros(2) });
            var next = Record.Exception(() => comm.AllReduceAsync(torch.ones(2)).Wait());
            var recorded = Record.Exception(() => BackwardFailures.ThrowIfAny(comm));
            return $"{grads[0].sum().item<float>()}; next: {next?.GetType().Name}: {next?.Message}; recorded: {recorded?.Message}";
        }, TimeSpan.FromSeconds(20));
        Assert.StartsWith("0; next: CommunicatorException: ", results[0]);
        Assert.Contains("out of memory (injected)", results[0].Split("; recorded: ")[0]);
        Assert.EndsWith("recorded: out of memory (injected)", results[0]);
    }

    [Fact]
    public void Synchronize_reports_a_collective_that_never_finished_though_nobody_waited_for_it()
    {
        // Wait() no longer blocks the host, so a collective can fail after the caller moved on; Synchronize (which the
        // sharded model calls at the end of each pass) must report it. Rank 1 never issues its part.
        using var nccl = new NcclStandIn(deviceCount: 2);
        var watch = Stopwatch.StartNew();
        var results = OnNccl(2, comm =>
        {
            if (comm.Rank == 1) return "";
            using var scope = torch.NewDisposeScope();
            var work = comm.AllReduceAsync(torch.ones(4));
            var e = Record.Exception(() => comm.Synchronize());
            work.Dispose();
            return $"{e?.GetType().Name}: {e?.Message}";
        }, nccl, timeoutSeconds: 1);
        Assert.StartsWith("CommunicatorException: ", results[0]);
        Assert.Contains("did not finish within 1 s", results[0]);
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(30), $"took {watch.Elapsed}");
    }

    [Fact]
    public void A_peer_that_never_initializes_is_a_timeout_not_a_hang()
    {
        // Defect 5: a blocking ncclCommInitRank waits forever for a peer that died after the rendezvous. Here rank 2 of
        // 3 never starts; the others give up at their deadline and abort.
        using var nccl = new NcclStandIn(deviceCount: 3);
        var mesh = new DeviceMesh(1, 3);
        var payload = NcclCommunicator.NewGroupIds(nccl, mesh);
        var watch = Stopwatch.StartNew();
        var e = Assert.Throws<AggregateException>(() => Spmd.Run(2, r => NcclCommunicator.InitRankContext(nccl, nccl, mesh, r, r, payload, TimeSpan.FromSeconds(1))));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(15), $"took {watch.Elapsed}");
        Assert.Equal(2, e.InnerExceptions.Count);
        foreach (var f in e.InnerExceptions)
        {
            var nccle = Assert.IsType<NcclException>(f.InnerException);
            Assert.Contains("a peer did not arrive", nccle.Message);
            Assert.Contains("aborted", nccle.Message);
        }
        nccl.AssertClean();
    }

    [Fact]
    public void Every_wait_after_a_failure_throws_a_communicator_exception()
    {
        // Defect 12: after the first Wait aborted the communicator, the second one threw InvalidOperationException
        // ("aborted"), which the callers' handlers for CommunicatorException did not catch.
        using var nccl = new NcclStandIn(deviceCount: 2);
        var results = OnNccl(2, comm =>
        {
            if (comm.Rank == 1) return Array.Empty<Exception>();    // rank 1 issues nothing: rank 0's work stays pending
            using var scope = torch.NewDisposeScope();
            var x = torch.ones(4);
            var a = comm.AllReduceAsync(x);
            var b = comm.AllReduceAsync(x);
            nccl.InjectAsyncError(0, NcclResult.RemoteError, "the link to rank 1 went down");
            return new Exception[]
            {
                Record.Exception(() => a.Wait()), Record.Exception(() => b.Wait()), Record.Exception(() => comm.AllReduceAsync(x)),
                Record.Exception(() => comm.Barrier()),
            };
        }, nccl);
        Assert.All(results[0], e => Assert.IsType<CommunicatorException>(e));
        Assert.Contains("NCCL reported RemoteError (the link to rank 1 went down)", results[0][0].Message);
        Assert.Contains("aborted", results[0][1].Message);
    }

    [Fact]
    public void Collectives_that_differ_across_ranks_fail_every_rank_at_once_naming_both()
    {
        using var nccl = new NcclStandIn(deviceCount: 2);
        var watch = Stopwatch.StartNew();
        var messages = OnNccl(2, comm =>
        {
            using var scope = torch.NewDisposeScope();
            var first = Assert.Throws<CommunicatorException>(() => comm.AllReduce(torch.ones(comm.Rank + 3))).Message;
            return first;
        }, nccl, timeoutSeconds: 30);
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(10), "a mismatch must not wait for the timeout");
        foreach (var m in messages)
        {
            Assert.Contains("rank 0 issued AllReduce(Sum, 3 × Float32)", m);
            Assert.Contains("rank 1 issued AllReduce(Sum, 4 × Float32)", m);
        }
        Assert.Single(nccl.Mismatches);
    }

    [Fact]
    public void A_wrong_receive_size_is_a_mismatch_not_a_silent_truncation()
    {
        using var nccl = new NcclStandIn(deviceCount: 2);
        var messages = OnNccl(2, comm =>
        {
            using var scope = torch.NewDisposeScope();
            return Assert.Throws<CommunicatorException>(() => comm.Permute(torch.ones(3, 2), 1, receiveRows: comm.Rank == 0 ? 3 : 2)).Message;
        }, nccl);
        Assert.All(messages, m => Assert.Contains("rank 0 sends [6 × Float32] to rank 1, which receives [4 × Float32] from it", m));
    }

    [Fact]
    public void Ranks_may_share_a_device_only_where_nccl_allows_it()
    {
        // Defect 11: NCCL before 2.30 refuses two ranks on one GPU ("Duplicate GPU detected"); 2.30 allows two with
        // NCCL_MULTI_RANK_GPU_ENABLE=1. The stand-in enforces both; on one device, two ranks then work.
        var mesh = new DeviceMesh(1, 2);
        using (var strict = new NcclStandIn(deviceCount: 1))
        {
            var payload = NcclCommunicator.NewGroupIds(strict, mesh);
            var e = Assert.Throws<AggregateException>(() => Spmd.Run(2, r => NcclCommunicator.InitRankContext(strict, strict, mesh, r, 0, payload, TimeSpan.FromSeconds(2))));
            Assert.Contains(e.InnerExceptions, f => f.InnerException is NcclException { Result: NcclResult.InvalidUsage });
        }
        using var shared = new NcclStandIn(deviceCount: 1, multiRankGpu: true);
        var ids = NcclCommunicator.NewGroupIds(shared, mesh);
        var sums = Spmd.Run(2, r =>
        {
            var ctx = NcclCommunicator.InitRankContext(shared, shared, mesh, r, 0, ids, TimeSpan.FromSeconds(10));
            using var model = (NcclCommunicator)ctx.Model;
            using var data = (NcclCommunicator)ctx.Data;
            using var scope = torch.NewDisposeScope();
            return model.AllReduce(ScalarMath.Full(new long[] { 2 }, r + 1.0, ScalarType.Float32, torch.CPU))[0].item<float>();
        });
        Assert.Equal(new[] { 3f, 3f }, sums);
        shared.AssertClean();
    }

    [Fact]
    public void A_local_group_that_fails_half_way_aborts_what_it_created_and_keeps_the_callers_device()
    {
        // Review of this change, D1 and D3: an exception while selecting the second device left the first
        // communicator initializing forever; and the calling thread kept the last device selected.
        using var nccl = new NcclStandIn(deviceCount: 2);
        nccl.MakeCurrent(1);
        var e = Assert.Throws<InvalidOperationException>(() => NcclCommunicator.CreateLocal(nccl, nccl, new[] { 0, 5 }, TimeSpan.FromSeconds(5), "local", false));
        Assert.Contains("device 5 does not exist", e.Message);
        Assert.Equal(0, nccl.LiveCommunicators);                           // the first one was aborted
        nccl.MakeCurrent(0);
        var comms = NcclCommunicator.CreateLocal(nccl, nccl, new[] { 0, 1 }, TimeSpan.FromSeconds(5), "local", false);
        Assert.Equal(0, nccl.CurrentDeviceOfThread);                       // device 1 was selected last, then restored
        foreach (var c in comms) c.Dispose();
        Assert.Equal(0, nccl.LiveCommunicators);
        Assert.Equal(0, nccl.LiveCommStreams);                             // D5: every communication stream given back
        nccl.AssertClean();
    }

    [Fact]
    public void A_device_error_while_waiting_is_a_communicator_exception_and_the_buffers_are_kept()
    {
        // Review of this change, D2: a CUDA error from an event query escaped as a raw exception and dropped the work.
        using var nccl = new NcclStandIn(deviceCount: 2);
        var results = OnNccl(2, comm =>
        {
            if (comm.Rank == 1) return "";                                 // rank 0's collective stays pending
            using var scope = torch.NewDisposeScope();
            var work = comm.AllReduceAsync(torch.ones(4));
            nccl.BreakDevice(0);
            var e = Record.Exception(() => work.Wait());
            return $"{e?.GetType().Name}: {e?.Message}";
        }, nccl);
        Assert.StartsWith("CommunicatorException", results[0]);
        Assert.Contains("injected CUDA error", results[0]);
        Assert.Equal(2, nccl.LiveBuffers);                                 // its two buffers were kept, not freed
    }

    [Fact]
    public void Nccl_comm_blocking_is_refused_because_it_would_disable_every_deadline()
    {
        using var nccl = new NcclStandIn(deviceCount: 1);
        var e = Assert.Throws<InvalidOperationException>(() => NcclComm.InitRank(nccl, Nccl.GetUniqueId(nccl), 0, 1, DateTime.UtcNow + TimeSpan.FromSeconds(5),
            name => name == "NCCL_COMM_BLOCKING" ? "1" : null));
        Assert.Contains("NCCL_COMM_BLOCKING=1 is set", e.Message);
        Assert.Equal(0, nccl.LiveCommunicators);
    }

    [Theory]
    [InlineData(1, 8, 8, 22805, null, 1, null)]                  // one process per GPU: its local rank
    [InlineData(5, 8, 8, 22805, null, 5, null)]
    [InlineData(1, 2, 1, 22805, null, 0, "NCCL 2.28.5 refuses that")]
    [InlineData(1, 2, 1, 23007, null, 0, "NCCL_MULTI_RANK_GPU_ENABLE=1, which is not set")]
    [InlineData(1, 2, 1, 23007, "1", 0, null)]                   // 2 processes share the one GPU
    [InlineData(2, 3, 1, 23007, "1", 0, "at most 2 ranks per GPU")]
    public void A_process_gpu_is_its_local_rank_modulo_the_gpus_and_sharing_follows_nccl(int localRank, int processes, int gpus, int version, string? multiRank, int expected, string? refusal)
    {
        var env = new LaunchEnvironment("127.0.0.1", 29500, localRank, processes, localRank) { LocalWorldSize = processes };
        string? Variable(string name) => name == NcclCommunicator.MultiRankGpuVariable ? multiRank : null;
        if (refusal is null) Assert.Equal(expected, NcclCommunicator.GpuOf(env, gpus, version, Variable));
        else Assert.Contains(refusal, Assert.Throws<ArgumentException>(() => NcclCommunicator.GpuOf(env, gpus, version, Variable)).Message);
    }
}
