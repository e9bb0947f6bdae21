using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// The one description of the ViT-22B parallel block's fused projections, and of the classic block's fused
/// <c>qkv</c>: which rows and columns hold what, which biases exist, and which part a tensor-parallel rank holds.
/// The block, its sharded form, the sharding plan, initialization and parameter accounting all ask this type.
/// <code>
/// in_proj  [F+3D, D]  rows    mlp | q | k | v       (Q, K, V head-major)
/// out_proj [D, D+F]   columns attn | mlp
/// qkv      [3D, D]    rows    q | k | v             (classic block)
/// </code>
/// Bias rules: <c>in_proj.bias</c> over all F+3D rows when <c>qkv_bias</c>, else the separate <c>mlp_bias</c> [F]
/// when <c>mlp_bias</c>; the fused <c>out_proj.bias</c> exists when <c>proj_bias</c> or <c>mlp_bias</c> (timm's
/// unfused <c>attn_out_proj</c> has a bias iff <c>proj_bias</c>, <c>mlp_out_proj</c> iff <c>mlp_bias</c>; fusing adds
/// the two).
/// </summary>
/// <param name="Dim">Width D.</param>
/// <param name="MlpDim">MLP hidden size F.</param>
/// <param name="QkvBias">The options' <c>qkv_bias</c>.</param>
/// <param name="MlpBias">The options' <c>mlp_bias</c>.</param>
/// <param name="ProjBias">The options' <c>proj_bias</c>.</param>
/// <param name="FuseOutProj">One fused out-projection rather than two.</param>
public sealed record FusedLayout(long Dim, long MlpDim, bool QkvBias, bool MlpBias, bool ProjBias, bool FuseOutProj)
{
    /// <summary>Rows of the in-projection, F + 3D.</summary>
    public long InFeatures => MlpDim + 3 * Dim;

    /// <summary>Columns of the fused out-projection, D + F.</summary>
    public long OutFeatures => Dim + MlpDim;

    /// <summary>The in-projection's output split in row order: mlp, q, k, v.</summary>
    public long[] InSplit => InSplitOf(1);

    /// <summary>The output split of one rank's in-projection shard when <paramref name="ranks"/> ranks share the
    /// block: its MLP slice, then its heads' q, k and v.</summary>
    public long[] InSplitOf(int ranks)
    {
        var (u, a) = PerRank(0, ranks);
        return new[] { u, a, a, a };
    }

    /// <summary>Rows of <c>in_proj</c> holding the MLP's input projection.</summary>
    public (long Start, long Length) InMlpRows => (0, MlpDim);

    /// <summary>Rows of <c>in_proj</c> holding q, k and v, in that order (each D rows, head-major).</summary>
    public (long Start, long Length) InQkvRows => (MlpDim, 3 * Dim);

    /// <summary>Columns of the fused <c>out_proj</c> that take the attention output.</summary>
    public (long Start, long Length) OutAttnColumns => (0, Dim);

    /// <summary>Columns of the fused <c>out_proj</c> that take the MLP's hidden activation.</summary>
    public (long Start, long Length) OutMlpColumns => (Dim, MlpDim);

    /// <summary>Why the parallel block cannot have these biases: its one <c>in_proj.bias</c> covers all F+3D rows, so
    /// <c>qkv_bias</c> without <c>mlp_bias</c> has no fused form.</summary>
    internal const string ParallelBiasRule =
        "a parallel block with qkv_bias = true has one in_proj bias over all F+3D rows, so mlp_bias must be true.";

    /// <summary>Whether the parallel block can have these biases (<see cref="ParallelBiasRule"/>).</summary>
    internal bool ParallelBiasesAgree => !QkvBias || MlpBias;

    /// <summary><c>in_proj.bias</c> exists (over all rows).</summary>
    public bool InProjBias => QkvBias;

    /// <summary>The separate <c>mlp_bias</c> [F] on the MLP rows exists (no <c>in_proj.bias</c>).</summary>
    public bool SeparateMlpBias => !QkvBias && MlpBias;

    /// <summary>The fused <c>out_proj.bias</c> exists.</summary>
    public bool OutProjBias => ProjBias || MlpBias;

    /// <summary>timm's unfused <c>attn_out_proj.bias</c> exists.</summary>
    public bool AttnOutProjBias => ProjBias;

    /// <summary>timm's unfused <c>mlp_out_proj.bias</c> exists.</summary>
    public bool MlpOutProjBias => MlpBias;

    /// <summary>The in-projection's sub-matrices (out, in) in row order, as if unfused: MLP-in, q, k, v.</summary>
    public (long Out, long In)[] InBlocks => new[] { (MlpDim, Dim), (Dim, Dim), (Dim, Dim), (Dim, Dim) };

    /// <summary>The fused out-projection's sub-matrices (out, in) in column order: attention-out, MLP-out.</summary>
    public (long Out, long In)[] OutBlocks => new[] { (Dim, Dim), (Dim, MlpDim) };

    /// <summary>Rows of the classic block's <c>qkv</c>, 3D.</summary>
    public long QkvFeatures => 3 * Dim;

    /// <summary>The output split of one rank's <c>qkv</c> shard when <paramref name="ranks"/> ranks share the block
    /// (1: the whole <c>qkv</c>): its heads' q, k and v.</summary>
    public long[] QkvSplitOf(int ranks)
    {
        var (_, a) = PerRank(0, ranks);
        return new[] { a, a, a };
    }

    /// <summary>The fused <c>out_proj.weight</c> [D, D+F] of unfused ones (timm's <c>attn_out_proj.weight</c> [D, D],
    /// <c>mlp_out_proj.weight</c> [D, F]): attention columns first (<see cref="OutAttnColumns"/>), then the MLP's.</summary>
    internal static Tensor FuseOutWeight(Tensor attnOutWeight, Tensor mlpOutWeight) => cat(new[] { attnOutWeight, mlpOutWeight }, 1);

    /// <summary>The fused <c>out_proj.bias</c> of unfused biases: their sum, or the one that exists, or none.</summary>
    internal static Tensor? FuseOutBias(Tensor? attnOutBias, Tensor? mlpOutBias) =>
        attnOutBias is null ? mlpOutBias : mlpOutBias is null ? attnOutBias : attnOutBias.Plus(mlpOutBias);

    /// <summary>The classic block's <c>qkv</c> sub-matrices (out, in) in row order: q, k, v.</summary>
    public (long Out, long In)[] QkvBlocks => new[] { (Dim, Dim), (Dim, Dim), (Dim, Dim) };

    /// <summary>Rows of <c>in_proj</c> that rank <paramref name="rank"/> of <paramref name="ranks"/> holds, in the
    /// order it stores them: its MLP slice, then its heads' rows of q, k and v ([U_r | Q_r | K_r | V_r]).</summary>
    public (long Start, long Length)[] InRows(int rank, int ranks)
    {
        var (u, a) = PerRank(rank, ranks);
        return new[] { (rank * u, u), (MlpDim + rank * a, a), (MlpDim + Dim + rank * a, a), (MlpDim + 2 * Dim + rank * a, a) };
    }

    /// <summary>Rows (of <c>mlp_bias</c>, <c>mlp.fc1</c>) or columns (of <c>mlp.fc2</c>, <c>mlp_out_proj</c>) of a rank's MLP slice.</summary>
    public (long Start, long Length)[] MlpRange(int rank, int ranks)
    {
        var (u, _) = PerRank(rank, ranks);
        return new[] { (rank * u, u) };
    }

    /// <summary>Columns of the fused <c>out_proj</c> that a rank holds: its heads' attention columns, then its MLP
    /// slice ([Z_r | G_r]).</summary>
    public (long Start, long Length)[] OutColumns(int rank, int ranks)
    {
        var (u, a) = PerRank(rank, ranks);
        return new[] { (rank * a, a), (Dim + rank * u, u) };
    }

    /// <summary>Columns (attention out-projection) or rows (q, k or v alone) of a rank's heads.</summary>
    public (long Start, long Length)[] HeadRange(int rank, int ranks)
    {
        var (_, a) = PerRank(rank, ranks);
        return new[] { (rank * a, a) };
    }

    /// <summary>Rows of the classic block's <c>qkv</c> that a rank holds: its heads' rows of q, k and v.</summary>
    public (long Start, long Length)[] QkvRows(int rank, int ranks)
    {
        var (_, a) = PerRank(rank, ranks);
        return new[] { (rank * a, a), (Dim + rank * a, a), (2 * Dim + rank * a, a) };
    }

    private (long Mlp, long Attn) PerRank(int rank, int ranks)
    {
        if (ranks < 1 || rank < 0 || rank >= ranks) throw new ArgumentOutOfRangeException(nameof(rank), $"Rank {rank} of {ranks}.");
        if (MlpDim % ranks != 0 || Dim % ranks != 0)
            throw new ArgumentException($"Cannot split D = {Dim} and F = {MlpDim} evenly over {ranks} ranks.");
        return (MlpDim / ranks, Dim / ranks);
    }
}
