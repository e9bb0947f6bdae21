using TorchSharp;
using ViT22B.Torch;
using static TorchSharp.torch;

namespace ViT22B.Layers;

/// <summary>
/// Runs one block under activation checkpointing (<see cref="ActivationCheckpointing"/>): the forward pass keeps only
/// the block's input; backward runs the block again with gradients and differentiates that. The block's trainable
/// parameters are inputs of the autograd node, so their gradients reach <c>.grad</c> (and any hook on them) through
/// the ordinary accumulation, in the same order as without checkpointing. The blocks draw no random numbers (no
/// dropout or stochastic depth), so the recomputation is the same function of the same tensors.
/// </summary>
internal static class Recompute
{
    /// <summary><paramref name="run"/>(<paramref name="x"/>) with its activations recomputed in backward; a
    /// failure of the recomputation is passed to <paramref name="onFailure"/> (see <see cref="RecomputeFunction"/>).</summary>
    public static Tensor Apply(Tensor x, Func<Tensor, Tensor> run, IEnumerable<Tensor> parameters, Action<Exception> onFailure)
    {
        var trainable = parameters.Where(p => p.requires_grad).ToArray();
        if (!torch.is_grad_enabled() || (!x.requires_grad && trainable.Length == 0)) return run(x);
        var vars = new object[2 + trainable.Length];
        vars[0] = x;
        vars[1] = new RecomputeArgs(run, trainable, onFailure);
        for (int i = 0; i < trainable.Length; i++) vars[2 + i] = trainable[i];
        // TorchSharp's apply also allocates an empty_like(output) per node for its output cache; a scope of its own
        // frees that at once instead of when the whole block stack returns.
        using var scope = torch.NewDisposeScope();
        return RecomputeFunction.apply(vars).MoveToOuterDisposeScope();
    }
}

/// <summary>The block to run again, its trainable parameters (the node's inputs after the block input and this
/// record, in that order), and where to report a failure of the recomputation.</summary>
internal sealed record RecomputeArgs(Func<Tensor, Tensor> Run, Tensor[] Parameters, Action<Exception> OnFailure);

/// <summary>
/// Autograd: forward runs the block without recording a graph and saves its input; backward runs it again under
/// <c>enable_grad</c> on a detached copy of the input and returns the gradients of the input and of the parameters
/// (<c>torch.autograd.grad</c>, so nothing is accumulated by the inner pass itself).
/// <para>An exception may not leave <c>backward</c> (libtorch calls it from native code and the process would end):
/// a failed recomputation (out of memory, say) is reported to <see cref="RecomputeArgs.OnFailure"/>, which the owner
/// of the block stack throws after <c>backward()</c>, and the gradients of this node are NaN, so a step that goes on
/// regardless cannot produce a plausible-looking update.</para>
/// </summary>
internal sealed class RecomputeFunction : torch.autograd.SingleTensorFunction<RecomputeFunction>
{
    public override string Name => nameof(RecomputeFunction);

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, args) = ((Tensor)vars[0], (RecomputeArgs)vars[1]);
        ctx.save_for_backward(new List<Tensor> { x });
        ctx.save_data("args", args);
        var y = args.Run(x);
        return ReferenceEquals(y, x) ? x.alias() : y;
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
    {
        var saved = ctx.get_saved_variables();      // new handles onto the saved input: released below
        var x = saved[0];
        var args = (RecomputeArgs)ctx.get_data("args");
        var inputs = new List<Tensor>();
        try
        {
            using var scope = torch.NewDisposeScope();
            using var enable = torch.enable_grad();
            using var quiet = AttentionOps.Suspend();     // the forward already reported its attention statistics
            var xd = x.detach().requires_grad_(true);
            inputs.Add(xd);
            inputs.AddRange(args.Parameters);
            var y = args.Run(xd);
            var grads = torch.autograd.grad(new[] { y }, inputs, new[] { grad });
            // Into the scope of whoever called backward() (the trainer's step), which releases these handles after the
            // pass; outside any scope they wait for the garbage collector, like the ring functions' gradients.
            var result = new List<Tensor>(inputs.Count + 1) { grads[0].MoveToOuterDisposeScope(), null! };
            for (int i = 1; i < grads.Count; i++) result.Add(grads[i].MoveToOuterDisposeScope());
            return result;
        }
        catch (Exception e)
        {
            args.OnFailure(e);
            var result = new List<Tensor> { ScalarMath.FullLike(x, double.NaN), null! };
            foreach (var p in args.Parameters) result.Add(ScalarMath.FullLike(p, double.NaN));
            return result;
        }
        finally
        {
            foreach (var t in saved) t.Dispose();
        }
    }
}
