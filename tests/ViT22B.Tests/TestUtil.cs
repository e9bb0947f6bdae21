using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Tests;

internal static class TestUtil
{
    /// <summary>Overwrites every parameter with seeded N(0, scale²) values (norm scales around 1), so that no
    /// term of a forward pass is trivially zero or one.</summary>
    public static void Randomize(nn.Module module, long seed, double scale = 0.5)
    {
        var g = new torch.Generator((ulong)seed);
        using var noGrad = torch.no_grad();
        foreach (var (name, p) in module.named_parameters())
        {
            using var scope = torch.NewDisposeScope();   // holds the temporaries through each native call
            // Numbers go through ScalarMath: an implicit Scalar (r + 1.0) was once freed by its finalizer during the
            // add ("Unknown scalar type" on a rank thread, CI 2026-12-02; docs/torchsharp-notes.md#scalars).
            var r = torch.randn(p.shape, dtype: ScalarType.Float64, generator: g).Times(scale);
            if (name.EndsWith("norm.weight", StringComparison.Ordinal) || name.EndsWith("norm1.weight", StringComparison.Ordinal) || name.EndsWith("norm2.weight", StringComparison.Ordinal) || name.EndsWith("norm_pre.weight", StringComparison.Ordinal))
                r = r.Plus(1.0);
            p.copy_(r);
        }
    }

    /// <summary>The state dict (CPU copies) of a model of <paramref name="c"/> randomized by <see cref="Randomize"/>.</summary>
    public static Dictionary<string, Tensor> RandomState(ViTConfig c, long seed, double scale, ScalarType dtype)
    {
        using var model = new VisionTransformer(c, torch.CPU, dtype);
        Randomize(model, seed, scale);
        using var scope = torch.NewDisposeScope();   // holds each detach() through its clone() (see MaxAbs)
        return model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone().DetachFromDisposeScope());
    }

    public static Tensor RandomImages(ViTConfig c, long batch, long seed, ScalarType dtype = ScalarType.Float64, long? h = null, long? w = null)
    {
        var g = new torch.Generator((ulong)seed);
        using var x = torch.randn(new[] { batch, (long)c.InChans, h ?? c.ImageShape.Height, w ?? c.ImageShape.Width }, dtype: ScalarType.Float64, generator: g);
        return x.to(dtype);
    }

    /// <summary>max |a − e| / max |e|, computed in float64.</summary>
    public static double RelErr(Tensor actual, Tensor expected)
    {
        using var scope = torch.NewDisposeScope();   // keeps the temporaries alive through each native call (see MaxAbs)
        var a = actual.detach().to(ScalarType.Float64).cpu();
        var e = expected.detach().to(ScalarType.Float64).cpu();
        Assert.Equal(e.shape, a.shape);
        double scale = e.abs().max().item<double>();
        return (a - e).abs().max().item<double>() / Math.Max(scale, 1e-300);
    }

    /// <summary>max |a − e| in float64. The temporaries live in a dispose scope: a TorchSharp tensor referenced only by
    /// the argument of a native call can be finalized (and its memory freed) while that call still runs.</summary>
    public static double MaxAbs(Tensor actual, Tensor expected)
    {
        using var scope = torch.NewDisposeScope();
        return (actual.detach().to(ScalarType.Float64).cpu() - expected.detach().to(ScalarType.Float64).cpu()).abs().max().item<double>();
    }

    /// <summary>Whether a library whose file name starts with <paramref name="fileNamePrefix"/> is mapped into this
    /// process (Linux <c>/proc/self/maps</c>).</summary>
    public static bool IsMappedInProcess(string fileNamePrefix) =>
        MappedFiles().Any(p => Path.GetFileName(p).StartsWith(fileNamePrefix, StringComparison.Ordinal));

    /// <summary>The paths of the files mapped into this process (Linux <c>/proc/self/maps</c>), one per mapping.</summary>
    public static IEnumerable<string> MappedFiles() =>
        File.ReadLines("/proc/self/maps").Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries).LastOrDefault() ?? "");

    /// <summary>A tiny config for fast numerics tests: 2 blocks, width 16, 2 heads, 16×16 images of 4×4 patches.</summary>
    public static ViTConfig Tiny(BlockKind block) => new()
    {
        ImgSize = 16, PatchSize = 4, InChans = 3, EmbedDim = 16, Depth = 2, NumHeads = 2, MlpDim = 24, Block = block,
        NumClasses = 5,
    };

    /// <summary>Knob combinations exercised by the numerics tests (each must validate).</summary>
    public static IEnumerable<(string Name, ViTConfig Config)> Variants()
    {
        foreach (var block in new[] { BlockKind.Parallel, BlockKind.Sequential })
        {
            var t = Tiny(block);
            string b = block.ToString();
            yield return ($"{b}-default", t);
            yield return ($"{b}-vit22b", t with { QkvBias = false, QkNorm = true, Norm = NormKind.RmsNorm, NormBias = false, GlobalPool = GlobalPool.Map, NumClasses = 0 });
            yield return ($"{b}-classic", t with { QkvBias = true, QkNorm = false, NormBias = true, Act = Activation.Gelu, ClassToken = true, GlobalPool = GlobalPool.Token });
            yield return ($"{b}-gap-sincos", t with { GlobalPool = GlobalPool.Gap, PosEmbed = PosEmbedKind.SinCos2d, ClassToken = true, NormBias = true });
            yield return ($"{b}-xp", t with { Norm = NormKind.RmsNorm, PreNorm = true, ClassToken = true, NoEmbedClass = true, GlobalPool = GlobalPool.Token, FuseOutProj = false });
            yield return ($"{b}-nobias", t with { QkvBias = false, MlpBias = false, ProjBias = false, NormBias = false, PreNorm = true, GlobalPool = GlobalPool.Gap, NumClasses = 3 });
            yield return ($"{b}-unfused-gelu", t with { FuseOutProj = false, Act = Activation.Gelu, ProjBias = false, NormBias = true, InChans = 1 });
            yield return ($"{b}-layerscale-quickgelu-registers", t with { InitValues = 1e-5, Act = Activation.QuickGelu, ClassToken = true, RegTokens = 2, GlobalPool = GlobalPool.Token, NumClasses = 4 });
            yield return ($"{b}-registers-no-embed-class-gap", t with { RegTokens = 3, ClassToken = true, NoEmbedClass = true, GlobalPool = GlobalPool.Gap, NormBias = true });
            yield return ($"{b}-gap-without-fc-norm", t with { GlobalPool = GlobalPool.Gap, FcNorm = false, NormBias = true });
            yield return ($"{b}-token-with-fc-norm", t with { ClassToken = true, GlobalPool = GlobalPool.Token, FcNorm = true });
            yield return ($"{b}-map-over-patches", t with { ClassToken = true, RegTokens = 2, GlobalPool = GlobalPool.Map, NumClasses = 3 });
            yield return ($"{b}-map-including-prefix", t with { ClassToken = true, GlobalPool = GlobalPool.Map, PoolIncludePrefix = true });
        }
    }
}

internal static class TensorAssert
{
    /// <summary>Same shape, dtype and bits (NaN-free tensors). The comparison's temporary lives in a dispose scope (see
    /// TestUtil.MaxAbs): unscoped, it was once finalized during <c>all()</c> and crashed the test host in
    /// <c>at::meta::make_reduction</c> (CI, 2026-12-02).</summary>
    public static bool Same(torch.Tensor a, torch.Tensor b)
    {
        if (!a.shape.SequenceEqual(b.shape) || a.dtype != b.dtype) return false;
        using var scope = torch.NewDisposeScope();
        return a.eq(b).all().item<bool>();
    }

    /// <summary>Every element equals <paramref name="value"/> (compared in the tensor's dtype); temporaries scoped as
    /// in <see cref="Same"/>.</summary>
    public static bool AllEqual(torch.Tensor t, double value)
    {
        using var scope = torch.NewDisposeScope();
        return t.eq(ScalarMath.FullLike(t, value)).all().item<bool>();
    }
}

/// <summary>Why a GPU test cannot run here (null when it can); shared by both test projects' fact attributes.</summary>
internal static class GpuAvailability
{
    public static string? NoCuda() => torch.cuda.is_available() ? null
        : "No CUDA device: this machine has no GPU (or no CUDA build of libtorch); the CPU tests cover the same numerics.";

    public static string? NoNccl()
    {
        if (!torch.cuda.is_available()) return "No CUDA device: NCCL tests need a GPU.";
        var path = Environment.GetEnvironmentVariable(ViT22B.Interop.Nccl.PathVariable);
        bool found = path is { Length: > 0 } && System.Runtime.InteropServices.NativeLibrary.TryLoad(path, out _)
                     || System.Runtime.InteropServices.NativeLibrary.TryLoad("libnccl.so.2", out _);
        return found ? null : "libnccl.so.2 is not on the library path (set VIT22B_NCCL_PATH or install NCCL).";
    }

    public static string? HasCuda() => torch.cuda.is_available() ? "CUDA is available here: this test checks the behaviour of a CPU-only machine." : null;
}
