#!/usr/bin/env python3
"""Shows that the NCCL path's tests catch what they claim to: reverts, one at a time, each review fix of the NCCL
code (defects 1-7 and 12 of docs/gpu.md's table, and the later fixes: no host poll in Wait, ncclInProgress inside
a group, a failed backward region aborting its communicator) and removes each NCCL rule of the stand-in that has its own raw-call
test, then runs the tests that claim to catch it. Every line must say "caught" (for defect 5 the test then waits
forever for a peer and is stopped). The working tree is restored after each mutation; exit code 1 if one is missed.

    python3 tests/Mutations/nccl.py [1 2 thread ...]     # all, or the named ones; about 40 s each
"""
import os, subprocess, sys

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
# (name, [(file, text as it is, text with the fix reverted or the rule removed)], tests that must fail)
STAND_IN = 'tests/ViT22B.Tests/Fakes/NcclStandIn.cs'
MUTATIONS = [
 ('1 ring sizes',[('src/ViT22B/Parallel/Rings.cs','receiveRows: counts[(c - 1 + k) % k]','receiveRows: -1'),('src/ViT22B/Parallel/Rings.cs','receiveRows: counts[(r + 1 + s) % k]','receiveRows: -1')],'A_ring_step_exchanges_no_sizes_and_reads_nothing_on_the_host|A_sharded_training_step_never_exchanges_sizes'),
 ('2 group finally',[('src/ViT22B/Interop/NcclComm.cs','''            try
            {
                sent = _api.Send(send.Pointer, send.Count, send.Type, next, h, stream);
                if (Accepted(sent)) received = _api.Recv(recv.Pointer, recv.Count, recv.Type, previous, h, stream);
            }
            finally
            {
                end = _api.GroupEnd();   // a group's errors surface here
            }''','''            { sent = _api.Send(send.Pointer, send.Count, send.Type, next, h, stream);
            if (Accepted(sent)) received = _api.Recv(recv.Pointer, recv.Count, recv.Type, previous, h, stream);
            end = _api.GroupEnd(); }'''),('src/ViT22B/Interop/NcclComm.cs','NcclResult sent = NcclResult.InvalidUsage, received','NcclResult sent, received')],'An_exception_inside_a_send_receive_group_closes_the_group_and_aborts'),
 ('3 abort on invalid argument',[('src/ViT22B/Interop/NcclComm.cs','''        string last = _comm != 0 && !IsAborted ? _api.LastError(_comm) : "";
        Abort();''','''        string last = _comm != 0 && !IsAborted ? _api.LastError(_comm) : "";
        if (result != NcclResult.InvalidArgument) Abort();'''),('src/ViT22B/Cuda/NcclCommunicator.cs','var failure = e as CommunicatorException ?? Fail($"{op} could not be issued: {e.Message}", e);','var failure = e as CommunicatorException ?? new CommunicatorException($"{op} could not be issued: {e.Message}", e);')],'A_failed_call_aborts_so_that_no_later_call_pairs_with_the_wrong_peer_call'),
 ('4 abandon in flight',[('src/ViT22B/Parallel/Rings.cs','using var inFlight = s < k - 1','var inFlight = s < k - 1'),('src/ViT22B/Parallel/Rings.cs','using var inFlight = comm.PermuteAsync(acc','var inFlight = comm.PermuteAsync(acc')],'A_ring_left_by_an_exception_waits_for_its_permute_before_its_buffers_can_go'),
 ('5 init deadline',[('src/ViT22B/Interop/NcclComm.cs','if (DateTime.UtcNow > deadline)','if (DateTime.UtcNow > deadline.AddDays(1))')],'A_peer_that_never_initializes_is_a_timeout_not_a_hang'),
 ('6 contiguous',[('src/ViT22B/Cuda/NcclCommunicator.cs','''        if (d.is_contiguous()) return d;
        var c = d.contiguous();''','''        if (d.is_contiguous()) return d;
        var c = d.clone();''')],'Non_contiguous_inputs_are_sent_as_contiguous_copies'),
 ('7 known counts',[('src/ViT22B/Cuda/NcclCommunicator.cs','if (counts is null) rows = ExchangeRows(local.shape[0]);','if (counts is null || local.shape[0] >= 0) rows = ExchangeRows(local.shape[0]);')],'Unknown_sizes_cost_a_collective_and_a_host_read_known_ones_nothing'),
 ('12 wait throws after a failure',[('src/ViT22B/Cuda/NcclCommunicator.cs','''            ThrowIfFailed(w.Op);
            // The stream the buffers came from waits''','''            // The stream the buffers came from waits'''),('src/ViT22B/Cuda/NcclCommunicator.cs','''            if (current != w.Compute) w.Done.Wait(current);
            ThrowIfFailed(w.Op);''','''            if (current != w.Compute) w.Done.Wait(current);''')],'Every_wait_after_a_failure_throws_a_communicator_exception'),
 ('host sync: Wait polls the done event',[('src/ViT22B/Cuda/NcclCommunicator.cs','''            w.Done!.Wait(w.Compute);
            waited = true;''','''            while (!w.Done!.IsComplete) Thread.Yield();
            w.Done!.Wait(w.Compute);
            waited = true;''')],'A_ring_step_exchanges_no_sizes_and_reads_nothing_on_the_host'),
 ('synchronize checks nothing',[('src/ViT22B/Cuda/NcclCommunicator.cs','''            Observe();
            ThrowIfFailed("Synchronize");''','''            if (watch.Elapsed >= TimeSpan.Zero) return;''')],'Synchronize_reports_a_collective_that_never_finished'),
 ('in-group ncclInProgress refused',[('src/ViT22B/Interop/NcclComm.cs','static bool Accepted(NcclResult r) => r is NcclResult.Success or NcclResult.InProgress;','static bool Accepted(NcclResult r) => r is NcclResult.Success;')],'A_ring_step_exchanges_no_sizes_and_reads_nothing_on_the_host'),
 ('backward failure leaves the communicator usable',[('src/ViT22B/Parallel/BackwardFailures.cs','if (e is not CommunicatorException) comm.Abort(e);','')],'A_failure_inside_a_backward_region_takes_the_rank_out_of_the_group'),
    ('thread: a communicator used from a second thread', [(STAND_IN, 'else if (c.OwnerThread != thread) Violation(', 'else if (c.OwnerThread == -99) Violation(')],
     'A_communicator_used_from_a_second_thread_is_a_violation'),
    ('destroy: destroying with launches pending', [(STAND_IN, 'if (pending.Count > 0)\n                Violation(', 'if (pending.Count < 0)\n                Violation(')],
     'Destroying_a_communicator_with_launches_pending_is_a_violation'),
    ('init-group: a group mixing initialization with collectives', [(STAND_IN, 'if (hasInit && calls.Count > 0)', 'if (hasInit && calls.Count < 0)')],
     'A_group_mixing_initialization_with_collectives_is_refused_and_launches_nothing'),
    ('blocking-group: a group mixing blocking and non-blocking communicators', [(STAND_IN, 'if (calls.Select(x => x.Comm.Blocking).Distinct().Count() > 1) return', 'if (calls.Count < 0) return')],
     'A_group_mixing_blocking_and_non_blocking_communicators_is_refused_and_launches_nothing'),
    ('group-error: an error other than invalid argument inside a group', [(STAND_IN, 'if (error != NcclResult.Success) return error;', 'if (error == (NcclResult)99) return error;')],
     'An_error_other_than_invalid_argument_inside_a_group_fails_the_whole_group'),
    ('size: a buffer smaller than its count', [(STAND_IN, 'var b = Find(p, bytes);\n            if (b is null)', 'var b = Find(p, 1);\n            if (b is null)')],
     'A_buffer_smaller_than_its_count_the_legacy_stream_and_a_group_on_two_streams_are_violations'),
    ('legacy-stream: a call on the legacy default stream', [(STAND_IN, 'if (op.Stream == 0)\n', 'if (op.Stream == -1)\n')],
     'A_buffer_smaller_than_its_count_the_legacy_stream_and_a_group_on_two_streams_are_violations'),
    ('two-streams: one group on two streams', [(STAND_IN, 'if (ops.Select(o => o.Stream).Distinct().Count() > 1)', 'if (ops.Count < 0)')],
     'A_buffer_smaller_than_its_count_the_legacy_stream_and_a_group_on_two_streams_are_violations'),
]

def run(name, edits, tests):
    original = {}
    try:
        for path, fixed, reverted in edits:
            text = open(path).read()
            original.setdefault(path, text)
            if fixed not in text:
                return 'the fixed code was not found (edited since?): ' + fixed.strip().splitlines()[0]
            open(path, 'w').write(text.replace(fixed, reverted))
        build = subprocess.run(['dotnet', 'build', '-c', 'Release', 'tests/ViT22B.Tests'], capture_output=True, text=True)
        if 'Build succeeded' not in build.stdout:
            return 'the mutation does not build: ' + '; '.join(l for l in build.stdout.splitlines() if ' error ' in l)[:300]
        filter = '|'.join('FullyQualifiedName~' + t for t in tests.split('|'))
        try:
            test = subprocess.run(['dotnet', 'test', '-c', 'Release', 'tests/ViT22B.Tests', '--no-build', '--filter', filter],
                                  capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            subprocess.run(['pkill', '-f', 'ViT22B.Tests.dll'])
            return 'caught (the test hangs)'
        failed = [l.strip() for l in test.stdout.splitlines() if l.startswith('  Failed ')]
        return ('caught: ' + '; '.join(failed)) if failed else 'NOT CAUGHT: the tests pass with the fix reverted'
    finally:
        for path, text in original.items():
            open(path, 'w').write(text)


chosen = sys.argv[1:]
results = [(name, run(name, edits, tests)) for name, edits, tests in MUTATIONS if not chosen or name.split()[0].rstrip(':') in chosen]
for name, outcome in results:
    print(f'{name}: {outcome}', flush=True)
subprocess.run(['dotnet', 'build', '-c', 'Release', 'tests/ViT22B.Tests'], capture_output=True)   # the unmutated build again
sys.exit(0 if all(o.startswith('caught') for _, o in results) else 1)
