using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.ExceptionServices;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>Where the time of one streamed pass went (<see cref="BlockStreaming"/>).</summary>
/// <param name="Blocks">Blocks run.</param>
/// <param name="LoadSeconds">Time spent building and loading blocks, on whichever thread did it.</param>
/// <param name="WaitSeconds">Time the computation waited for a block to be loaded (all of the loading without
/// prefetch; only what the prefetch did not hide with it).</param>
/// <param name="ComputeSeconds">Time spent running the blocks. On a GPU, the time to queue their kernels: the GPU's
/// own time shows in the next block's load, whose copy to the device waits for the stream.</param>
/// <param name="LargestBlockBytes">Bytes of the largest block's parameters (one block in memory; two with prefetch).</param>
public sealed record StreamingStats(int Blocks, double LoadSeconds, double WaitSeconds, double ComputeSeconds, long LargestBlockBytes);

/// <summary>
/// Runs a stack of blocks that never exists in memory as a whole: block i is built and its weights loaded by a
/// caller-supplied function, run, and disposed before block i + 2 is loaded. With prefetch, block i + 1 is loaded on a
/// second thread while block i computes, so at most two blocks are alive; without, one. Inference only: a block is gone
/// before a backward pass could need it.
/// <para>On a GPU the prefetch thread builds its blocks in host memory and the computing thread moves each to the
/// device just before running it. Built on the device by the prefetch thread, a block's memory would belong to that
/// thread's CUDA stream in libtorch's caching allocator: released after its kernels were queued on the computing
/// stream (a rank thread computes on a stream of its own), it could be handed to the next block's copy while those
/// kernels still read it. Moved by the computing thread, the block is allocated, used and released on one stream. So
/// on a GPU one block is on the device at a time and up to two wait in host memory, and the host-to-device copy is not
/// overlapped with the computation. Not run on a GPU yet.</para>
/// </summary>
internal static class BlockStreaming
{
    /// <summary>Runs <paramref name="depth"/> blocks over <paramref name="x"/>: <paramref name="load"/>(i, device)
    /// builds block i on that device (outside any dispose scope), <paramref name="run"/> applies it; every block is
    /// disposed, also when one fails. Blocks run on <paramref name="x"/>'s device.</summary>
    public static (Tensor Output, StreamingStats Stats) Run<TBlock>(int depth, Func<int, Device, TBlock> load, Func<TBlock, Tensor, Tensor> run,
        Tensor x, bool prefetch) where TBlock : nn.Module
    {
        if (depth < 1) throw new ArgumentOutOfRangeException(nameof(depth), $"A block stack needs at least one block, found {depth}.");
        if (torch.is_grad_enabled())
            throw new InvalidOperationException("A streamed model runs inference only: call it under torch.no_grad() or torch.inference_mode() (each block is released before a backward pass could use it).");
        var device = x.device;
        bool hostStaged = device.type != DeviceType.CPU;   // see the class comment
        var prefetchOn = hostStaged ? torch.CPU : device;
        long loadTicks = 0, largest = 0;
        (TBlock Block, long Ticks) Timed(int i, Device on)
        {
            long start = Stopwatch.GetTimestamp();
            var block = load(i, on);
            long bytes = block.parameters().Sum(p => p.numel() * p.element_size());
            Interlocked.Add(ref loadTicks, Stopwatch.GetTimestamp() - start);
            InterlockedMax(ref largest, bytes);
            return (block, Stopwatch.GetTimestamp() - start);
        }
        // A prefetched block staged in host memory, moved to the device on this thread (its stream).
        TBlock ToDevice(TBlock block)
        {
            if (!hostStaged) return block;
            long start = Stopwatch.GetTimestamp();
            try
            {
                block.to(device);
            }
            catch
            {
                block.Dispose();
                throw;
            }
            Interlocked.Add(ref loadTicks, Stopwatch.GetTimestamp() - start);
            return block;
        }
        var wait = Stopwatch.StartNew();
        var compute = new Stopwatch();
        // One loader thread for the whole pass (a thread per block left about 200 KB of native memory behind each until a
        // garbage collection; measured): it loads block i + 1 while block i computes, and block i + 2 only once block i
        // is released, so at most two blocks are alive.
        using var ready = new BlockingCollection<(TBlock? Block, Exception? Failure)>(boundedCapacity: 1);
        using var stop = new CancellationTokenSource();
        using var released = new SemaphoreSlim(1);
        Thread? loader = null;
        if (prefetch && depth > 1)
        {
            loader = new Thread(() =>
            {
                for (int n = 1; n < depth; n++)
                {
                    try { released.Wait(stop.Token); }
                    catch (OperationCanceledException) { return; }
                    (TBlock?, Exception?) item;
                    try { item = (Timed(n, prefetchOn).Block, null); }
                    catch (Exception e) { item = (null, e); }
                    try { ready.Add(item, stop.Token); }
                    catch (OperationCanceledException) { item.Item1?.Dispose(); return; }
                    if (item.Item2 is not null) return;
                }
            }) { IsBackground = true, Name = "ViT22B block prefetch" };
        }
        TBlock? current = null;
        var h = x;
        try
        {
            current = Timed(0, device).Block;
            loader?.Start();
            wait.Stop();
            for (int i = 0; i < depth; i++)
            {
                compute.Start();
                var y = run(current!, h);
                compute.Stop();
                if (!ReferenceEquals(h, x)) h.Dispose();
                h = y;
                current.Dispose();
                current = null;
                released.Release();
                if (i + 1 == depth) break;
                wait.Start();
                if (loader is null) current = Timed(i + 1, device).Block;
                else
                {
                    var (block, failure) = ready.Take();
                    if (failure is not null) ExceptionDispatchInfo.Capture(failure).Throw();
                    current = ToDevice(block!);
                }
                wait.Stop();
            }
        }
        catch
        {
            current?.Dispose();
            if (!ReferenceEquals(h, x)) h.Dispose();
            throw;
        }
        finally
        {
            // The loader may hold the next block (or be loading it): stop it, and release whatever it still hands over.
            stop.Cancel();
            if (loader is not null && loader.IsAlive) loader.Join();
            while (ready.TryTake(out var left)) left.Block?.Dispose();
        }
        var stats = new StreamingStats(depth, (double)loadTicks / Stopwatch.Frequency, wait.Elapsed.TotalSeconds, compute.Elapsed.TotalSeconds, largest);
        return (ReferenceEquals(h, x) ? x.alias() : h, stats);
    }

    private static void InterlockedMax(ref long target, long value)
    {
        long seen;
        while (value > (seen = Volatile.Read(ref target)) && Interlocked.CompareExchange(ref target, value, seen) != seen) { }
    }
}
