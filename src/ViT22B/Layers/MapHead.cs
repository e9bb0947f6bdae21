using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Multi-head attention pooling (big_vision <c>MAPHead</c>, timm <c>AttentionPoolLatent</c>): a learned probe
/// attends over all tokens, then <c>x = x + Mlp(Norm(x))</c>; returns the probe's row, [B, N, D] → [B, D].
/// Keys <c>latent</c> [1, 1, D], <c>q</c>, <c>kv</c> [2D, D] (rows k | v), <c>proj</c>, <c>norm</c>, <c>mlp.fc1</c>,
/// <c>mlp.fc2</c>. All projections carry biases (as in both references); the norm follows the model's norm kind.
/// </summary>
public sealed class MapHead : nn.Module<Tensor, Tensor>
{
    private readonly Parameter latent;
    private readonly Linear q, kv, proj;
    private readonly Norm norm;
    private readonly Mlp mlp;
    private readonly int _heads;

    /// <summary>Creates the head with the blocks' options <paramref name="options"/>: their width, heads, MLP size, norm
    /// and activation (the biases are always on; QK-norm is not used).</summary>
    public MapHead(BlockOptions options, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(MapHead))
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Check();
        _heads = options.NumHeads;
        latent = Param.Of(torch.zeros(1, 1, options.Dim, dtype: dtype, device: device));
        q = nn.Linear(options.Dim, options.Dim, hasBias: true, device: device, dtype: dtype);
        kv = nn.Linear(options.Dim, 2L * options.Dim, hasBias: true, device: device, dtype: dtype);
        proj = nn.Linear(options.Dim, options.Dim, hasBias: true, device: device, dtype: dtype);
        norm = options.NewNorm(options.Dim, device, dtype);
        mlp = new Mlp(options.Dim, options.MlpDim, bias: true, options.Act, device, dtype);
        RegisterComponents();
    }

    /// <summary>[B, N, D] → [B, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        long b = x.shape[0];
        var query = q.forward(latent.expand(b, -1, -1));                 // [B, 1, D]
        var kvs = kv.forward(x).chunk(2, -1);                            // k | v
        var pooled = proj.forward(AttentionOps.Attend(query, kvs[0], kvs[1], _heads, null, null));
        pooled = pooled.Plus(mlp.call(norm.call(pooled)));
        return pooled.select(1, 0).MoveToOuterDisposeScope();
    }
}
