namespace ViT22B.Parallel;

/// <summary>
/// The shared state of an in-process world: ranks are threads of one process (PyTorch's threaded process group is
/// the model). Holds the timeout, the optional delay injection used by tests, and the poison flag: the first
/// failure on any rank poisons the world, wakes every waiting rank and makes every later collective fail with a
/// message naming the failed rank.
/// </summary>
public sealed class ThreadedWorld
{
    private readonly Lock _poisonLock = new();
    private readonly List<ThreadedGroup> _groups = new();
    private volatile Exception? _poison;
    private readonly Func<int, TimeSpan>? _delay;

    /// <summary>Creates a world of <paramref name="size"/> ranks.</summary>
    /// <param name="size">Number of ranks (threads).</param>
    /// <param name="timeout">How long a rank waits for its peers to reach a collective (default 5 minutes: a peer may
    /// legitimately be computing a large matmul on a CPU).</param>
    /// <param name="delay">Optional delay injected before each rank's contribution is delivered (tests use random
    /// delays to check that results do not depend on timing); it receives the world rank.</param>
    public ThreadedWorld(int size, TimeSpan? timeout = null, Func<int, TimeSpan>? delay = null)
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), $"A world needs at least one rank, found {size}.");
        Size = size;
        Timeout = timeout ?? TimeSpan.FromMinutes(5);
        if (Timeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(timeout), "The timeout must be positive.");
        _delay = delay;
    }

    /// <summary>Number of ranks.</summary>
    public int Size { get; }

    /// <summary>How long a rank waits for its peers.</summary>
    public TimeSpan Timeout { get; }

    /// <summary>True once any rank has failed.</summary>
    public bool IsPoisoned => _poison is not null;

    /// <summary>Creates a group over the given world ranks and returns one communicator per member (index = group rank).
    /// Create all groups before starting the rank threads.</summary>
    public ThreadedCommunicator[] CreateGroup(string name, IReadOnlyList<int> worldRanks)
    {
        ArgumentNullException.ThrowIfNull(worldRanks);
        if (worldRanks.Count == 0) throw new ArgumentException($"Group '{name}' has no ranks.", nameof(worldRanks));
        foreach (int r in worldRanks)
            if (r < 0 || r >= Size) throw new ArgumentException($"Group '{name}' names rank {r}, but the world has {Size} ranks.", nameof(worldRanks));
        if (worldRanks.Distinct().Count() != worldRanks.Count) throw new ArgumentException($"Group '{name}' lists a rank twice.", nameof(worldRanks));
        var group = new ThreadedGroup(this, name, worldRanks.ToArray());
        lock (_poisonLock) _groups.Add(group);
        return Enumerable.Range(0, worldRanks.Count).Select(i => new ThreadedCommunicator(group, i)).ToArray();
    }

    /// <summary>Marks the world failed (first failure wins) and wakes every waiting rank.</summary>
    public void Poison(Exception reason)
    {
        ThreadedGroup[] groups;
        lock (_poisonLock)
        {
            _poison ??= reason;
            groups = _groups.ToArray();
        }
        foreach (var g in groups) g.WakeAll();
    }

    internal void ThrowIfPoisoned(string where)
    {
        var p = _poison;
        if (p is not null)
            throw new CommunicatorException($"{where}: the world is poisoned: {p.Message}", p);
    }

    internal TimeSpan DelayFor(int worldRank) => _delay?.Invoke(worldRank) ?? TimeSpan.Zero;
}
