using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Layers;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>The outputs of one pass through a <see cref="VisionTransformer"/>.</summary>
/// <param name="Pooled">The pooled pre-logits embedding [B, D].</param>
/// <param name="PatchTokens">The encoder's output patch tokens [B, N, D] (after the final norm when the model applies
/// one before pooling; prefix tokens excluded).</param>
/// <param name="Logits">Classifier outputs [B, C], or null when the model has no classifier.</param>
public sealed record ViTOutput(Tensor Pooled, Tensor PatchTokens, Tensor? Logits) : IDisposable
{
    /// <summary>Disposes the three tensors.</summary>
    public void Dispose()
    {
        Pooled.Dispose();
        PatchTokens.Dispose();
        Logits?.Dispose();
    }
}

/// <summary>One block's output from <see cref="VisionTransformer.ForwardIntermediates(Tensor, IEnumerable{int}, bool, bool)"/>.</summary>
/// <param name="Block">The block's index (0-based).</param>
/// <param name="Tokens">Patch tokens [B, N, D], or the feature map [B, D, h, w] when asked for.</param>
/// <param name="Prefix">The prefix tokens (class, registers) [B, P, D], or null when the model has none.</param>
public sealed record IntermediateOutput(int Block, Tensor Tokens, Tensor? Prefix) : IDisposable
{
    /// <summary>Disposes the tensors.</summary>
    public void Dispose()
    {
        Tokens.Dispose();
        Prefix?.Dispose();
    }
}

/// <summary>
/// Vision transformer of the ViT-22B family (and classic ViT / SoViT) as described by a <see cref="ViTConfig"/>:
/// patch embedding → position embedding (+ class token) → optional pre-norm → blocks → final norm → pooling
/// (MAP, GAP or class token) → optional linear classifier. State-dict keys equal timm's
/// <c>VisionTransformer</c> for the same options (docs/model.md#state-dict-keys), so timm and converted big_vision checkpoints load
/// without renaming (<see cref="Interop.SafetensorsCheckpoint"/>).
/// <para>Built with explicit <c>device</c> and <c>dtype</c> (TorchSharp's defaults are process-global); the
/// parameters are initialized as big_vision does (docs/model.md#initialization, <see cref="Initialization"/>) from TorchSharp's
/// default generator, so seed it with <c>torch.manual_seed</c> for reproducible weights. Build models outside any
/// dispose scope.</para>
/// </summary>
public sealed class VisionTransformer : nn.Module<Tensor, Tensor>
{
    private readonly PatchEmbed patch_embed;
    private readonly Parameter? cls_token;
    private readonly Parameter? reg_token;
    private readonly Parameter? pos_embed;
    private readonly Norm? norm_pre;
    private readonly nn.Module blocks;   // an Encoder, or the sharded encoder: a BlockStack<TBlock> either way
    private readonly Norm? norm;
    private readonly MapHead? attn_pool;
    private readonly Norm? fc_norm;
    private readonly Linear? head;

    /// <summary>The (validated) architecture.</summary>
    public ViTConfig Config { get; }

    /// <summary>Builds and initializes a model on <paramref name="device"/> (default CPU) in <paramref name="dtype"/>
    /// (default <see cref="ViTConfig.DType"/>).</summary>
    public VisionTransformer(ViTConfig config, Device? device = null, ScalarType? dtype = null)
        : this(config, device, dtype, (c, dev, dt) => new Encoder(c.Block, c.Depth, c.BlockOptions, dev, dt), Initialization.BigVision)
    {
    }

    /// <summary>
    /// Builds a model whose block stack comes from <paramref name="blockStack"/> and whose parameters are then
    /// initialized by <paramref name="initialize"/> (the sharded model of <c>ViT22B.Parallel</c> builds its rank's
    /// shard this way, with its sharded encoder and an initialization that uses the full parameters' bounds).
    /// </summary>
    internal VisionTransformer(ViTConfig config, Device? device, ScalarType? dtype,
        Func<ViTConfig, Device, ScalarType, IBlockStack> blockStack, Action<VisionTransformer> initialize)
        : base(nameof(VisionTransformer))
    {
        ArgumentNullException.ThrowIfNull(blockStack);
        ArgumentNullException.ThrowIfNull(initialize);
        ArgumentNullException.ThrowIfNull(config);
        Config = config.Validate();
        var c = Config;
        var dt = dtype ?? c.DType;
        if (dt is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float64))
            throw new ArgumentException($"dtype must be a floating-point type (float32, bfloat16, float16, float64), found {dt}.", nameof(dtype));
        device ??= torch.CPU;

        patch_embed = new PatchEmbed(c.InChans, c.EmbedDim, c.PatchSize, bias: !c.PreNorm, device, dt);
        if (c.ClassToken) cls_token = Param.Of(torch.zeros(1, 1, c.EmbedDim, dtype: dt, device: device));
        if (c.RegTokens > 0) reg_token = Param.Of(torch.zeros(1, c.RegTokens, c.EmbedDim, dtype: dt, device: device));
        if (c.PosEmbed == PosEmbedKind.Learn)
        {
            int slots = c.NumPatches + (c.NoEmbedClass ? 0 : c.NumPrefixTokens);
            pos_embed = Param.Of(torch.zeros(1, slots, c.EmbedDim, dtype: dt, device: device));
        }
        if (c.PreNorm) norm_pre = new Norm(c.EmbedDim, c.Norm, c.NormBias, c.NormEps, device, dt);
        blocks = (nn.Module)blockStack(c, device, dt);
        if (c.UsesFcNorm) fc_norm = new Norm(c.EmbedDim, c.Norm, c.NormBias, c.NormEps, device, dt);
        else norm = new Norm(c.EmbedDim, c.Norm, c.NormBias, c.NormEps, device, dt);
        if (c.GlobalPool == GlobalPool.Map) attn_pool = new MapHead(c.BlockOptions, device, dt);
        if (c.NumClasses > 0) head = nn.Linear(c.EmbedDim, c.NumClasses, hasBias: true, device: device, dtype: dt);
        RegisterComponents();
        initialize(this);
    }

    /// <summary>
    /// The state-dict keys and shapes of <paramref name="c"/>'s model in state-dict order, from a one-block model on
    /// the meta device: nothing is allocated, even for ViT-22B.
    /// </summary>
    internal static Dictionary<string, long[]> StateShapes(ViTConfig c)
    {
        using var meta = new VisionTransformer(c with { Depth = Math.Min(c.Depth, 1) }, torch.META, ScalarType.Float32);
        var one = meta.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.shape);
        const string first = "blocks.0.";
        var leaves = one.Keys.Where(k => k.StartsWith(first, StringComparison.Ordinal)).Select(k => k[first.Length..]).ToList();
        var all = new Dictionary<string, long[]>();
        foreach (var (key, shape) in one)
        {
            if (!key.StartsWith("blocks.", StringComparison.Ordinal)) all[key] = shape;
            else if (key == first + leaves[0])
            {
                for (int i = 0; i < c.Depth; i++)
                    foreach (var leaf in leaves) all[$"blocks.{i}.{leaf}"] = one[first + leaf];
            }
        }
        return all;
    }

    /// <summary>The dtype of the parameters.</summary>
    public ScalarType DType => patch_embed.parameters().First().dtype;

    /// <summary>The device of the parameters.</summary>
    public Device Device => patch_embed.parameters().First().device;

    /// <summary>
    /// Which blocks recompute their activations in backward instead of keeping them (default
    /// <see cref="ActivationCheckpointing.None"/>; timm's <c>set_grad_checkpointing</c>). Gradients are unchanged;
    /// see <see cref="ActivationCheckpointing"/> for the memory and the FLOPs it trades. When a recomputation fails
    /// inside <c>backward()</c> (out of memory, say) the gradients of that pass are NaN and
    /// <see cref="ThrowIfBackwardFailed"/> throws the failure (the trainers call it after every backward).
    /// </summary>
    /// <exception cref="ArgumentException">The set names a block the model does not have.</exception>
    public ActivationCheckpointing Checkpointing
    {
        get => ((IBlockStack)blocks).Checkpointing;
        set => ((IBlockStack)blocks).Checkpointing = value;
    }

    /// <summary>Throws (and forgets) the first failure of a block's recomputation in the last <c>backward()</c>
    /// (<see cref="Checkpointing"/>); does nothing when there was none.</summary>
    public void ThrowIfBackwardFailed() => ((IBlockStack)blocks).ThrowIfBackwardFailed();

    /// <summary>Images [B, C, H, W] → logits [B, C] (or the pooled embedding [B, D] when <see cref="ViTConfig.NumClasses"/> is 0).</summary>
    public override Tensor forward(Tensor images)
    {
        using var scope = torch.NewDisposeScope();
        return ForwardHead(ForwardFeatures(images)).MoveToOuterDisposeScope();
    }

    /// <summary>Images [B, C, H, W] → all tokens after the blocks and the final norm [B, prefix + N, D]
    /// (timm <c>forward_features</c>; with <c>fc_norm</c>, the default for GAP pooling, there is no final norm here:
    /// it follows the pooling).</summary>
    public Tensor ForwardFeatures(Tensor images)
    {
        var (gh, gw) = CheckImages(images);
        using var scope = torch.NewDisposeScope();
        var x = patch_embed.call(images);
        x = AddPositions(x, gh, gw);
        if (norm_pre is not null) x = norm_pre.call(x);
        x = ((IBlockStack)blocks).forward(x);
        if (norm is not null) x = norm.call(x);
        return x.MoveToOuterDisposeScope();
    }

    /// <summary>Tokens from <see cref="ForwardFeatures"/> → logits, or the pooled pre-logits embedding [B, D] when
    /// <paramref name="preLogits"/> is true or there is no classifier.</summary>
    public Tensor ForwardHead(Tensor tokens, bool preLogits = false)
    {
        using var scope = torch.NewDisposeScope();
        // timm's pool(): the MAP head and the average see the patch tokens only unless PoolIncludePrefix.
        int prefix = Config.NumPrefixTokens;
        var pooledTokens = Config.PoolIncludePrefix || prefix == 0 ? tokens : tokens.narrow(1, prefix, tokens.shape[1] - prefix);
        var pooled = Config.GlobalPool switch
        {
            GlobalPool.Map => attn_pool!.call(pooledTokens),
            GlobalPool.Gap => pooledTokens.mean(new long[] { 1 }),
            _ => tokens.select(1, 0),
        };
        if (fc_norm is not null) pooled = fc_norm.call(pooled);
        var result = preLogits || head is null ? pooled : head.forward(pooled);
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>One pass that returns the pooled embedding, the patch tokens and (with a classifier) the logits.</summary>
    public ViTOutput Encode(Tensor images)
    {
        using var scope = torch.NewDisposeScope();
        var tokens = ForwardFeatures(images);
        var pooled = ForwardHead(tokens, preLogits: true);
        var logits = head?.forward(pooled);
        var patches = tokens.narrow(1, Config.NumPrefixTokens, tokens.shape[1] - Config.NumPrefixTokens);
        return new ViTOutput(pooled.MoveToOuterDisposeScope(), patches.MoveToOuterDisposeScope(), logits?.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// The outputs of the blocks <paramref name="indices"/> (negative indices count from the last block), in block
    /// order, as timm's <c>forward_intermediates(indices, norm, output_fmt, intermediates_only=True)</c>: with
    /// <paramref name="norm"/> the model's final norm is applied to each (a GAP model has none before pooling, as in
    /// timm); prefix tokens are split off; <paramref name="featureMaps"/> gives [B, D, h, w] maps instead of [B, N, D]
    /// tokens, for detection and segmentation heads. The blocks after the last one asked for are not run.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">An index outside [−depth, depth), or none.</exception>
    /// <exception cref="NotSupportedException">A sharded model (its blocks run as one collective stack).</exception>
    public IReadOnlyList<IntermediateOutput> ForwardIntermediates(Tensor images, IEnumerable<int> indices, bool norm = false, bool featureMaps = false)
    {
        ArgumentNullException.ThrowIfNull(indices);
        int depth = Config.Depth;
        var take = new SortedSet<int>();
        foreach (int i in indices)
        {
            if (i < -depth || i >= depth)
                throw new ArgumentOutOfRangeException(nameof(indices), $"Block index {i} is outside the model's {depth} blocks (use 0…{depth - 1}, or −{depth}…−1 from the end).");
            take.Add(i < 0 ? depth + i : i);
        }
        if (take.Count == 0) throw new ArgumentOutOfRangeException(nameof(indices), "No block indices given.");
        if (blocks is not Encoder encoder)
            throw new NotSupportedException("ForwardIntermediates runs the blocks of a single-device model one by one; a sharded model's blocks run as one collective stack.");
        var (gh, gw) = CheckImages(images);
        using var scope = torch.NewDisposeScope();
        var x = patch_embed.call(images);
        x = AddPositions(x, gh, gw);
        if (norm_pre is not null) x = norm_pre.call(x);
        var result = new List<IntermediateOutput>();
        int prefix = Config.NumPrefixTokens, last = take.Max;
        for (int i = 0; i <= last; i++)
        {
            x = encoder[i].call(x);
            if (!take.Contains(i)) continue;
            var y = norm && this.norm is not null ? this.norm.call(x) : x;
            var tokens = y.narrow(1, prefix, y.shape[1] - prefix);
            if (featureMaps) tokens = tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[2]).permute(0, 3, 1, 2).contiguous();
            var pre = prefix > 0 ? y.narrow(1, 0, prefix).MoveToOuterDisposeScope() : null;
            result.Add(new IntermediateOutput(i, tokens.MoveToOuterDisposeScope(), pre));
        }
        return result;
    }

    /// <summary>The last <paramref name="lastBlocks"/> blocks' outputs (timm's <c>indices=n</c>); see
    /// <see cref="ForwardIntermediates(Tensor, IEnumerable{int}, bool, bool)"/>.</summary>
    public IReadOnlyList<IntermediateOutput> ForwardIntermediates(Tensor images, int lastBlocks, bool norm = false, bool featureMaps = false)
    {
        if (lastBlocks < 1 || lastBlocks > Config.Depth)
            throw new ArgumentOutOfRangeException(nameof(lastBlocks), $"Asked for the last {lastBlocks} blocks of {Config.Depth}.");
        return ForwardIntermediates(images, Enumerable.Range(Config.Depth - lastBlocks, lastBlocks), norm, featureMaps);
    }

    private (long Gh, long Gw) CheckImages(Tensor images)
    {
        var c = Config;
        if (images.dim() != 4)
            throw new ArgumentException($"Expected images [B, C, H, W], found shape [{string.Join(", ", images.shape)}].", nameof(images));
        long ch = images.shape[1], h = images.shape[2], w = images.shape[3];
        if (ch != c.InChans)
            throw new ArgumentException($"Expected {c.InChans} input channels, found {ch} (images of shape [{string.Join(", ", images.shape)}]).", nameof(images));
        if (c.DynamicImgSize)
        {
            if (h % c.PatchSize != 0 || w % c.PatchSize != 0 || h == 0 || w == 0)
                throw new ArgumentException($"Image size {h}×{w} is not a positive multiple of the patch size {c.PatchSize}.", nameof(images));
        }
        else if (h != c.ImageShape.Height || w != c.ImageShape.Width)
        {
            throw new ArgumentException($"Expected {c.ImageShape.Height}×{c.ImageShape.Width} images, found {h}×{w}; set dynamic_img_size to resample the position embedding for other sizes.", nameof(images));
        }
        var p = patch_embed.parameters().First();
        if (images.dtype != p.dtype)
            throw new ArgumentException($"Images are {images.dtype} but the model's parameters are {p.dtype}; convert the input with .to({p.dtype}).", nameof(images));
        if (images.device.type != p.device.type || (p.device.type == DeviceType.CUDA && images.device.index != p.device.index))
            throw new ArgumentException($"Images are on {images.device} but the model is on {p.device}.", nameof(images));
        return (h / c.PatchSize, w / c.PatchSize);
    }

    private Tensor AddPositions(Tensor x, long gh, long gw)
    {
        var c = Config;
        using var scope = torch.NewDisposeScope();
        long b = x.shape[0];
        var prefixes = new[] { cls_token, reg_token }.Where(t => t is not null).Select(t => t!.expand(b, -1, -1)).ToArray();
        Tensor? prefix = prefixes.Length == 0 ? null : prefixes.Length == 1 ? prefixes[0] : torch.cat(prefixes, 1);   // [cls | registers]
        Tensor result;
        if (pos_embed is null)
        {
            x = x.Plus(SinCosPosEmbed.Table(gh, gw, c.EmbedDim, x.dtype, x.device));
            result = prefix is null ? x : torch.cat(new[] { prefix, x }, 1);
        }
        else
        {
            bool slot = prefix is not null && !c.NoEmbedClass;      // the prefix tokens have position slots of their own
            Tensor pos = pos_embed;
            if (gh != c.GridHeight || gw != c.GridWidth)
                pos = EmbeddingResampling.PositionEmbedding(pos_embed, slot ? c.NumPrefixTokens : 0, (c.GridHeight, c.GridWidth), (gh, gw));
            result = slot ? torch.cat(new[] { prefix!, x }, 1).Plus(pos)
                : prefix is null ? x.Plus(pos) : torch.cat(new[] { prefix, x.Plus(pos) }, 1);
        }
        return result.MoveToOuterDisposeScope();
    }
}
