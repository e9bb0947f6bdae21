using System.Globalization;
using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Training;

/// <summary>A parameter the optimizer updates, with its state-dict name and its decoupled weight decay.</summary>
/// <param name="Name">State-dict key (names the optimizer state in checkpoints).</param>
/// <param name="Value">The parameter.</param>
/// <param name="WeightDecay">Decoupled weight decay λ: each step multiplies the parameter by (1 − lr·λ), as
/// PyTorch's AdamW.</param>
public sealed record OptimizedParameter(string Name, Parameter Value, double WeightDecay);

/// <summary>
/// Base of the library's optimizers (<see cref="AdamW"/>, <see cref="Adafactor"/>). Unlike TorchSharp's, every
/// piece of state is a named tensor (<see cref="State"/>), so a training checkpoint can hold it and a resumed run
/// continues bit-identically. Parameters that are not float32 (bfloat16/float16 training) get a float32 master
/// copy: updates are computed and accumulated in float32 and rounded into the parameter after each step; a value
/// written into the parameter since (loading weights, re-initialising a head) is taken into the master first, element
/// by element, so it is kept as it would be in PyTorch. As in PyTorch, each parameter counts its own steps (state slot
/// <c>step</c>): a parameter without a gradient is skipped and its count does not advance.
/// </summary>
public abstract class Optimizer : IDisposable
{
    private readonly Dictionary<string, Tensor> _state = new(StringComparer.Ordinal);
    private readonly Tensor?[] _masters;
    private readonly Tensor[] _steps;      // each parameter's update count, an int64 scalar on the CPU (state slot 'step')

    /// <summary>Creates the optimizer for <paramref name="parameters"/>.</summary>
    protected Optimizer(IEnumerable<OptimizedParameter> parameters)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        Parameters = parameters.ToList();
        if (Parameters.Count == 0) throw new ArgumentException("No parameters to optimize.", nameof(parameters));
        var dup = Parameters.GroupBy(p => p.Name).FirstOrDefault(g => g.Count() > 1);
        if (dup is not null) throw new ArgumentException($"Parameter name '{dup.Key}' appears twice.", nameof(parameters));
        _masters = new Tensor?[Parameters.Count];
        _steps = new Tensor[Parameters.Count];
        using var noGrad = torch.no_grad();
        for (int i = 0; i < Parameters.Count; i++)
        {
            var p = Parameters[i];
            if (p.WeightDecay < 0) throw new ArgumentOutOfRangeException(nameof(parameters), $"Weight decay of '{p.Name}' must be ≥ 0, found {p.WeightDecay}.");
            if (!p.Value.is_floating_point()) throw new ArgumentException($"Parameter '{p.Name}' is {p.Value.dtype}; only floating-point parameters can be optimized.", nameof(parameters));
            if (p.Value.dtype != ScalarType.Float32 && p.Value.dtype != ScalarType.Float64)
            {
                using var detached = p.Value.detach();   // locals: kept alive through the native copies
                using var wide = detached.to(ScalarType.Float32);
                _masters[i] = AddState(p.Name, "master", wide.clone());
            }
            _steps[i] = AddState(p.Name, "step", torch.zeros(Array.Empty<long>(), dtype: ScalarType.Int64, device: torch.CPU));
        }
    }

    /// <summary>The parameters, in order.</summary>
    public IReadOnlyList<OptimizedParameter> Parameters { get; }

    /// <summary>Completed calls of <see cref="Step"/>.</summary>
    public long StepCount { get; private set; }

    /// <summary>The updates parameter <paramref name="index"/> has received (the steps at which it had a gradient).</summary>
    /// <exception cref="ArgumentOutOfRangeException">No parameter has that index.</exception>
    public long StepsOf(int index)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(index, Parameters.Count);
        return _steps[index].item<long>();
    }

    /// <summary>Name and hyper-parameters, as written into checkpoints (a checkpoint of another optimizer is refused).</summary>
    public abstract string Describe();

    /// <summary>All state tensors, keyed <c>{parameter}.{slot}</c> (<c>master</c> = float32 copy of a 16-bit parameter,
    /// <c>step</c> = the parameter's update count, an int64 scalar on the CPU).</summary>
    public IReadOnlyDictionary<string, Tensor> State => _state;

    /// <summary>Applies one update with learning rate <paramref name="lr"/> to every parameter that has a gradient.</summary>
    public void Step(double lr)
    {
        if (!double.IsFinite(lr) || lr < 0) throw new ArgumentOutOfRangeException(nameof(lr), $"Learning rate must be finite and ≥ 0, found {lr}.");
        using var noGrad = torch.no_grad();
        for (int i = 0; i < Parameters.Count; i++)
        {
            var p = Parameters[i];
            var grad = p.Value.grad;
            if (grad is null) continue;
            using var scope = NewDisposeScope();
            var master = _masters[i];
            if (master is not null)
                master.copy_(torch.where(master.to(p.Value.dtype).ne(p.Value), p.Value.to(master.dtype), master));   // keep outside writes
            var w = master ?? p.Value;
            var g = grad.dtype == w.dtype ? grad : grad.to(w.dtype);
            if (p.WeightDecay != 0 && lr != 0) w.TimesInPlace(1 - lr * p.WeightDecay);
            long step = _steps[i].item<long>() + 1;
            _steps[i].data<long>()[0] = step;
            Update(i, p, w, g, lr, step);
            if (master is not null) p.Value.copy_(master);
        }
        StepCount++;
    }

    /// <summary>Sets every gradient to null (frees the memory; the next backward allocates fresh ones).</summary>
    public void ZeroGrad()
    {
        foreach (var p in Parameters)
        {
            var g = p.Value.grad;
            if (g is null) continue;
            g.Dispose();
            p.Value.grad = null;
        }
    }

    /// <summary>Subclasses: apply the update to <paramref name="weight"/> (the parameter, or its float32 master)
    /// in place, from the gradient <paramref name="grad"/> in the weight's dtype; weight decay is already applied.
    /// <paramref name="step"/> is the parameter's own update count, 1 at its first update.</summary>
    protected abstract void Update(int index, OptimizedParameter parameter, Tensor weight, Tensor grad, double lr, long step);

    /// <summary>Subclasses: registers a state tensor of parameter <paramref name="parameter"/> (created once).</summary>
    protected Tensor AddState(string parameter, string slot, Tensor value)
    {
        _state.Add($"{parameter}.{slot}", value.DetachFromDisposeScope());
        return value;
    }

    /// <summary>Copies saved state into this optimizer (same parameters, shapes and dtypes) and sets the step count.
    /// State saved before parameters counted their own steps has no <c>step</c> slots: each parameter's count is then
    /// <paramref name="stepCount"/>, as every parameter advanced at every step then.</summary>
    /// <exception cref="InvalidDataException">A key is missing or unexpected, or a shape differs.</exception>
    public void LoadState(IReadOnlyDictionary<string, Tensor> state, long stepCount, string source)
    {
        ArgumentNullException.ThrowIfNull(state);
        var stepKeys = Parameters.Select(p => p.Name + ".step").ToHashSet(StringComparer.Ordinal);
        bool countsSaved = stepKeys.Any(state.ContainsKey);
        var missing = _state.Keys.Where(k => !state.ContainsKey(k) && (countsSaved || !stepKeys.Contains(k))).ToList();
        var extra = state.Keys.Where(k => !_state.ContainsKey(k)).ToList();
        if (missing.Count > 0 || extra.Count > 0)
            throw new InvalidDataException($"'{source}': optimizer state does not match this optimizer (missing: {string.Join(", ", missing.Take(5))}{(missing.Count > 5 ? " …" : "")}; unexpected: {string.Join(", ", extra.Take(5))}{(extra.Count > 5 ? " …" : "")}).");
        foreach (var (k, t) in _state)
        {
            if (!state.TryGetValue(k, out var src)) continue;
            if (!src.shape.SequenceEqual(t.shape))
                throw new InvalidDataException($"'{source}': optimizer state '{k}' has shape [{string.Join(", ", src.shape)}], expected [{string.Join(", ", t.shape)}].");
        }
        using var noGrad = torch.no_grad();
        foreach (var (k, t) in _state)
            if (state.TryGetValue(k, out var saved)) t.copy_(saved);
        if (!countsSaved)
            foreach (var step in _steps) step.data<long>()[0] = stepCount;
        StepCount = stepCount;
    }

    /// <summary>Formats a hyper-parameter for <see cref="Describe"/> (invariant, round-trippable).</summary>
    protected static string F(double v) => v.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>Disposes the state tensors.</summary>
    public void Dispose()
    {
        foreach (var t in _state.Values) t.Dispose();
        _state.Clear();
        GC.SuppressFinalize(this);
    }

    /// <summary>
    /// The parameters of <paramref name="model"/> with decoupled weight decay as in ViT-22B / big_vision: weight
    /// matrices and kernels of the body get <paramref name="weightDecay"/>, the classifier's weight
    /// (<c>head.weight</c>) gets <paramref name="headWeightDecay"/> (the paper decays the head much more: 3.0 vs
    /// 0.03 in units of the learning rate), and biases, norm scales, position embeddings, the class token and the
    /// MAP probe get none (timm's <c>no_weight_decay</c> set).
    /// </summary>
    public static IReadOnlyList<OptimizedParameter> WithWeightDecay(nn.Module model, double weightDecay, double headWeightDecay)
    {
        ArgumentNullException.ThrowIfNull(model);
        var result = new List<OptimizedParameter>();
        foreach (var (name, p) in model.named_parameters())
        {
            if (!p.requires_grad) continue;
            bool noDecay = p.dim() < 2 || name is "pos_embed" or "cls_token" || name.EndsWith(".latent", StringComparison.Ordinal);
            double wd = noDecay ? 0 : name == "head.weight" ? headWeightDecay : weightDecay;
            result.Add(new OptimizedParameter(name, p, wd));
        }
        return result;
    }
}
