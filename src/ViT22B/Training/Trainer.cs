using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using TorchSharp;
using ViT22B.Accounting;
using ViT22B.Data;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Training;

/// <summary>Options of a <see cref="Trainer"/>.</summary>
public sealed record TrainerOptions
{
    /// <summary>Loss (softmax for single-label data; sigmoid is the ViT-22B pre-training loss).</summary>
    public LossKind Loss { get; init; } = LossKind.Softmax;
    /// <summary>Softmax label smoothing.</summary>
    public double LabelSmoothing { get; init; }
    /// <summary>Clip gradients to this global L2 norm (0 = no clipping; big_vision uses 1.0).</summary>
    public double ClipGradNorm { get; init; } = 1.0;
    /// <summary>Checkpoint file written during <see cref="Trainer.Fit"/> (null = none).</summary>
    public string? CheckpointPath { get; init; }
    /// <summary>Also checkpoint every this many steps (0 = only at the end of each epoch and of the run).</summary>
    public int CheckpointEverySteps { get; init; }
    /// <summary>Log training metrics every this many steps.</summary>
    public int LogEverySteps { get; init; } = 50;
    /// <summary>Peak FLOP/s of the device from its datasheet, to log MFU against (null = use <see cref="PeakMeter"/>).</summary>
    public double? PeakFlopsPerSecond { get; init; }
    /// <summary>Measures the peak during the run when no <see cref="PeakFlopsPerSecond"/> is given: at every log line one
    /// GEMM of each of its shapes is timed (outside the timed window; before the first line each shape
    /// <see cref="MfuMeter.MinimumRounds"/> times) and MFU is taken against the best GEMM so far
    /// (<see cref="MfuMeter"/>). The caller owns and disposes it. Null with no datasheet peak = log achieved FLOP/s only.</summary>
    public MfuMeter? PeakMeter { get; init; }
    /// <summary>Blocks that recompute their activations in backward, set on the model when the trainer is created
    /// (null = leave <see cref="VisionTransformer.Checkpointing"/> as it is). With recomputation the log adds the
    /// hardware FLOPs utilization (recomputed forward passes counted) beside the MFU (model FLOPs only).</summary>
    public ActivationCheckpointing? Checkpointing { get; init; }
}

/// <summary>One optimizer step.</summary>
/// <param name="Step">Completed steps after this one.</param>
/// <param name="Loss">The batch loss before the update.</param>
/// <param name="Correct">Top-1 correct predictions in the batch.</param>
/// <param name="Count">Batch size.</param>
/// <param name="LearningRate">The learning rate used.</param>
/// <param name="GradNorm">Global gradient norm before clipping.</param>
public sealed record StepResult(long Step, double Loss, long Correct, int Count, double LearningRate, double GradNorm);

/// <summary>Evaluation of a model on a dataset.</summary>
/// <param name="Loss">Mean loss.</param>
/// <param name="Top1">Top-1 accuracy.</param>
/// <param name="Top5">Top-5 accuracy.</param>
/// <param name="Count">Examples evaluated.</param>
public sealed record EvalResult(double Loss, double Top1, double Top5, long Count);

/// <summary>One finished epoch of <see cref="Trainer.Fit"/>.</summary>
/// <param name="Epoch">0-based epoch.</param>
/// <param name="Step">Completed steps.</param>
/// <param name="TrainLoss">Mean training loss over the epoch's steps.</param>
/// <param name="TrainTop1">Training accuracy over the epoch (on augmented batches, while the weights changed).</param>
/// <param name="Eval">Evaluation after the epoch, when an evaluation loader was given.</param>
/// <param name="Elapsed">Wall time of the epoch's training steps.</param>
/// <param name="ImagesPerSecond">Training throughput.</param>
public sealed record EpochResult(int Epoch, long Step, double TrainLoss, double TrainTop1, EvalResult? Eval, TimeSpan Elapsed, double ImagesPerSecond);

/// <summary>Training stopped because the loss or the gradient became NaN or infinite.</summary>
public sealed class NonFiniteLossException : InvalidOperationException
{
    /// <summary>Creates the exception.</summary>
    public NonFiniteLossException(string message, long step) : base(message) => Step = step;

    /// <summary>The step whose loss (or gradient) was not finite; no update was applied at it.</summary>
    public long Step { get; }
}

/// <summary>
/// Trains a <see cref="VisionTransformer"/> classifier: loss (float32 whatever the model dtype), backward, gradient
/// clipping by global norm, learning rate from the schedule, optimizer step; evaluation (loss, top-1, top-5);
/// logging of loss, accuracy, learning rate, gradient norm, throughput and MFU through <see cref="ILogger"/>;
/// atomic checkpoints that resume bit-identically on the CPU (the data order depends only on the loader's seed and
/// the epoch, so a resumed run sees the same batches). A NaN/Inf loss or gradient stops training with
/// <see cref="NonFiniteLossException"/> before the update is applied, leaving the last checkpoint as it was.
/// For bfloat16 training build the model in bfloat16: the optimizers keep float32 master weights.
/// </summary>
public sealed class Trainer
{
    private readonly VisionTransformer _model;
    private readonly Optimizer _optimizer;
    private readonly ILearningRateSchedule _schedule;
    private readonly ILogger _logger;
    private readonly List<Tensor> _parameters;
    private string? _resumedDataOrder;

    /// <summary>Creates a trainer; the model must have a classifier (<see cref="ViTConfig.NumClasses"/> &gt; 0).</summary>
    public Trainer(VisionTransformer model, Optimizer optimizer, ILearningRateSchedule schedule, TrainerOptions? options = null, ILogger? logger = null)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
        _optimizer = optimizer ?? throw new ArgumentNullException(nameof(optimizer));
        _schedule = schedule ?? throw new ArgumentNullException(nameof(schedule));
        Options = options ?? new TrainerOptions();
        _logger = logger ?? NullLogger.Instance;
        if (model.Config.NumClasses <= 0) throw new ArgumentException("The model has no classifier (num_classes = 0); set NumClasses to train it.", nameof(model));
        if (Options.LogEverySteps <= 0) throw new ArgumentOutOfRangeException(nameof(options), $"LogEverySteps must be positive, found {Options.LogEverySteps}.");
        if (Options.PeakFlopsPerSecond is { } peak && !(peak > 0 && double.IsFinite(peak)))
            throw new ArgumentOutOfRangeException(nameof(options), $"PeakFlopsPerSecond must be positive, found {peak}.");
        if (Options.CheckpointEverySteps < 0) throw new ArgumentOutOfRangeException(nameof(options), $"CheckpointEverySteps must be ≥ 0, found {Options.CheckpointEverySteps}.");
        _parameters = optimizer.Parameters.Select(p => (Tensor)p.Value).ToList();
        if (Options.Checkpointing is { } checkpointing) model.Checkpointing = checkpointing;
    }

    /// <summary>The options.</summary>
    public TrainerOptions Options { get; }

    /// <summary>Completed optimizer steps.</summary>
    public long Step => _optimizer.StepCount;

    /// <summary>Where <see cref="Fit"/> continues.</summary>
    public TrainingPosition Position { get; private set; } = new(0, 0, 0);

    /// <summary>One step on a batch: images [B, C, H, W] (any device/dtype; converted to the model's) and labels [B].</summary>
    /// <exception cref="NonFiniteLossException">The loss or the gradient norm is NaN or infinite (no update applied).</exception>
    public StepResult TrainStep(Tensor images, Tensor labels)
    {
        ArgumentNullException.ThrowIfNull(images);
        ArgumentNullException.ThrowIfNull(labels);
        _model.train();
        using var scope = NewDisposeScope();
        var x = images.to(_model.DType, _model.Device);
        var y = labels.to(ScalarType.Int64, _model.Device);
        var logits = _model.forward(x);
        var loss = Losses.Compute(logits, y, Options.Loss, Options.LabelSmoothing);
        double lossValue = loss.to(ScalarType.Float64).item<double>();
        if (!double.IsFinite(lossValue))
            throw new NonFiniteLossException($"Loss is {lossValue} at step {Step} (epoch {Position.Epoch}, batch {Position.BatchInEpoch}); training stopped before the update. {LastCheckpointNote()}", Step);
        long correct = logits.argmax(1).eq(y).sum().item<long>();
        _optimizer.ZeroGrad();
        loss.backward();
        _model.ThrowIfBackwardFailed();
        double norm = Losses.ClipGradNorm(_parameters, Options.ClipGradNorm);
        if (!double.IsFinite(norm))
        {
            _optimizer.ZeroGrad();
            throw new NonFiniteLossException($"Gradient norm is {norm} at step {Step} (epoch {Position.Epoch}, batch {Position.BatchInEpoch}, loss {lossValue}); training stopped before the update. {LastCheckpointNote()}", Step);
        }
        double lr = _schedule.At(Step);
        _optimizer.Step(lr);
        _optimizer.ZeroGrad();
        return new StepResult(Step, lossValue, correct, (int)images.shape[0], lr, norm);
    }

    /// <summary>Mean loss, top-1 and top-5 accuracy of the model on every batch of <paramref name="loader"/>'s epoch 0.</summary>
    public EvalResult Evaluate(DataLoader loader) => Evaluate(_model, loader, Options.Loss);

    /// <summary>Mean loss, top-1 and top-5 accuracy of <paramref name="model"/> on <paramref name="loader"/> (epoch 0's order).</summary>
    public static EvalResult Evaluate(VisionTransformer model, DataLoader loader, LossKind loss = LossKind.Softmax)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(loader);
        model.eval();
        double lossSum = 0;
        long top1 = 0, top5 = 0, count = 0;
        foreach (var batch in loader.Epoch(0))
        {
            using (batch)
            using (torch.inference_mode())
            using (var scope = NewDisposeScope())
            {
                var y = batch.Labels.to(model.Device);
                var logits = model.forward(batch.Images.to(model.DType, model.Device));
                lossSum += Losses.Compute(logits, y, loss).to(ScalarType.Float64).item<double>() * batch.Count;
                var k = Losses.TopKCorrect(logits, y, 1, 5);
                (top1, top5, count) = (top1 + k[0], top5 + k[1], count + batch.Count);
            }
        }
        return new EvalResult(lossSum / count, (double)top1 / count, (double)top5 / count, count);
    }

    /// <summary>
    /// Trains until epoch <paramref name="epochs"/> is done or <see cref="Step"/> reaches <paramref name="maxSteps"/>
    /// (then nothing is trained; an epoch that ends on that step is finished first), continuing from
    /// <see cref="Position"/> (set by <see cref="LoadCheckpoint"/>). After each epoch evaluates on
    /// <paramref name="eval"/> (if given), logs, checkpoints (if <see cref="TrainerOptions.CheckpointPath"/> is set) and
    /// calls <paramref name="onEpoch"/>; <paramref name="progress"/> hears about every step.
    /// </summary>
    public IReadOnlyList<EpochResult> Fit(DataLoader train, int epochs, DataLoader? eval = null, IProgress<StepResult>? progress = null,
        long? maxSteps = null, Action<EpochResult>? onEpoch = null)
    {
        ArgumentNullException.ThrowIfNull(train);
        if (epochs <= 0) throw new ArgumentOutOfRangeException(nameof(epochs), $"epochs must be positive, found {epochs}.");
        if (maxSteps < 0) throw new ArgumentOutOfRangeException(nameof(maxSteps), $"maxSteps must be ≥ 0, found {maxSteps}.");
        string order = DataOrder(train);
        if (_resumedDataOrder is not null && _resumedDataOrder != order)
            throw new InvalidOperationException($"The checkpoint was trained with data order '{_resumedDataOrder}', this loader gives '{order}'; resuming would not see the same batches.");
        var results = new List<EpochResult>();
        double flopsPerImage = ModelAccounting.Flops(_model.Config).Training;
        double hardwareFlopsPerImage = ModelAccounting.HardwareTrainingFlops(_model.Config, _model.Checkpointing);
        bool Reached() => maxSteps is { } m && Step >= m;
        while (Position.Epoch < epochs && !Reached())
        {
            int epoch = Position.Epoch;
            double lossSum = 0;
            long correct = 0, seen = 0, steps = 0;
            var sw = Stopwatch.StartNew();
            var window = Stopwatch.StartNew();
            long windowImages = 0;
            foreach (var batch in train.Epoch(epoch, Position.BatchInEpoch))
            {
                StepResult r;
                using (batch)
                {
                    foreach (var s in batch.Skipped) _logger.LogWarning("Skipped unreadable example {Source}: {Reason}", s.Source, s.Reason);
                    r = TrainStep(batch.Images, batch.Labels);
                }
                Position = new TrainingPosition(Step, epoch, Position.BatchInEpoch + 1);
                (lossSum, correct, seen, steps, windowImages) = (lossSum + r.Loss, correct + r.Correct, seen + r.Count, steps + 1, windowImages + r.Count);
                progress?.Report(r);
                if (Step % Options.LogEverySteps == 0)
                {
                    double ips = windowImages / window.Elapsed.TotalSeconds;
                    sw.Stop();   // the peak GEMMs LogStep may time count in neither the window nor the epoch
                    LogStep(r, epoch, ips, flopsPerImage, hardwareFlopsPerImage);
                    sw.Start();
                    window.Restart();
                    windowImages = 0;
                }
                bool epochDone = Position.BatchInEpoch == train.BatchesPerEpoch;
                if (epochDone) Position = new TrainingPosition(Step, epoch + 1, 0);
                // A checkpoint (periodic, or at the step limit) that falls on an epoch's last step is left to the
                // end-of-epoch one (same state); a limit reached there lets the epoch finish first.
                bool stop = Reached() && !epochDone;
                bool periodic = Options.CheckpointEverySteps > 0 && Step % Options.CheckpointEverySteps == 0 && !epochDone;
                if (Options.CheckpointPath is { } path && (stop || periodic)) SaveCheckpoint(path, order);
                if (stop) return results;
            }
            sw.Stop();
            Position = new TrainingPosition(Step, epoch + 1, 0);
            var ev = eval is null ? null : Evaluate(eval);
            var result = new EpochResult(epoch, Step, steps == 0 ? double.NaN : lossSum / steps, seen == 0 ? double.NaN : (double)correct / seen, ev, sw.Elapsed, seen / Math.Max(1e-9, sw.Elapsed.TotalSeconds));
            results.Add(result);
            if (ev is null)
                _logger.LogInformation("epoch {Epoch} done: step {Step}, train loss {Loss:F4}, train top-1 {Top1:P2}, {Seconds:F1} s, {Ips:F0} img/s",
                    epoch + 1, Step, result.TrainLoss, result.TrainTop1, sw.Elapsed.TotalSeconds, result.ImagesPerSecond);
            else
                _logger.LogInformation("epoch {Epoch} done: step {Step}, train loss {Loss:F4}, train top-1 {Top1:P2}, eval loss {EvalLoss:F4}, eval top-1 {EvalTop1:P2}, top-5 {EvalTop5:P2}, {Seconds:F1} s, {Ips:F0} img/s",
                    epoch + 1, Step, result.TrainLoss, result.TrainTop1, ev.Loss, ev.Top1, ev.Top5, sw.Elapsed.TotalSeconds, result.ImagesPerSecond);
            if (Options.CheckpointPath is { } p) SaveCheckpoint(p, order);
            onEpoch?.Invoke(result);
        }
        return results;
    }

    /// <summary>Writes a checkpoint of the current state (atomically).</summary>
    public void SaveCheckpoint(string path, string dataOrder = "")
    {
        TrainingCheckpoint.Save(_model, path, _optimizer, _schedule, Position, dataOrder);
        LastCheckpoint = (path, Step);
        _logger.LogInformation("checkpoint {Path} written at step {Step}", path, Step);
    }

    /// <summary>Restores a checkpoint written by this kind of run (same config, optimizer and schedule); the next
    /// <see cref="Fit"/> continues where it stopped and checks that its loader gives the same data order.</summary>
    public void LoadCheckpoint(string path)
    {
        var (position, order) = TrainingCheckpoint.Load(_model, path, _optimizer, _schedule);
        Position = position;
        _resumedDataOrder = order.Length == 0 ? null : order;
        LastCheckpoint = (path, position.Step);
        _logger.LogInformation("resumed from {Path} at step {Step} (epoch {Epoch}, batch {Batch})", path, position.Step, position.Epoch + 1, position.BatchInEpoch);
    }

    /// <summary>The last checkpoint written or loaded, and its step.</summary>
    public (string Path, long Step)? LastCheckpoint { get; private set; }

    /// <summary>What makes a loader's batches reproducible: seed, batch size, shuffling, dataset size.</summary>
    public static string DataOrder(DataLoader loader) =>
        $"seed={loader.Options.Seed}, batch_size={loader.Options.BatchSize}, shuffle={loader.Options.Shuffle}, drop_last={loader.Options.DropLast}, examples={loader.Dataset.Count}";

    private string LastCheckpointNote() => LastCheckpoint is var (p, s)
        ? $"The last good checkpoint '{p}' (step {s}) was not overwritten."
        : "No checkpoint was written.";

    private void LogStep(StepResult r, int epoch, double imagesPerSecond, double flopsPerImage, double hardwareFlopsPerImage)
    {
        double achieved = imagesPerSecond * flopsPerImage;
        double? peak = Options.PeakFlopsPerSecond;
        if (peak is null && Options.PeakMeter is { } meter)
        {
            meter.SampleRound();
            peak = meter.PeakFlopsPerSecond;
        }
        // Which peak the utilization is of: the datasheet's, or the best GEMM timed during the run.
        string of = Options.PeakFlopsPerSecond is null ? "of the run's best GEMM" : "of the datasheet peak";
        if (peak is { } p && hardwareFlopsPerImage > flopsPerImage)
            _logger.LogInformation("step {Step} epoch {Epoch}: loss {Loss:F4}, top-1 {Top1:P1}, lr {Lr:E3}, grad norm {GradNorm:F3}, {Ips:F0} img/s, {Tflops:F3} TFLOP/s, MFU {Mfu}, HFU {Hfu} {PeakSource}",
                r.Step, epoch + 1, r.Loss, (double)r.Correct / r.Count, r.LearningRate, r.GradNorm, imagesPerSecond, achieved / 1e12, Utilization.Format(achieved, p),
                Utilization.Format(imagesPerSecond * hardwareFlopsPerImage, p), of);
        else if (peak is { } q)
            _logger.LogInformation("step {Step} epoch {Epoch}: loss {Loss:F4}, top-1 {Top1:P1}, lr {Lr:E3}, grad norm {GradNorm:F3}, {Ips:F0} img/s, {Tflops:F3} TFLOP/s, MFU {Mfu} {PeakSource}",
                r.Step, epoch + 1, r.Loss, (double)r.Correct / r.Count, r.LearningRate, r.GradNorm, imagesPerSecond, achieved / 1e12, Utilization.Format(achieved, q), of);
        else
            _logger.LogInformation("step {Step} epoch {Epoch}: loss {Loss:F4}, top-1 {Top1:P1}, lr {Lr:E3}, grad norm {GradNorm:F3}, {Ips:F0} img/s, {Tflops:F3} TFLOP/s",
                r.Step, epoch + 1, r.Loss, (double)r.Correct / r.Count, r.LearningRate, r.GradNorm, imagesPerSecond, achieved / 1e12);
    }
}
