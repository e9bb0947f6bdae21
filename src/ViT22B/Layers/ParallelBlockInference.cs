using TorchSharp.Modules;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// <see cref="ParallelBlock"/>'s forward pass when no gradient is recorded: the same arithmetic, but each fused
/// weight is applied as two GEMMs over views (rows [mlp] and [q|k|v] of W_in; columns [attn] and [mlp] of W_out,
/// accumulated in place) and GELU runs in place. On a 2-core CPU one [F+3D]-wide GEMM ran about 20% slower than the
/// two narrower ones (docs/performance.md, attempt 1). Training keeps the single fused GEMMs, since the backward of a
/// view-sliced weight materializes full-size zero gradients (attempt 6).
/// </summary>
internal static class ParallelBlockInference
{
    public static Tensor Forward(Tensor x, Tensor y, Linear inProj, Tensor? mlpBias, Linear? outProj, Linear? attnOutProj,
        Linear? mlpOutProj, LayerScale? ls, FusedLayout layout, int heads, Norm? qNorm, Norm? kNorm, Activation act)
    {
        var (mlpRows, qkvRows) = (layout.InMlpRows, layout.InQkvRows);
        var (attnCols, mlpCols) = (layout.OutAttnColumns, layout.OutMlpColumns);
        var w = inProj.weight!;
        var b = inProj.bias;
        var u = nn.functional.linear(y, w.narrow(0, mlpRows.Start, mlpRows.Length), b?.narrow(0, mlpRows.Start, mlpRows.Length) ?? mlpBias);  // [B, N, F]
        var qkv = nn.functional.linear(y, w.narrow(0, qkvRows.Start, qkvRows.Length), b?.narrow(0, qkvRows.Start, qkvRows.Length));       // [B, N, 3D]
        var p = qkv.chunk(3, -1);                                                               // q | k | v
        var z = AttentionOps.Attend(p[0], p[1], p[2], heads, qNorm, kNorm);                     // [B, N, D]
        var g = Act.Apply(u, act, inPlace: true);                                               // [B, N, F]
        Tensor outp;
        if (outProj is not null)
        {
            var wo = outProj.weight!;
            outp = nn.functional.linear(z, wo.narrow(1, attnCols.Start, attnCols.Length), outProj.bias);
            AddLinear(outp, g, wo.narrow(1, mlpCols.Start, mlpCols.Length));
        }
        else
        {
            outp = attnOutProj!.forward(z);
            AddLinear(outp, g, mlpOutProj!.weight!);
            if (mlpOutProj.bias is not null) outp.PlusInPlace(mlpOutProj.bias);
        }
        ls?.ScaleInPlace(outp);
        return x.Plus(outp);
    }

    // acc += x·Wᵀ in place (no gradient is recorded on this path).
    private static void AddLinear(Tensor acc, Tensor x, Tensor w) =>
        acc.view(-1, acc.shape[^1]).addmm_(x.reshape(-1, x.shape[^1]), w.t());
}
