using TorchSharp;
using ViT22B.Cuda;
using ViT22B.Interop;
using ViT22B.Tests.Fakes;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests.Cuda;

/// <summary>The stand-in is at least as strict as NCCL: each test breaks one rule with raw calls and expects it caught.</summary>
public sealed unsafe class NcclStandInTests
{
    // Two ranks of one communicator, both driven from the test thread (non-blocking init allows it).
    private static (NcclStandIn Nccl, nint[] Comms, nint[] Streams) Pair(bool multiRankGpu = false, int device1 = 1)
    {
        var nccl = new NcclStandIn(deviceCount: 2, multiRankGpu: multiRankGpu);
        var id = Nccl.GetUniqueId(nccl);
        var config = NcclConfig.NonBlocking();
        var comms = new nint[2];
        var streams = new nint[2];
        for (int r = 0; r < 2; r++)
        {
            int device = r == 0 ? 0 : device1;
            nccl.MakeCurrent(device);
            nint c;
            Assert.Equal(NcclResult.InProgress, nccl.CommInitRankConfig(&c, 2, id, r, &config));
            comms[r] = c;
            streams[r] = nccl.CreateCommStream(device, false);
        }
        foreach (var c in comms) Poll(nccl, c);
        return (nccl, comms, streams);
    }

    private static NcclResult Poll(NcclStandIn nccl, nint comm)
    {
        NcclResult state;
        do Assert.Equal(NcclResult.Success, nccl.CommGetAsyncError(comm, &state));
        while (state == NcclResult.InProgress);
        return state;
    }

    // The ready-event discipline: the communication stream waits on an event of the compute stream first.
    private static void Ready(NcclStandIn nccl, int device, nint stream)
    {
        var e = nccl.CreateEvent(device);
        e.Record(nccl.CurrentStream(device));
        e.Wait(stream);
    }

    // Rank r's all-reduce of x into y, issued as the communicator does it (ready event first, polled until issued).
    private static void AllReduce(NcclStandIn nccl, nint[] comms, nint[] streams, int r, Tensor x, Tensor y)
    {
        Ready(nccl, r, streams[r]);
        nccl.AllReduce(Buffer(nccl, r, x), Buffer(nccl, r, y), (nuint)x.numel(), NcclDataType.Float32, NcclRedOp.Sum, comms[r], streams[r]);
        Poll(nccl, comms[r]);
    }

    // A buffer of rank r: registered from the thread with r's device current, as a rank's own thread would.
    private static nint Buffer(NcclStandIn nccl, int device, Tensor t)
    {
        nccl.MakeCurrent(device);
        return nccl.DataPointer(t);
    }

    [Fact]
    public void Initialization_is_in_progress_until_every_rank_has_joined()
    {
        using var nccl = new NcclStandIn(deviceCount: 2);
        var id = Nccl.GetUniqueId(nccl);
        var config = NcclConfig.NonBlocking();
        nccl.MakeCurrent(0);
        nint c;
        Assert.Equal(NcclResult.InProgress, nccl.CommInitRankConfig(&c, 2, id, 0, &config));
        NcclResult state;
        nccl.CommGetAsyncError(c, &state);
        Assert.Equal(NcclResult.InProgress, state);
        var bad = config with { Magic = 0 };
        nint c2;
        Assert.Equal(NcclResult.InvalidArgument, nccl.CommInitRankConfig(&c2, 2, id, 1, &bad));   // not NCCL_CONFIG_INITIALIZER
    }

    [Fact]
    public void Two_ranks_on_one_device_are_refused_unless_allowed()
    {
        using var nccl = new NcclStandIn(deviceCount: 1);
        var id = Nccl.GetUniqueId(nccl);
        var config = NcclConfig.NonBlocking();
        nccl.MakeCurrent(0);
        nint a, b;
        Assert.Equal(NcclResult.InProgress, nccl.CommInitRankConfig(&a, 2, id, 0, &config));
        Assert.Equal(NcclResult.InvalidUsage, nccl.CommInitRankConfig(&b, 2, id, 1, &config));
        var (allowed, comms, _) = Pair(multiRankGpu: true, device1: 0);
        using (allowed) Assert.All(comms, c => Assert.Equal(NcclResult.Success, Poll(allowed, c)));
    }

    [Fact]
    public void Calls_in_an_open_group_launch_nothing_and_an_event_recorded_then_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        nint bx = Buffer(nccl, 0, x), by = Buffer(nccl, 0, y);
        Assert.Equal(NcclResult.Success, nccl.GroupStart());
        Assert.Equal(NcclResult.InProgress, nccl.AllReduce(bx, by, 4, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]));
        Assert.Empty(nccl.LaunchesOf(0));
        Assert.Equal(1, nccl.GroupDepth);
        nccl.CreateEvent(0).Record(streams[0]);
        Assert.Contains(nccl.Violations, v => v.Contains("ncclGroupEnd not called"));
        Assert.Equal(NcclResult.InProgress, nccl.GroupEnd());
        Assert.Single(nccl.LaunchesOf(0));
    }

    [Fact]
    public void An_event_recorded_before_an_in_progress_call_was_polled_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        Assert.Equal(NcclResult.InProgress, nccl.AllReduce(Buffer(nccl, 0, x), Buffer(nccl, 0, y), 4, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]));
        nccl.CreateEvent(0).Record(streams[0]);
        Assert.Contains(nccl.Violations, v => v.Contains("still being issued"));
    }

    [Fact]
    public void A_launch_without_a_wait_on_the_compute_stream_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        nccl.AllReduce(Buffer(nccl, 0, x), Buffer(nccl, 0, y), 4, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]);
        Assert.Contains(nccl.Violations, v => v.Contains("had not waited for an event of the compute stream"));
    }

    [Fact]
    public void Releasing_a_buffer_of_a_pending_launch_and_changing_a_send_buffer_are_violations()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        var x0 = torch.ones(4);
        var y0 = torch.empty(4);
        using var x1 = torch.ones(4);
        using var y1 = torch.empty(4);
        AllReduce(nccl, comms, streams, 0, x0, y0);
        nccl.Release(y0);                                   // rank 1 has not called yet: the launch is pending
        Assert.Contains(nccl.Violations, v => v.Contains("released while AllReduce"));
        AllReduce(nccl, comms, streams, 1, x1, y1);
        Assert.Contains(nccl.Violations, v => v.Contains("after one of its buffers was released"));
    }

    [Fact]
    public void A_send_buffer_changed_before_the_launch_runs_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x0 = torch.ones(4);
        using var y0 = torch.empty(4);
        using var x1 = torch.ones(4);
        using var y1 = torch.empty(4);
        AllReduce(nccl, comms, streams, 0, x0, y0);
        x0.FillInPlace(5);
        AllReduce(nccl, comms, streams, 1, x1, y1);
        Assert.Contains(nccl.Violations, v => v.Contains("send buffer changed"));
    }

    [Fact]
    public void A_send_buffer_changed_after_the_launch_ran_but_before_it_was_given_back_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        var x0 = torch.ones(4);
        using var y0 = torch.empty(4);
        using var x1 = torch.ones(4);
        using var y1 = torch.empty(4);
        AllReduce(nccl, comms, streams, 0, x0, y0);
        AllReduce(nccl, comms, streams, 1, x1, y1);
        x0.FillInPlace(5);                                  // the collective has run; the caller has not waited yet
        nccl.Release(x0);
        Assert.Contains(nccl.Violations, v => v.Contains("modified before the communicator gave it back"));
    }

    [Fact]
    public void Buffers_of_another_device_and_overlaps_outside_the_in_place_layouts_are_refused()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(8);
        nint onDevice1 = Buffer(nccl, 1, x);
        Ready(nccl, 0, streams[0]);
        Assert.Equal(NcclResult.InvalidArgument, nccl.AllReduce(onDevice1, onDevice1, 8, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]));
        Assert.Contains(nccl.Violations, v => v.Contains("belongs to device 1"));
        using var big = torch.ones(8);
        nint p = Buffer(nccl, 1, big);
        // An all-gather of 4 elements in place must send from rank 1's block (offset 4), not from offset 2.
        Assert.Equal(NcclResult.InvalidArgument, nccl.AllGather(p + 8, p, 4, NcclDataType.Float32, comms[1], streams[1]));
        Assert.Contains(nccl.Violations, v => v.Contains("overlap outside NCCL's in-place layout"));
        Ready(nccl, 1, streams[1]);
        Assert.Equal(NcclResult.InProgress, nccl.AllGather(p + 16, p, 4, NcclDataType.Float32, comms[1], streams[1]));
    }

    [Fact]
    public void Communicators_issued_in_different_orders_by_two_ranks_deadlock()
    {
        // NCCL needs the collectives of one device's communicators in one order on every rank; the stand-in runs each
        // host thread's launches on a device in issue order, so crossed orders never complete.
        var (nccl, first, streamsA) = Pair();
        using var _ = nccl;
        var id = Nccl.GetUniqueId(nccl);
        var config = NcclConfig.NonBlocking();
        var second = new nint[2];
        var streamsB = new nint[2];
        for (int r = 0; r < 2; r++)
        {
            nccl.MakeCurrent(r);
            nint c;
            nccl.CommInitRankConfig(&c, 2, id, r, &config);
            second[r] = c;
            streamsB[r] = nccl.CreateCommStream(r, false);
        }
        foreach (var c in second) Poll(nccl, c);
        var done = new IDeviceEvent[2];
        // Rank 0 issues on the first communicator, then the second; rank 1 the other way round. Each rank is a thread.
        var threads = Enumerable.Range(0, 2).Select(r => new Thread(() =>
        {
            using var x = torch.ones(4);
            using var y = torch.empty(4);
            using var z = torch.empty(4);
            var order = r == 0 ? new[] { (first[r], streamsA[r], y), (second[r], streamsB[r], z) } : new[] { (second[r], streamsB[r], z), (first[r], streamsA[r], y) };
            foreach (var (comm, stream, output) in order)
            {
                Ready(nccl, r, stream);
                nccl.AllReduce(Buffer(nccl, r, x), Buffer(nccl, r, output), 4, NcclDataType.Float32, NcclRedOp.Sum, comm, stream);
                Poll(nccl, comm);
                (done[r] = nccl.CreateEvent(r)).Record(stream);
            }
            Thread.Sleep(200);
            Assert.False(done[r].IsComplete);
            foreach (var c in new[] { first[r], second[r] }) nccl.CommAbort(c);
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
    }

    [Fact]
    public void Launches_that_differ_fail_every_rank_with_every_rank_named()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var scope = torch.NewDisposeScope();   // the launches' buffers stay alive until the launches run
        for (int r = 0; r < 2; r++) AllReduce(nccl, comms, streams, r, torch.ones(2), torch.empty(2));   // launch #0 matches
        for (int r = 0; r < 2; r++)
        {
            var x = torch.ones(4);
            var y = torch.empty(8);
            Ready(nccl, r, streams[r]);
            nccl.AllGather(Buffer(nccl, r, x), Buffer(nccl, r, y), r == 0 ? 4u : 3u, NcclDataType.Float32, comms[r], streams[r]);
        }
        foreach (var c in comms)
        {
            NcclResult state;
            nccl.CommGetAsyncError(c, &state);
            Assert.Equal(NcclResult.InvalidUsage, state);
            Assert.Contains("launch #1 does not match", nccl.LastError(c));
            Assert.Contains("rank 0 issued AllGather(4 × Float32); rank 1 issued AllGather(3 × Float32)", nccl.LastError(c));
            // Both sequences, so the call that went astray can be found.
            Assert.Contains("rank 0: [AllReduce(Sum, 2 × Float32), AllGather(4 × Float32)]; rank 1: [AllReduce(Sum, 2 × Float32), AllGather(3 × Float32)]", nccl.LastError(c));
        }
    }

    [Fact]
    public void An_aborted_rank_leaves_its_peer_waiting_and_its_handle_dead()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        Ready(nccl, 1, streams[1]);
        nccl.AllReduce(Buffer(nccl, 1, x), Buffer(nccl, 1, y), 4, NcclDataType.Float32, NcclRedOp.Sum, comms[1], streams[1]);
        Poll(nccl, comms[1]);
        var done = nccl.CreateEvent(1);
        done.Record(streams[1]);
        Assert.Equal(NcclResult.Success, nccl.CommAbort(comms[0]));
        Assert.False(done.IsComplete);                       // rank 1 waits for rank 0, which will never call
        NcclResult state;
        Assert.Equal(NcclResult.InvalidArgument, nccl.CommGetAsyncError(comms[0], &state));
        Assert.Contains(nccl.Violations, v => v.Contains("already aborted or destroyed"));
    }

    [Fact]
    public void A_communicator_used_from_a_second_thread_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        using var y2 = torch.empty(4);
        AllReduce(nccl, comms, streams, 0, x, y);                  // the test thread now uses rank 0's communicator
        Assert.Empty(nccl.Violations);
        var other = new Thread(() => AllReduce(nccl, comms, streams, 0, x, y2));
        other.Start();
        other.Join();
        Assert.Contains(nccl.Violations, v => v.Contains("from a second thread"));
    }

    [Fact]
    public void Destroying_a_communicator_with_launches_pending_is_a_violation()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        AllReduce(nccl, comms, streams, 1, x, y);                  // rank 0 never calls: the launch stays pending
        Assert.Empty(nccl.Violations);
        Assert.Equal(NcclResult.Success, nccl.CommDestroy(comms[1]));
        Assert.Contains(nccl.Violations, v => v.Contains("ncclCommDestroy") && v.Contains("still pending"));
    }

    [Fact]
    public void A_group_mixing_initialization_with_collectives_is_refused_and_launches_nothing()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        nint bx = Buffer(nccl, 0, x), by = Buffer(nccl, 0, y);
        var id = Nccl.GetUniqueId(nccl);
        var config = NcclConfig.NonBlocking();
        nint extra;
        Assert.Equal(NcclResult.Success, nccl.GroupStart());
        Assert.Equal(NcclResult.InProgress, nccl.CommInitRankConfig(&extra, 1, id, 0, &config));
        Assert.Equal(NcclResult.InProgress, nccl.AllReduce(bx, by, 4, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]));
        Assert.Equal(NcclResult.InvalidUsage, nccl.GroupEnd());
        Assert.Contains(nccl.Violations, v => v.Contains("both communicator initialization and collectives"));
        Assert.Empty(nccl.LaunchesOf(0));
    }

    [Fact]
    public void A_group_mixing_blocking_and_non_blocking_communicators_is_refused_and_launches_nothing()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        var id = Nccl.GetUniqueId(nccl);
        var blocking = NcclConfig.NonBlocking() with { Blocking = 1 };
        nccl.MakeCurrent(0);
        nint solo;
        Assert.Equal(NcclResult.Success, nccl.CommInitRankConfig(&solo, 1, id, 0, &blocking));   // one rank: complete at once
        nint soloStream = nccl.CreateCommStream(0, false);
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        using var x2 = torch.ones(4);
        using var y2 = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        Ready(nccl, 0, soloStream);
        nint bx = Buffer(nccl, 0, x), by = Buffer(nccl, 0, y), bx2 = Buffer(nccl, 0, x2), by2 = Buffer(nccl, 0, y2);
        Assert.Equal(NcclResult.Success, nccl.GroupStart());
        Assert.Equal(NcclResult.InProgress, nccl.AllReduce(bx, by, 4, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]));
        Assert.Equal(NcclResult.Success, nccl.AllReduce(bx2, by2, 4, NcclDataType.Float32, NcclRedOp.Sum, solo, soloStream));
        Assert.Equal(NcclResult.InvalidArgument, nccl.GroupEnd());
        Assert.Empty(nccl.LaunchesOf(0));
        Assert.Equal(NcclResult.Success, nccl.CommDestroy(solo));
    }

    [Fact]
    public void An_error_other_than_invalid_argument_inside_a_group_fails_the_whole_group()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        nint bx = Buffer(nccl, 0, x), by = Buffer(nccl, 0, y);
        // "Invalid argument" only: that call had no effect, the rest of the group is launched.
        nccl.FailNextCall(0, "ncclSend", NcclResult.InvalidArgument);
        Assert.Equal(NcclResult.Success, nccl.GroupStart());
        Assert.Equal(NcclResult.InvalidArgument, nccl.Send(bx, 4, NcclDataType.Float32, 1, comms[0], streams[0]));
        Assert.Equal(NcclResult.InProgress, nccl.Recv(by, 4, NcclDataType.Float32, 1, comms[0], streams[0]));
        Assert.NotEqual(NcclResult.InvalidArgument, nccl.GroupEnd());
        Assert.Single(nccl.LaunchesOf(0));
        Poll(nccl, comms[0]);
        // Any other error: nothing of the group is launched, and ncclGroupEnd reports it.
        using var y2 = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        nint by2 = Buffer(nccl, 0, y2);
        nccl.FailNextCall(0, "ncclSend", NcclResult.SystemError);
        Assert.Equal(NcclResult.Success, nccl.GroupStart());
        Assert.Equal(NcclResult.SystemError, nccl.Send(bx, 4, NcclDataType.Float32, 1, comms[0], streams[0]));
        Assert.Equal(NcclResult.InProgress, nccl.Recv(by2, 4, NcclDataType.Float32, 1, comms[0], streams[0]));
        Assert.Equal(NcclResult.SystemError, nccl.GroupEnd());
        Assert.Single(nccl.LaunchesOf(0));
        Assert.Equal(0, nccl.GroupDepth);
    }

    [Fact]
    public void A_buffer_smaller_than_its_count_the_legacy_stream_and_a_group_on_two_streams_are_violations()
    {
        var (nccl, comms, streams) = Pair();
        using var _ = nccl;
        using var x = torch.ones(4);
        using var y = torch.empty(4);
        Ready(nccl, 0, streams[0]);
        nint bx = Buffer(nccl, 0, x), by = Buffer(nccl, 0, y);
        Assert.Equal(NcclResult.InvalidArgument, nccl.AllReduce(bx, by, 5, NcclDataType.Float32, NcclRedOp.Sum, comms[0], streams[0]));
        Assert.Contains(nccl.Violations, v => v.Contains("is not a live buffer of that size"));
        Assert.Equal(NcclResult.InvalidArgument, nccl.AllReduce(bx, by, 4, NcclDataType.Float32, NcclRedOp.Sum, comms[0], 0));
        Assert.Contains(nccl.Violations, v => v.Contains("legacy default stream"));
        nint second = nccl.CreateCommStream(0, false);
        Ready(nccl, 0, second);
        using var y2 = torch.empty(4);
        nint by2 = Buffer(nccl, 0, y2);
        Assert.Equal(NcclResult.Success, nccl.GroupStart());
        nccl.Send(bx, 4, NcclDataType.Float32, 1, comms[0], streams[0]);
        nccl.Recv(by2, 4, NcclDataType.Float32, 1, comms[0], second);
        nccl.GroupEnd();
        Assert.Contains(nccl.Violations, v => v.Contains("used several streams"));
    }
}
