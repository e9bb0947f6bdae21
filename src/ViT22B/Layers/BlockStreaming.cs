using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>Where the time of one streamed pass went (<see cref="BlockStreaming"/>).</summary>
/// <param name="Blocks">Blocks run.</param>
/// <param name="LoadSeconds">Time spent building and loading blocks, on whichever thread did it.</param>
/// <param name="WaitSeconds">Time the computation waited for a block to be loaded (all of the loading without
/// prefetch; only what the prefetch did not hide with it).</param>
/// <param name="ComputeSeconds">Time spent running the blocks.</param>
/// <param name="LargestBlockBytes">Bytes of the largest block's parameters (one block in memory; two with prefetch).</param>
public sealed record StreamingStats(int Blocks, double LoadSeconds, double WaitSeconds, double ComputeSeconds, long LargestBlockBytes);

/// <summary>
/// Runs a stack of blocks that never exists in memory as a whole: block i is built and its weights loaded by a
/// caller-supplied function, run, and disposed before block i + 2 is loaded. With prefetch, block i + 1 is loaded on a
/// second thread while block i computes, so at most two blocks are alive; without, one. Inference only: a block is gone
/// before a backward pass could need it.
/// </summary>
internal static class BlockStreaming
{
    /// <summary>Runs <paramref name="depth"/> blocks over <paramref name="x"/>: <paramref name="load"/>(i) builds
    /// block i (outside any dispose scope), <paramref name="run"/> applies it; every block is disposed, also when one
    /// fails.</summary>
    public static (Tensor Output, StreamingStats Stats) Run<TBlock>(int depth, Func<int, TBlock> load, Func<TBlock, Tensor, Tensor> run,
        Tensor x, bool prefetch) where TBlock : nn.Module
    {
        if (torch.is_grad_enabled())
            throw new InvalidOperationException("A streamed model runs inference only: call it under torch.no_grad() or torch.inference_mode() (each block is released before a backward pass could use it).");
        long loadTicks = 0, largest = 0;
        (TBlock Block, long Ticks) Timed(int i)
        {
            long start = Stopwatch.GetTimestamp();
            var block = load(i);
            long bytes = block.parameters().Sum(p => p.numel() * p.element_size());
            Interlocked.Add(ref loadTicks, Stopwatch.GetTimestamp() - start);
            InterlockedMax(ref largest, bytes);
            return (block, Stopwatch.GetTimestamp() - start);
        }
        var wait = Stopwatch.StartNew();
        var compute = new Stopwatch();
        Task<(TBlock Block, long Ticks)>? next = null;
        TBlock? current = null;
        var h = x;
        try
        {
            current = Timed(0).Block;
            wait.Stop();
            for (int i = 0; i < depth; i++)
            {
                if (prefetch && i + 1 < depth)
                {
                    int n = i + 1;
                    next = Task.Factory.StartNew(() => Timed(n), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
                }
                compute.Start();
                var y = run(current, h);
                compute.Stop();
                if (!ReferenceEquals(h, x)) h.Dispose();
                h = y;
                current.Dispose();
                current = null;
                if (i + 1 == depth) break;
                wait.Start();
                current = next is not null ? next.GetAwaiter().GetResult().Block : Timed(i + 1).Block;
                next = null;
                wait.Stop();
            }
        }
        catch
        {
            current?.Dispose();
            if (next is not null)
            {
                try { next.GetAwaiter().GetResult().Block.Dispose(); }
                catch (Exception) { /* the first failure is the one to report */ }
            }
            if (!ReferenceEquals(h, x)) h.Dispose();
            throw;
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
