using TorchSharp;
using ViT22B.Interop;
using ViT22B.Layers;
using static TorchSharp.torch;

namespace ViT22B.Models;

/// <summary>
/// Inference with a model whose weights need not fit in memory: the stem, final norm, pooling head and classifier are
/// loaded once; each block is built, loaded from the weight source, run and released in turn, with the next block
/// loaded on a second thread while the current one computes (at most two blocks in memory). The source is any
/// <see cref="ITensorSource"/> with timm's keys: a safetensors file or Hugging Face index, or <see cref="SeededWeights"/>
/// for a model with no checkpoint at all (how ViT-22B/14 runs on a 24 GiB machine: docs/scale.md). The outputs
/// equal those of a <see cref="VisionTransformer"/> holding the same weights.
/// <para>Every block's keys and shapes are checked against the source before anything is computed. The source is read
/// from the prefetch thread as well, so it must not be read by anyone else during a pass.</para>
/// </summary>
public sealed class StreamedVisionTransformer : IDisposable
{
    private readonly VisionTransformer _model;
    private readonly StreamedEncoder _blocks;

    /// <summary>Loads the resident parameters of <paramref name="config"/>'s model from <paramref name="weights"/> onto
    /// <paramref name="device"/> (default CPU) in <paramref name="dtype"/> (default the config's) and checks every block key.</summary>
    /// <exception cref="KeyNotFoundException">A parameter is missing from the source (the message names it and the source).</exception>
    /// <exception cref="ArgumentException">A parameter has another shape in the source (named, with both shapes).</exception>
    public StreamedVisionTransformer(ViTConfig config, ITensorSource weights, Device? device = null, ScalarType? dtype = null, bool prefetch = true)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(weights);
        config.Validate();
        var shapes = VisionTransformer.StateShapes(config);
        foreach (var (key, shape) in shapes) TensorSources.CheckShape(weights, key, shape);
        StreamedEncoder? blocks = null;
        _model = new VisionTransformer(config, device, dtype,
            (c, _, dt) => blocks = new StreamedEncoder(c, weights, dt, prefetch),
            m => LoadResident(m, weights));
        _blocks = blocks!;
    }

    /// <summary>The architecture.</summary>
    public ViTConfig Config => _model.Config;

    /// <summary>The resident part (everything but the blocks), whose state dict has no <c>blocks.*</c> keys.</summary>
    public VisionTransformer Resident => _model;

    /// <summary>Where the time of the last pass went.</summary>
    public StreamingStats? LastPass => _blocks.LastPass;

    /// <summary>Images [B, C, H, W] → logits (or pooled embeddings), as <see cref="VisionTransformer.forward"/>; runs
    /// without gradients.</summary>
    public Tensor Forward(Tensor images)
    {
        using var inference = torch.inference_mode();
        return _model.call(images);
    }

    /// <summary>Pooled embedding, patch tokens and logits, as <see cref="VisionTransformer.Encode"/>; without gradients.</summary>
    public ViTOutput Encode(Tensor images)
    {
        using var inference = torch.inference_mode();
        return _model.Encode(images);
    }

    /// <summary>Releases the resident parameters.</summary>
    public void Dispose() => _model.Dispose();

    /// <summary>Copies <paramref name="weights"/>' tensors into <paramref name="module"/>'s parameters named
    /// <paramref name="prefix"/> + their key, converting dtype and device; one staging tensor at a time.</summary>
    internal static void Load(nn.Module module, ITensorSource weights, string prefix)
    {
        using var noGrad = torch.no_grad();
        foreach (var (key, p) in module.named_parameters())
        {
            using var source = weights.Read(prefix + key);
            p.copy_(source);
        }
    }

    private static void LoadResident(VisionTransformer model, ITensorSource weights) => Load(model, weights, "");
}
