using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>MLP activation.</summary>
public enum Activation
{
    /// <summary>Exact GELU, <c>0.5·x·(1 + erf(x/√2))</c> (timm default).</summary>
    Gelu,
    /// <summary>tanh-approximated GELU (Flax default, so big_vision checkpoints).</summary>
    GeluTanh,
    /// <summary>QuickGELU, <c>x·sigmoid(1.702·x)</c> (OpenAI CLIP; timm <c>quick_gelu</c>).</summary>
    QuickGelu,
}

/// <summary>Two-layer MLP, <c>fc2(act(fc1(x)))</c> (timm <c>Mlp</c>; keys <c>fc1.*</c>, <c>fc2.*</c>).</summary>
public sealed class Mlp : nn.Module<Tensor, Tensor>
{
    private readonly Linear fc1, fc2;
    private readonly Activation _act;

    /// <summary>Creates the MLP D → F → D.</summary>
    public Mlp(long dim, long hidden, bool bias, Activation act, Device? device = null, ScalarType dtype = ScalarType.Float32)
        : base(nameof(Mlp))
    {
        _act = act;
        fc1 = nn.Linear(dim, hidden, hasBias: bias, device: device, dtype: dtype);
        fc2 = nn.Linear(hidden, dim, hasBias: bias, device: device, dtype: dtype);
        RegisterComponents();
    }

    /// <summary>[..., D] → [..., D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = fc1.forward(x);
        return fc2.forward(Act.Apply(h, _act, inPlace: !h.requires_grad)).MoveToOuterDisposeScope();
    }
}

/// <summary>The activation functions of <see cref="Activation"/>.</summary>
internal static class Act
{
    /// <summary>Applies the activation; <paramref name="inPlace"/> overwrites <paramref name="x"/> (only when no
    /// gradient flows through it: saves one activation-sized allocation).</summary>
    public static Tensor Apply(Tensor x, Activation act, bool inPlace = false) => act switch
    {
        Activation.Gelu => nn.functional.gelu(x, TorchSharp.Modules.GELU.Approximate.none, inPlace),
        Activation.GeluTanh => nn.functional.gelu(x, TorchSharp.Modules.GELU.Approximate.tanh, inPlace),
        Activation.QuickGelu => inPlace ? x.mul_(torch.sigmoid(x.Times(1.702))) : x * torch.sigmoid(x.Times(1.702)),
        _ => throw new ArgumentOutOfRangeException(nameof(act), act, "Unknown activation."),
    };
}
