using System.Text.RegularExpressions;
using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>
/// How a <see cref="VisionTransformer"/>'s parameters are split over a <see cref="DeviceMesh"/>, as data keyed by
/// state-dict patterns (big_vision's <c>sharding_strategy</c> style). Along the <c>model</c> axis (tensor
/// parallelism, docs/sharding.md) each rank owns whole heads and a slice of the MLP (the rows and columns are
/// <see cref="FusedLayout"/>'s):
/// <list type="table">
/// <item><term><c>blocks.*.in_proj.{weight,bias}</c></term><description>rows [U_r | Q_r | K_r | V_r] (dim 0)</description></item>
/// <item><term><c>blocks.*.mlp_bias</c></term><description>U_r (dim 0)</description></item>
/// <item><term><c>blocks.*.out_proj.weight</c></term><description>columns [Z_r | G_r] (dim 1)</description></item>
/// <item><term><c>blocks.*.attn_out_proj.weight</c>, <c>blocks.*.attn.proj.weight</c></term><description>columns Z_r (dim 1)</description></item>
/// <item><term><c>blocks.*.mlp_out_proj.weight</c>, <c>blocks.*.mlp.fc2.weight</c></term><description>columns G_r (dim 1)</description></item>
/// <item><term><c>blocks.*.attn.qkv.{weight,bias}</c></term><description>rows [Q_r | K_r | V_r] (dim 0)</description></item>
/// <item><term><c>blocks.*.mlp.fc1.{weight,bias}</c></term><description>rows G_r (dim 0)</description></item>
/// </list>
/// Everything else is replicated. Replicated parameters inside blocks (norm scales, QK-norm scales, output biases)
/// see only this rank's tokens or heads, so their gradients are summed over the model axis
/// (<see cref="IsPartialOnModelAxis"/>). With <see cref="Fsdp"/>, every 2-D block weight's model-axis shard is further
/// split over the <c>data</c> axis (ZeRO-3) along its sharded dimension.
/// </summary>
public sealed class ShardingPlan
{
    private static readonly Regex BlockKey = new(@"^blocks\.\d+\.(?<leaf>.+)$", RegexOptions.Compiled);

    /// <summary>Creates a plan, validating that it can work.</summary>
    /// <exception cref="ArgumentException">Heads or MLP size not divisible by the model-axis size.</exception>
    public ShardingPlan(ViTConfig config, int modelSize, int dataSize = 1, bool fsdp = false)
    {
        ArgumentNullException.ThrowIfNull(config);
        Config = config.Validate();
        if (modelSize < 1 || dataSize < 1) throw new ArgumentException($"Axis sizes must be at least 1 (model {modelSize}, data {dataSize}).");
        if (config.NumHeads % modelSize != 0)
            throw new ArgumentException($"Cannot shard {config.NumHeads} heads over a model axis of {modelSize}: each rank must own whole heads, so the model-axis size must divide num_heads.");
        if (config.MlpDim % modelSize != 0)
            throw new ArgumentException($"Cannot shard mlp_dim {config.MlpDim} over a model axis of {modelSize}: the model-axis size must divide mlp_dim.");
        (ModelSize, DataSize, Fsdp) = (modelSize, dataSize, fsdp);
    }

    /// <summary>The model.</summary>
    public ViTConfig Config { get; }
    /// <summary>Tensor-parallel degree.</summary>
    public int ModelSize { get; }
    /// <summary>Data-parallel degree.</summary>
    public int DataSize { get; }
    /// <summary>Whether block weights are also sharded over the data axis.</summary>
    public bool Fsdp { get; }

    /// <summary>Heads per model rank.</summary>
    public int HeadsPerRank => Config.NumHeads / ModelSize;
    /// <summary>MLP units per model rank.</summary>
    public long MlpPerRank => Config.MlpDim / ModelSize;
    /// <summary>Attention width per model rank (heads × head dim).</summary>
    public long AttnPerRank => (long)HeadsPerRank * Config.HeadDim;

    /// <summary>The part of full parameter <paramref name="key"/> of shape <paramref name="fullShape"/> that the rank at
    /// (<paramref name="data"/>, <paramref name="model"/>) holds.</summary>
    public ShardSpec Spec(string key, long[] fullShape, int model, int data = 0)
    {
        var tp = ModelSpec(key, fullShape, model);
        if (!Fsdp || DataSize == 1 || !IsFsdpSharded(key, fullShape)) return tp;
        var counts = TokenPartition.Counts(tp.LocalShape[tp.Dim], DataSize);
        return tp.Slice(TokenPartition.Start(counts, data), counts[data]);
    }

    /// <summary>True for block parameters that are replicated over the model axis but see only part of the tokens or
    /// heads, so their gradients must be summed over the model axis.</summary>
    public bool IsPartialOnModelAxis(string key, long[] fullShape) =>
        ModelSize > 1 && BlockKey.IsMatch(key) && ModelSpec(key, fullShape, 0).IsWhole;

    /// <summary>True when the parameter is sharded over the data axis (FSDP).</summary>
    public bool IsFsdpSharded(string key, long[] fullShape) => Fsdp && DataSize > 1 && BlockKey.IsMatch(key) && fullShape.Length == 2;

    /// <summary>The data-axis chunk sizes of an FSDP-sharded parameter (along its sharded dimension).</summary>
    public long[] FsdpCounts(string key, long[] fullShape, int model)
    {
        var tp = ModelSpec(key, fullShape, model);
        return TokenPartition.Counts(tp.LocalShape[tp.Dim], DataSize);
    }

    /// <summary>The dimension an FSDP-sharded parameter is split along.</summary>
    public int FsdpDim(string key, long[] fullShape) => ModelSpec(key, fullShape, 0).Dim;

    /// <summary>The model-axis part of a parameter (before any data-axis split).</summary>
    public ShardSpec ModelSpec(string key, long[] fullShape, int model)
    {
        if (model < 0 || model >= ModelSize) throw new ArgumentOutOfRangeException(nameof(model));
        var m = BlockKey.Match(key);
        if (!m.Success || ModelSize == 1) return ShardSpec.Whole(fullShape);
        var l = Config.BlockOptions.Layout;
        int k = ModelSize;
        return m.Groups["leaf"].Value switch
        {
            "in_proj.weight" or "in_proj.bias" => new ShardSpec(fullShape, 0, l.InRows(model, k)),
            "mlp_bias" => new ShardSpec(fullShape, 0, l.MlpRange(model, k)),
            "out_proj.weight" => new ShardSpec(fullShape, 1, l.OutColumns(model, k)),
            "attn_out_proj.weight" or "attn.proj.weight" => new ShardSpec(fullShape, 1, l.HeadRange(model, k)),
            "mlp_out_proj.weight" or "mlp.fc2.weight" => new ShardSpec(fullShape, 1, l.MlpRange(model, k)),
            "attn.qkv.weight" or "attn.qkv.bias" => new ShardSpec(fullShape, 0, l.QkvRows(model, k)),
            "mlp.fc1.weight" or "mlp.fc1.bias" => new ShardSpec(fullShape, 0, l.MlpRange(model, k)),
            _ => ShardSpec.Whole(fullShape),
        };
    }

    /// <summary>The full shapes of every parameter of the model, computed on the meta device (no memory).</summary>
    public IReadOnlyDictionary<string, long[]> FullShapes() => _fullShapes ??= VisionTransformer.StateShapes(Config);

    private IReadOnlyDictionary<string, long[]>? _fullShapes;

    /// <summary>Cuts a rank's shard out of a full tensor.</summary>
    public static Tensor Slice(Tensor full, ShardSpec spec)
    {
        return spec.IsWhole ? full.alias() : Interop.TensorSlices.Cut(full, spec.Dim, spec.Segments);
    }

    /// <summary>Writes a shard back into its place in a full tensor.</summary>
    public static void Place(Tensor full, Tensor shard, ShardSpec spec)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        long local = 0;
        foreach (var (start, length) in spec.Segments)
        {
            full.narrow(spec.Dim, start, length).copy_(shard.narrow(spec.Dim, local, length));
            local += length;
        }
    }

    /// <summary>The shard state dict of the rank at (<paramref name="data"/>, <paramref name="model"/>), sliced from a
    /// full state dict (tensors of replicated keys are aliases of the full ones).</summary>
    public Dictionary<string, Tensor> Shard(IReadOnlyDictionary<string, Tensor> full, int model, int data = 0) =>
        full.ToDictionary(kv => kv.Key, kv => Slice(kv.Value, Spec(kv.Key, kv.Value.shape, model, data)));

    /// <summary>
    /// Reassembles one full parameter (on the CPU) from the shards of a <c>DataSize × ModelSize</c> mesh (world rank
    /// order, model axis fastest). <paramref name="shardOf"/> is asked only for ranks holding a part not seen yet, so
    /// replicas (replicated parameters, copies on other data ranks) are read once. Tensors it returns are not
    /// disposed here.
    /// </summary>
    public Tensor Reassemble(string key, long[] fullShape, Func<int, Tensor> shardOf)
    {
        ArgumentNullException.ThrowIfNull(shardOf);
        Tensor? full = null;
        var seen = new HashSet<string>();
        for (int rank = 0; rank < ModelSize * DataSize; rank++)
        {
            var spec = Spec(key, fullShape, rank % ModelSize, rank / ModelSize);
            if (!seen.Add($"{spec.Dim}:{string.Join(",", spec.Segments)}")) continue;
            var part = shardOf(rank);
            full ??= torch.empty(fullShape, dtype: part.dtype, device: torch.CPU);
            using var cpu = part.cpu();   // a local: kept alive through the copy
            Place(full, cpu, spec);
        }
        return full!;
    }

    /// <summary>Reassembles a full state dict from the shard state dicts of every rank, indexed by world rank of a
    /// <c>DataSize × ModelSize</c> mesh (model axis fastest).</summary>
    public Dictionary<string, Tensor> Unshard(IReadOnlyList<IReadOnlyDictionary<string, Tensor>> shards)
    {
        if (shards.Count != ModelSize * DataSize)
            throw new ArgumentException($"Unshard needs {ModelSize * DataSize} shard dicts (data {DataSize} × model {ModelSize}), found {shards.Count}.");
        var result = new Dictionary<string, Tensor>();
        foreach (var (key, fullShape) in FullShapes())
        {
            for (int rank = 0; rank < shards.Count; rank++)
                if (!shards[rank].ContainsKey(key)) throw new KeyNotFoundException($"Shard {rank} has no '{key}'.");
            result[key] = Reassemble(key, fullShape, rank => shards[rank][key]);
        }
        return result;
    }
}
