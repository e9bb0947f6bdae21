using System.Globalization;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using TorchSharp;
using ViT22B.Models;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Benchmarks;

/// <summary>What one benchmark case runs on every simulated rank.</summary>
public enum OverlapVariant
{
    /// <summary>The decomposed ring: the matmul of the chunk in hand runs while the next chunk travels.</summary>
    Overlapped,
    /// <summary>The plain collective, then the matmul.</summary>
    Plain,
    /// <summary>The collective alone (T_comm).</summary>
    CommOnly,
}

/// <summary>
/// The ViT-22B in-projection (all-gather + matmul) and out-projection (matmul + reduce-scatter) at ViT-B/16 width on
/// simulated ranks (threads of this process, each with its own token chunk), decomposed into rings vs the plain
/// collective-then-matmul. The <c>Hidden</c> column is the fraction of communication time the ring hides:
/// (T_plain − T_overlapped) / T_comm, with T_comm the collective measured alone. On a 2-core CPU the ranks share the
/// cores and a "transfer" is a memcpy, so little can be hidden; the suite reports whatever it measures.
/// </summary>
[Config(typeof(HiddenConfig))]
public class OverlapBenchmarks
{
    private RankPool _pool = null!;
    private ICommunicator[] _comms = null!;
    private Tensor[] _x = null!, _wIn = null!, _h = null!, _wOut = null!, _partial = null!;
    private long[] _counts = null!;

    /// <summary>Simulated ranks.</summary>
    [Params(2, 4)]
    public int Ranks { get; set; }

    /// <summary>Projection.</summary>
    [Params("AllGatherMatmul", "MatmulReduceScatter")]
    public string Op { get; set; } = "";

    /// <summary>Variant.</summary>
    [Params(OverlapVariant.Overlapped, OverlapVariant.Plain, OverlapVariant.CommOnly)]
    public OverlapVariant Variant { get; set; }

    /// <summary>Builds per-rank inputs: 197 tokens × batch 8, D = 768, F = 3072 (ViT-B/16 shapes).</summary>
    [GlobalSetup]
    public void Setup()
    {
        const long tokens = 197, batch = 8;
        var layout = ViTConfig.Parse("B/16").BlockOptions.Layout;   // the fused in- and out-projections' widths
        long d = layout.Dim;
        int k = Ranks;
        _counts = TokenPartition.Counts(tokens, k);
        var world = new ThreadedWorld(k, TimeSpan.FromMinutes(5));
        _comms = world.CreateGroup("tp", Enumerable.Range(0, k).ToArray());
        _pool = new RankPool(k);
        var g = new torch.Generator(0);
        _x = Enumerable.Range(0, k).Select(r => torch.randn(new[] { _counts[r], batch, d }, generator: g).DetachFromDisposeScope()).ToArray();
        _wIn = Enumerable.Range(0, k).Select(_ => torch.randn(new[] { layout.InFeatures / k, d }, generator: g).DetachFromDisposeScope()).ToArray();
        _h = Enumerable.Range(0, k).Select(_ => torch.randn(new[] { tokens, batch, layout.OutFeatures / k }, generator: g).DetachFromDisposeScope()).ToArray();
        _wOut = Enumerable.Range(0, k).Select(_ => torch.randn(new[] { d, layout.OutFeatures / k }, generator: g).DetachFromDisposeScope()).ToArray();
        _partial = Enumerable.Range(0, k).Select(_ => torch.randn(new[] { tokens, batch, d }, generator: g).DetachFromDisposeScope()).ToArray();   // what the out-projection reduce-scatters
    }

    /// <summary>One projection on every rank.</summary>
    [Benchmark]
    public void Projection() => _pool.Run(r =>
    {
        using var mode = torch.inference_mode();
        using var scope = torch.NewDisposeScope();
        var c = _comms[r];
        if (Op == "AllGatherMatmul")
        {
            if (Variant == OverlapVariant.CommOnly) c.AllGather(_x[r]);
            else Rings.AllGatherMatmul(_x[r], _wIn[r], c, _counts, Variant == OverlapVariant.Overlapped ? CommMode.Overlapped : CommMode.Plain);
        }
        else
        {
            if (Variant == OverlapVariant.CommOnly) c.ReduceScatter(_partial[r], _counts);
            else Rings.MatmulReduceScatter(_h[r], _wOut[r], c, _counts, Variant == OverlapVariant.Overlapped ? CommMode.Overlapped : CommMode.Plain);
        }
    });

    /// <summary>Stops the rank threads.</summary>
    [GlobalCleanup]
    public void Cleanup() => _pool.Dispose();

    private sealed class HiddenConfig : ManualConfig
    {
        public HiddenConfig() => AddColumn(new HiddenColumn());
    }

    /// <summary>(T_plain − T_overlapped) / T_comm for the Overlapped rows, from the other rows of the same run.</summary>
    private sealed class HiddenColumn() : ComputedColumn("Hidden",
        "Fraction of the collective's time hidden by the ring: (T_plain − T_overlapped) / T_comm")
    {
        public override string GetValue(Summary summary, BenchmarkCase benchmarkCase)
        {
            object? P(BenchmarkCase b, string name) => b.Parameters.Items.FirstOrDefault(i => i.Name == name)?.Value;
            if (!Equals(P(benchmarkCase, nameof(Variant)), OverlapVariant.Overlapped)) return "-";
            double? Mean(OverlapVariant v)
            {
                var other = summary.BenchmarksCases.FirstOrDefault(b => Equals(P(b, nameof(Variant)), v)
                    && Equals(P(b, nameof(Ranks)), P(benchmarkCase, nameof(Ranks))) && Equals(P(b, nameof(Op)), P(benchmarkCase, nameof(Op))));
                return other is null ? null : summary[other]?.ResultStatistics?.Mean;
            }
            double? over = Mean(OverlapVariant.Overlapped), plain = Mean(OverlapVariant.Plain), comm = Mean(OverlapVariant.CommOnly);
            if (over is null || plain is null || comm is null || comm <= 0) return "n/a";
            return ((plain.Value - over.Value) / comm.Value).ToString("P0", CultureInfo.InvariantCulture);
        }
    }
}

/// <summary>k dedicated threads (one per simulated rank) that run a job together and wait for all to finish.</summary>
public sealed class RankPool : IDisposable
{
    private readonly Thread[] _threads;
    private readonly Barrier _start, _done;
    private Action<int>? _job;
    private volatile bool _stop;
    private Exception? _failure;

    /// <summary>Starts <paramref name="ranks"/> threads.</summary>
    public RankPool(int ranks)
    {
        _start = new Barrier(ranks + 1);
        _done = new Barrier(ranks + 1);
        _threads = Enumerable.Range(0, ranks).Select(r => new Thread(() =>
        {
            while (true)
            {
                _start.SignalAndWait();
                if (_stop) return;
                try { _job!(r); }
                catch (Exception e) { _failure ??= e; }
                _done.SignalAndWait();
            }
        }) { IsBackground = true, Name = $"bench-rank-{r}" }).ToArray();
        foreach (var t in _threads) t.Start();
    }

    /// <summary>Runs <paramref name="job"/>(rank) on every rank thread and waits.</summary>
    public void Run(Action<int> job)
    {
        _job = job;
        _start.SignalAndWait();
        _done.SignalAndWait();
        if (_failure is { } f) throw new InvalidOperationException("A rank failed.", f);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        _stop = true;
        _start.SignalAndWait();
        foreach (var t in _threads) t.Join();
        _start.Dispose();
        _done.Dispose();
    }
}
