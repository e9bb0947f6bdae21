using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Data;
using ViT22B.Interop;
using ViT22B.Models;
using ViT22B.Training;
using static TorchSharp.torch;

namespace ViT22B.Tests.Training;

// Model initialization draws from libtorch's process-wide default generator; tests running in parallel would draw
// from it between torch.manual_seed and the model's construction, so these tests (which compare separately built
// runs and need reproducible inits) run alone.
[CollectionDefinition("global generator", DisableParallelization = true)]
public sealed class GlobalGeneratorCollection;

[Collection("global generator")]
public sealed class TrainerTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vit22b-train-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly ViTConfig Config = new()
    {
        ImgSize = 8, PatchSize = 4, InChans = 1, EmbedDim = 16, Depth = 1, NumHeads = 2, MlpDim = 32, NumClasses = 4,
    };

    // Class c lights up quadrant c of an 8×8 image, plus noise; a model must learn where the light is.
    private static TensorDataset Quadrants(int count, int seed, float nanAt = -1)
    {
        var gen = new Random(seed);
        var images = new float[count * 64];
        var labels = new long[count];
        for (int n = 0; n < count; n++)
        {
            int c = n % 4;
            labels[n] = c;
            for (int y = 0; y < 8; y++)
                for (int x = 0; x < 8; x++)
                    images[n * 64 + y * 8 + x] = (float)(0.3 * gen.NextDouble() + ((y / 4) * 2 + x / 4 == c ? 0.6 : 0));
        }
        if (nanAt >= 0) images[(int)nanAt * 64] = float.NaN;
        using var t = torch.tensor(images, new long[] { count, 1, 8, 8 });
        using var l = torch.tensor(labels);
        return new TensorDataset(t, l, new[] { "tl", "tr", "bl", "br" }, Transforms.Compose(Transforms.HorizontalFlip(0.0), Transforms.Normalize(PixelNormalization.MinusOneToOne)));
    }

    private sealed record Run(VisionTransformer Model, Optimizer Optimizer, LearningRateSchedule Schedule, Trainer Trainer) : IDisposable
    {
        public void Dispose()
        {
            Optimizer.Dispose();
            Model.Dispose();
        }
    }

    private static Run NewRun(string? checkpoint = null, ViTConfig? config = null, bool adafactor = false, long totalSteps = 40)
    {
        torch.manual_seed(1);
        var model = new VisionTransformer(config ?? Config, torch.CPU, ScalarType.Float32);
        var ps = Optimizer.WithWeightDecay(model, 1e-4, 1e-2);
        Optimizer opt = adafactor ? new Adafactor(ps, minDimSizeToFactor: 8) : new AdamW(ps);
        var schedule = new LearningRateSchedule { PeakLr = adafactor ? 1e-2 : 3e-3, TotalSteps = totalSteps, Decay = DecayKind.Cosine, WarmupSteps = 4 }.Validate();
        var trainer = new Trainer(model, opt, schedule, new TrainerOptions { CheckpointPath = checkpoint, LogEverySteps = 1000 });
        return new Run(model, opt, schedule, trainer);
    }

    private static DataLoader Loader(IDataset ds, int workers = 1) => new(ds, new DataLoaderOptions { BatchSize = 16, Seed = 3, Workers = workers });

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_tiny_run_learns(bool adafactor)
    {
        using var train = Quadrants(160, 0);
        using var test = Quadrants(64, 1);
        using var run = NewRun(adafactor: adafactor, totalSteps: 40);
        var before = run.Trainer.Evaluate(Loader(test));
        var results = run.Trainer.Fit(Loader(train), epochs: 4, eval: Loader(test));
        Assert.Equal(4, results.Count);
        Assert.Equal(40, run.Trainer.Step);
        var after = results[^1].Eval!;
        Assert.True(after.Loss < 0.5 * before.Loss, $"test loss {before.Loss:F3} → {after.Loss:F3}");
        Assert.True(after.Top1 > 0.9, $"test top-1 {after.Top1:P1}");
        Assert.True(results[^1].TrainLoss < results[0].TrainLoss);
    }

    [Fact]
    public void Resuming_from_a_checkpoint_is_bit_identical()
    {
        using var train = Quadrants(96, 0);   // 6 batches per epoch; stop mid-epoch at step 9
        string ckpt = Path.Combine(_dir, "resume.safetensors");
        using var straight = NewRun(totalSteps: 18);
        straight.Trainer.Fit(Loader(train, workers: 2), epochs: 3);

        using (var first = NewRun(ckpt, totalSteps: 18))
            first.Trainer.Fit(Loader(train, workers: 2), epochs: 3, maxSteps: 9);
        using var resumed = NewRun(ckpt, totalSteps: 18);
        torch.manual_seed(12345);   // the checkpoint restores the generator state
        resumed.Trainer.LoadCheckpoint(ckpt);
        Assert.Equal(new TrainingPosition(9, 1, 3), resumed.Trainer.Position);
        resumed.Trainer.Fit(Loader(train, workers: 0), epochs: 3);

        Assert.Equal(18, resumed.Trainer.Step);
        var a = straight.Model.state_dict();
        var b = resumed.Model.state_dict();
        foreach (var (k, t) in a) Assert.True(TensorAssert.Same(t, b[k]), $"{k} differs after resuming");
        foreach (var (k, t) in straight.Optimizer.State) Assert.True(TensorAssert.Same(t, resumed.Optimizer.State[k]), $"optimizer {k} differs");
    }

    [Fact]
    public void Fit_stops_at_max_steps_and_finishes_an_epoch_that_ends_there()
    {
        using var train = Quadrants(64, 0);   // 4 batches per epoch
        using var test = Quadrants(16, 1);
        using var run = NewRun(totalSteps: 12);
        // Mid-epoch: two steps, no epoch result; asked again for the same limit, nothing more.
        Assert.Empty(run.Trainer.Fit(Loader(train), epochs: 3, maxSteps: 2));
        Assert.Equal(2, run.Trainer.Step);
        Assert.Empty(run.Trainer.Fit(Loader(train), epochs: 3, maxSteps: 2));
        Assert.Equal(2, run.Trainer.Step);
        // A limit on an epoch's last step: the epoch is evaluated and reported before Fit returns.
        var epochs = new List<EpochResult>();
        var results = run.Trainer.Fit(Loader(train), epochs: 3, eval: Loader(test), maxSteps: 4, onEpoch: epochs.Add);
        Assert.Equal(4, run.Trainer.Step);
        Assert.Single(results);
        Assert.NotNull(results[0].Eval);
        Assert.Equal(results, epochs);
        Assert.Equal(new TrainingPosition(4, 1, 0), run.Trainer.Position);
    }

    [Fact]
    public void A_checkpoint_without_per_parameter_step_counts_resumes_with_the_global_step()
    {
        // Checkpoints written before each parameter counted its own steps lack the optimizer's 'step' slots; every
        // parameter advanced at every step then, so each count is the checkpoint's step and the run continues exactly.
        using var train = Quadrants(64, 0);
        string ckpt = Path.Combine(_dir, "old.safetensors"), old = Path.Combine(_dir, "old-format.safetensors");
        using (var first = NewRun(ckpt, totalSteps: 8))
            first.Trainer.Fit(Loader(train), epochs: 2, maxSteps: 3);
        using (var reader = SafetensorsReader.Open(ckpt))
        {
            var kept = reader.Names.Where(n => !n.EndsWith(".step", StringComparison.Ordinal)).ToList();
            Assert.True(kept.Count < reader.Names.Count, "the checkpoint should hold step slots");
            var tensors = kept.Select(n => KeyValuePair.Create(n, reader.Read(n))).ToList();
            Safetensors.Save(tensors, old, reader.Metadata.ToDictionary(kv => kv.Key, kv => kv.Value));
            foreach (var (_, t) in tensors) t.Dispose();
        }
        using var fromNew = NewRun(totalSteps: 8);
        using var fromOld = NewRun(totalSteps: 8);
        fromNew.Trainer.LoadCheckpoint(ckpt);
        fromOld.Trainer.LoadCheckpoint(old);
        for (int i = 0; i < fromOld.Optimizer.Parameters.Count; i++) Assert.Equal(3, fromOld.Optimizer.StepsOf(i));
        fromNew.Trainer.Fit(Loader(train), epochs: 2);
        fromOld.Trainer.Fit(Loader(train), epochs: 2);
        var a = fromNew.Model.state_dict();
        var b = fromOld.Model.state_dict();
        foreach (var (k, t) in a) Assert.True(TensorAssert.Same(t, b[k]), $"{k} differs");
    }

    [Fact]
    public void A_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint()
    {
        using var train = Quadrants(64, 0, nanAt: 40);
        string ckpt = Path.Combine(_dir, "nan.safetensors");
        using var run = NewRun(ckpt);
        var loader = new DataLoader(train, new DataLoaderOptions { BatchSize = 16, Shuffle = false });
        run.Trainer.Fit(loader, epochs: 1, maxSteps: 2);                    // a good checkpoint at step 2
        var good = File.ReadAllBytes(ckpt);
        var e = Assert.Throws<NonFiniteLossException>(() => run.Trainer.Fit(loader, epochs: 2));
        Assert.Equal(2, e.Step);                                             // batch 2 holds example 40
        Assert.Contains("at step 2", e.Message);
        Assert.Contains(ckpt, e.Message);
        Assert.Equal(good, File.ReadAllBytes(ckpt));
        Assert.Equal(2, run.Trainer.Step);                                   // no update applied
        using var scope = torch.NewDisposeScope();
        Assert.All(run.Model.parameters(), p => Assert.False(p.isnan().any().item<bool>()));
    }

    [Fact]
    public void A_crash_between_write_and_rename_leaves_the_previous_checkpoint()
    {
        using var train = Quadrants(32, 0);
        string ckpt = Path.Combine(_dir, "atomic.safetensors");
        using var run = NewRun(ckpt);
        run.Trainer.Fit(Loader(train), epochs: 1);
        var before = File.ReadAllBytes(ckpt);
        AtomicFile.BeforeRename.Value = tmp =>
        {
            Assert.True(new FileInfo(tmp).Length > 0);                       // the new file was fully written
            throw new IOException("simulated crash before the rename");
        };
        try
        {
            Assert.Throws<IOException>(() => run.Trainer.Fit(Loader(train), epochs: 2));
        }
        finally
        {
            AtomicFile.BeforeRename.Value = null;
        }
        Assert.Equal(before, File.ReadAllBytes(ckpt));
        Assert.Equal(new[] { ckpt }, Directory.GetFiles(_dir));               // no temporary file left behind
        using var other = NewRun();
        other.Trainer.LoadCheckpoint(ckpt);
        Assert.Equal(2, other.Trainer.Step);
    }

    [Fact]
    public void Checkpoints_of_another_config_optimizer_or_kind_are_refused_by_name()
    {
        using var train = Quadrants(32, 0);
        string ckpt = Path.Combine(_dir, "a.safetensors");
        using (var run = NewRun(ckpt)) run.Trainer.Fit(Loader(train), epochs: 1);

        using var wider = NewRun(config: Config with { EmbedDim = 32 });
        var e = Assert.Throws<InvalidDataException>(() => wider.Trainer.LoadCheckpoint(ckpt));
        Assert.Contains(ckpt, e.Message);
        Assert.Contains("embed_dim: checkpoint 16, model 32", e.Message);

        using var ada = NewRun(adafactor: true);
        Assert.Contains("optimizer 'adamw(", Assert.Throws<InvalidDataException>(() => ada.Trainer.LoadCheckpoint(ckpt)).Message);

        using var longer = NewRun(totalSteps: 80);
        Assert.Contains("schedule", Assert.Throws<InvalidDataException>(() => longer.Trainer.LoadCheckpoint(ckpt)).Message);

        string plain = Path.Combine(_dir, "plain.safetensors");
        SafetensorsCheckpoint.Save(wider.Model, plain);
        Assert.Contains("not a ViT22B training checkpoint", Assert.Throws<InvalidDataException>(() => wider.Trainer.LoadCheckpoint(plain)).Message);

        using var model = TrainingCheckpoint.LoadModel(ckpt);
        using var fresh = NewRun(ckpt);
        fresh.Trainer.LoadCheckpoint(ckpt);
        foreach (var (k, t) in model.state_dict()) Assert.True(TensorAssert.Same(t, fresh.Model.state_dict()[k]), k);

        using var resumedOther = NewRun(ckpt);
        resumedOther.Trainer.LoadCheckpoint(ckpt);
        var shuffled = new DataLoader(train, new DataLoaderOptions { BatchSize = 16, Seed = 99 });
        Assert.Contains("data order", Assert.Throws<InvalidOperationException>(() => resumedOther.Trainer.Fit(shuffled, 2)).Message);
    }

    [Fact]
    public void Evaluation_of_a_float64_model_reports_its_loss()
    {
        using var test = Quadrants(20, 1);
        torch.manual_seed(1);
        using var model = new VisionTransformer(Config, torch.CPU, ScalarType.Float64);
        var r = Trainer.Evaluate(model, Loader(test));
        Assert.Equal(20, r.Count);
        Assert.InRange(r.Loss, 0.5, 5);           // near ln 4 for an untrained 4-class model
        Assert.InRange(r.Top5, 1.0, 1.0);         // 4 classes: every label is in the top 5
    }

    [Fact]
    public void Bfloat16_training_runs_with_float32_loss_and_masters()
    {
        using var train = Quadrants(32, 0);
        torch.manual_seed(1);
        using var model = new VisionTransformer(Config, torch.CPU, ScalarType.BFloat16);
        using var opt = new AdamW(Optimizer.WithWeightDecay(model, 0, 0));
        var trainer = new Trainer(model, opt, new LearningRateSchedule { PeakLr = 1e-3, TotalSteps = 2, Decay = DecayKind.Constant });
        var r = trainer.Fit(Loader(train), epochs: 1);
        Assert.True(double.IsFinite(r[0].TrainLoss));
        Assert.All(opt.State.Where(kv => kv.Key.EndsWith(".master", StringComparison.Ordinal)), kv => Assert.Equal(ScalarType.Float32, kv.Value.dtype));
        Assert.Equal(model.parameters().Count(), opt.State.Count(kv => kv.Key.EndsWith(".master", StringComparison.Ordinal)));
    }

    private sealed class ListLogger : Microsoft.Extensions.Logging.ILogger
    {
        public List<string> Lines { get; } = new();
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;
        public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Lines.Add(formatter(state, exception));
    }

    [Fact]
    public void The_log_never_prints_a_utilization_above_100_percent()
    {
        using var train = Quadrants(48, 0);
        torch.manual_seed(1);
        using var model = new VisionTransformer(Config, torch.CPU, ScalarType.Float32);
        using var opt = new AdamW(Optimizer.WithWeightDecay(model, 0, 0));
        var schedule = new LearningRateSchedule { PeakLr = 1e-3, TotalSteps = 4, Decay = DecayKind.Constant };
        // A "datasheet" peak of 1 FLOP/s: every step runs faster than it.
        var slow = new ListLogger();
        new Trainer(model, opt, schedule, new TrainerOptions { LogEverySteps = 1, PeakFlopsPerSecond = 1 }, slow).Fit(Loader(train), epochs: 1);
        var steps = slow.Lines.Where(l => l.StartsWith("step", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(steps);
        Assert.All(steps, l => Assert.Contains("MFU n/a (achieved", l, StringComparison.Ordinal));
        Assert.All(steps, l => Assert.EndsWith("of the datasheet peak", l, StringComparison.Ordinal));
        // A peak measured during the run (MfuMeter): a percentage, sampled at every log line.
        using var meter = new MfuMeter(torch.CPU, ScalarType.Float32);
        var measured = new ListLogger();
        new Trainer(model, opt, schedule, new TrainerOptions { LogEverySteps = 1, PeakMeter = meter }, measured).Fit(Loader(train), epochs: 1);
        var lines = measured.Lines.Where(l => l.StartsWith("step", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(lines);
        Assert.All(lines, l => Assert.Matches(@"MFU \d+\.\d % of the run's best GEMM$", l));
        // Each shape once per line, and MinimumRounds times before the first (never a peak from one timing).
        Assert.Equal((lines.Count - 1 + MfuMeter.MinimumRounds) * meter.Shapes.Count, meter.PeakSamples);
        Assert.Throws<ArgumentOutOfRangeException>(() => new Trainer(model, opt, schedule, new TrainerOptions { PeakFlopsPerSecond = 0 }));
    }
}
