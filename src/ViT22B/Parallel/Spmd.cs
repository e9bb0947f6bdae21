namespace ViT22B.Parallel;

/// <summary>
/// Runs one function per rank, each on its own dedicated OS thread (TorchSharp's dispose scopes, grad mode and
/// the current CUDA stream are per thread, so ranks never share a thread and never use async/await).
/// </summary>
public static class Spmd
{
    /// <summary>
    /// Runs <paramref name="body"/>(rank) on <see cref="ThreadedWorld.Size"/> threads and returns the results by rank.
    /// The first exception on any rank poisons the world (its peers' collectives fail at once instead of hanging);
    /// after every thread has finished, all failures are thrown together, the originating one first.
    /// </summary>
    /// <exception cref="AggregateException">One or more ranks failed; inner exceptions are
    /// <see cref="RankFailedException"/>s.</exception>
    public static T[] Run<T>(ThreadedWorld world, Func<int, T> body, int stackBytes = 16 << 20)
    {
        ArgumentNullException.ThrowIfNull(world);
        return Run(world.Size, body, world.Poison, stackBytes);
    }

    /// <summary>
    /// Runs <paramref name="body"/>(rank) on <paramref name="ranks"/> threads (ranks whose communicators are not an
    /// in-process world, e.g. one NCCL communicator per local GPU) and returns the results by rank. A failing rank does
    /// not stop its peers: their collectives fail at their communicators' timeouts. After every thread has finished, all
    /// failures are thrown together, the first one first.
    /// </summary>
    /// <exception cref="AggregateException">One or more ranks failed; inner exceptions are
    /// <see cref="RankFailedException"/>s.</exception>
    public static T[] Run<T>(int ranks, Func<int, T> body, int stackBytes = 16 << 20) => Run(ranks, body, null, stackBytes);

    private static T[] Run<T>(int size, Func<int, T> body, Action<Exception>? onFailure, int stackBytes)
    {
        ArgumentNullException.ThrowIfNull(body);
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), $"At least one rank is needed, found {size}.");
        var results = new T[size];
        var failures = new RankFailedException?[size];
        var order = new long[size];
        long clock = 0;
        var threads = Enumerable.Range(0, size).Select(rank => new Thread(() =>
        {
            try
            {
                results[rank] = body(rank);
            }
            catch (Exception e)
            {
                order[rank] = Interlocked.Increment(ref clock);
                failures[rank] = new RankFailedException(rank, e);
                onFailure?.Invoke(failures[rank]!);
            }
        }, stackBytes) { Name = $"vit22b-rank-{rank}", IsBackground = true }).ToList();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        var failed = Enumerable.Range(0, size).Where(r => failures[r] is not null).OrderBy(r => order[r]).Select(r => (Exception)failures[r]!).ToList();
        if (failed.Count > 0) throw new AggregateException($"{failed.Count} of {size} ranks failed; first: {failed[0].Message}", failed);
        return results;
    }
}
