using TorchSharp;
using TorchSharp.Modules;
using ViT22B.Training;
using ViT22B.Torch;
using AdamW = ViT22B.Training.AdamW;
using static TorchSharp.torch;

namespace ViT22B.Tests.Training;

public sealed class OptimizerTests
{
    // The temporaries are held in locals until the native calls that read them return (docs/torchsharp-notes.md).
    private static Parameter P(double[] values, params long[] shape)
    {
        using var flat = torch.tensor(values, dtype: ScalarType.Float64);
        return new(flat.reshape(shape));
    }

    private static void SetGrad(Parameter p, double[] g)
    {
        using var flat = torch.tensor(g, dtype: p.dtype);
        using var grad = flat.reshape(p.shape);
        p.grad = grad;
    }

    [Fact]
    public void AdamW_two_steps_match_the_hand_computed_update()
    {
        double[] w0 = { 0.5, -1.0, 2.0 }, g1 = { 0.1, -0.2, 0.3 }, g2 = { -0.05, 0.4, 0.0 };
        using var p = P(w0, 3);
        double lr = 0.01, wd = 0.1, b1 = 0.9, b2 = 0.99, eps = 1e-8;
        using var opt = new AdamW(new[] { new OptimizedParameter("w", p, wd) }, b1, b2, eps);
        var w = (double[])w0.Clone();
        var m = new double[3];
        var v = new double[3];
        foreach (var (g, t) in new[] { (g1, 1), (g2, 2) })
        {
            SetGrad(p, g);
            opt.Step(lr);
            for (int i = 0; i < 3; i++)
            {
                w[i] *= 1 - lr * wd;
                m[i] = b1 * m[i] + (1 - b1) * g[i];
                v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
                double mh = m[i] / (1 - Math.Pow(b1, t)), vh = v[i] / (1 - Math.Pow(b2, t));
                w[i] -= lr * mh / (Math.Sqrt(vh) + eps);
            }
            var actual = p.data<double>().ToArray();
            for (int i = 0; i < 3; i++) Assert.Equal(w[i], actual[i], 14);
        }
        Assert.Equal(2, opt.StepCount);
        Assert.Equal(new[] { "w.exp_avg", "w.exp_avg_sq", "w.step" }, opt.State.Keys.OrderBy(k => k, StringComparer.Ordinal));
    }

    [Fact]
    public void Factored_dims_follow_optax()
    {
        Assert.Null(Adafactor.FactoredDims(new long[] { 64 }, 32));
        Assert.Equal((1, 0), Adafactor.FactoredDims(new long[] { 64, 128 }, 32));
        Assert.Equal((0, 1), Adafactor.FactoredDims(new long[] { 128, 64 }, 32));
        Assert.Null(Adafactor.FactoredDims(new long[] { 128, 16 }, 32));
        Assert.Equal((1, 0), Adafactor.FactoredDims(new long[] { 40, 40 }, 32));                 // tie: the later dim is d0
        Assert.Equal((0, 1), Adafactor.FactoredDims(new long[] { 768, 64, 16, 16 }, 32));     // a patch-embedding kernel
    }

    [Fact]
    public void Adafactor_factored_and_full_second_moments_match_the_definition()
    {
        // A [3, 4] matrix (factored with min_dim_size_to_factor = 2: d0 = 1 (size 4), d1 = 0 (size 3)) and a vector.
        var rnd = new Random(5);
        double[] Rand(int n) => Enumerable.Range(0, n).Select(_ => rnd.NextDouble() * 2 - 1).ToArray();
        double[] mat0 = Rand(12), vec0 = Rand(4);
        using var mat = P(mat0, 3, 4);
        using var vec = P(vec0, 4);
        double lr = 0.05, wd = 0.2, mom = 0.9, eps = 1e-30;
        using var opt = new Adafactor(new[] { new OptimizedParameter("m", mat, wd), new OptimizedParameter("v", vec, 0) },
            minDimSizeToFactor: 2, momentum: mom, eps: eps);
        Assert.Equal(new[] { "m.momentum", "m.step", "m.v_col", "m.v_row", "v.momentum", "v.step", "v.v" }, opt.State.Keys.OrderBy(k => k, StringComparer.Ordinal));

        double[] W = (double[])mat0.Clone(), V = (double[])vec0.Clone();
        double[] R = new double[3], C = new double[4], Vv = new double[4], Mm = new double[12], Mv = new double[4];
        for (int step = 0; step < 3; step++)
        {
            double[] gm = Rand(12), gv = Rand(4);
            SetGrad(mat, gm);
            SetGrad(vec, gv);
            opt.Step(lr);
            double decay = Math.Min(0.999, 1 - Math.Pow(step + 1, -0.8));
            // Matrix: R = row statistics (mean over the columns, d0 = 1), C = column statistics (mean over rows, d1 = 0).
            for (int i = 0; i < 3; i++) R[i] = decay * R[i] + (1 - decay) * Enumerable.Range(0, 4).Average(j => gm[i * 4 + j] * gm[i * 4 + j] + eps);
            for (int j = 0; j < 4; j++) C[j] = decay * C[j] + (1 - decay) * Enumerable.Range(0, 3).Average(i => gm[i * 4 + j] * gm[i * 4 + j] + eps);
            double rMean = R.Average();
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 4; j++)
                {
                    int k = i * 4 + j;
                    double u = gm[k] / Math.Sqrt(R[i] / rMean) / Math.Sqrt(C[j]);
                    Mm[k] = mom * Mm[k] + (1 - mom) * u;
                    W[k] = W[k] * (1 - lr * wd) - lr * Mm[k];
                }
            for (int j = 0; j < 4; j++)
            {
                Vv[j] = decay * Vv[j] + (1 - decay) * (gv[j] * gv[j] + eps);
                Mv[j] = mom * Mv[j] + (1 - mom) * gv[j] / Math.Sqrt(Vv[j]);
                V[j] -= lr * Mv[j];
            }
            var am = mat.data<double>().ToArray();
            var av = vec.data<double>().ToArray();
            for (int k = 0; k < 12; k++) Assert.Equal(W[k], am[k], 13);
            for (int j = 0; j < 4; j++) Assert.Equal(V[j], av[j], 13);
        }
    }

    [Fact]
    public void Adafactor_block_rms_clipping_caps_the_update()
    {
        using var p = P(new double[] { 0, 0, 0, 0 }, 4);
        using var opt = new Adafactor(new[] { new OptimizedParameter("p", p, 0) }, momentum: 0, clippingThreshold: 0.5);
        SetGrad(p, new double[] { 1, -2, 3, 0.001 });
        opt.Step(1.0);
        // First step: V = g² (+ε), u = g/|g| = sign(g), RMS(u) = 1 → u / (1 / 0.5) = 0.5·sign(g).
        Assert.Equal(new[] { -0.5, 0.5, -0.5, -0.5 }, p.data<double>().ToArray().Select(x => Math.Round(x, 12)));
    }

    [Fact]
    public void Sixteen_bit_parameters_accumulate_updates_in_a_float32_master()
    {
        using var p = new Parameter(torch.ones(4, dtype: ScalarType.BFloat16));
        using var opt = new Adafactor(new[] { new OptimizedParameter("p", p, 0) }, momentum: 0);
        Assert.Contains("p.master", opt.State.Keys);
        using var scope = torch.NewDisposeScope();
        for (int i = 0; i < 10; i++)
        {
            p.grad = ScalarMath.Full(new long[] { 4 }, -1.0, ScalarType.BFloat16, torch.CPU);
            opt.Step(1e-3);   // each update (1e-3) is below bf16's resolution at 1.0 (2^-7 ≈ 0.0078)
        }
        Assert.Equal(1.01f, opt.State["p.master"][0].item<float>(), 5);
        Assert.Equal(1.0078125f, p[0].to(ScalarType.Float32).item<float>());   // the master rounded to bf16
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_sixteen_bit_parameter_written_outside_the_optimizer_keeps_the_write(bool adafactor)
    {
        // Building the optimizer, then loading weights (or re-initialising a head) is the usual order: the write must
        // survive the next step, as in PyTorch, where the optimizer updates the parameter itself. A zero gradient and no
        // weight decay make the update zero, so the parameter must stay exactly what was written.
        using var p = new Parameter(torch.ones(4, dtype: ScalarType.BFloat16));
        var ps = new[] { new OptimizedParameter("p", p, 0) };
        using Optimizer opt = adafactor ? new Adafactor(ps, momentum: 0) : new AdamW(ps);
        using var scope = torch.NewDisposeScope();
        using (torch.no_grad()) p.copy_(torch.tensor(new[] { 2.0f, -3.0f, 0.5f, 1.0f }));
        p.grad = torch.zeros(4, dtype: ScalarType.BFloat16);
        opt.Step(1e-3);
        Assert.Equal(new[] { 2.0f, -3.0f, 0.5f, 1.0f }, p.to(ScalarType.Float32).data<float>().ToArray());
        Assert.Equal(new[] { 2.0f, -3.0f, 0.5f, 1.0f }, opt.State["p.master"].data<float>().ToArray());
    }

    [Fact]
    public void A_parameter_without_a_gradient_does_not_advance_its_step()
    {
        // PyTorch keeps a step per parameter and skips those without a gradient: a parameter that first gets a
        // gradient at step 1001 takes AdamW's first, bias-corrected step (lr·g/(|g| + ε)), not the thousand-and-first.
        using var a = P(new[] { 0.0 }, 1);
        using var b = P(new[] { 0.0 }, 1);
        using var opt = new AdamW(new[] { new OptimizedParameter("a", a, 0), new OptimizedParameter("b", b, 0) });
        for (int i = 0; i < 1000; i++)
        {
            SetGrad(a, new[] { 1.0 });
            opt.Step(0.01);
        }
        Assert.Equal(1000, opt.StepCount);
        SetGrad(a, new[] { 1.0 });
        SetGrad(b, new[] { 0.5 });
        opt.Step(0.01);
        Assert.Equal(-0.01 * 0.5 / (0.5 + 1e-8), b.data<double>()[0], 14);
        Assert.Equal(1001, opt.StepCount);
        Assert.Equal(1001, opt.State["a.step"].item<long>());
        Assert.Equal(1, opt.State["b.step"].item<long>());
        Assert.Equal((1001, 1), (opt.StepsOf(0), opt.StepsOf(1)));
        Assert.Throws<ArgumentOutOfRangeException>(() => opt.StepsOf(2));
    }

    [Fact]
    public void Weight_decay_groups_follow_the_paper()
    {
        var cfg = new ViT22B.Models.ViTConfig { ImgSize = 16, PatchSize = 8, EmbedDim = 32, Depth = 1, NumHeads = 2, MlpDim = 64, NumClasses = 3 };
        using var model = new ViT22B.Models.VisionTransformer(cfg, torch.CPU, ScalarType.Float32);
        var groups = Optimizer.WithWeightDecay(model, 0.03, 3.0).ToDictionary(p => p.Name, p => p.WeightDecay);
        Assert.Equal(3.0, groups["head.weight"]);
        Assert.Equal(0.0, groups["head.bias"]);
        Assert.Equal(0.03, groups["blocks.0.in_proj.weight"]);
        Assert.Equal(0.03, groups["patch_embed.proj.weight"]);
        Assert.Equal(0.0, groups["pos_embed"]);
        Assert.Equal(0.0, groups["attn_pool.latent"]);
        Assert.Equal(0.0, groups["blocks.0.in_norm.weight"]);
        Assert.Equal(model.parameters().Count(), groups.Count);
    }

    [Fact]
    public void Bad_arguments_are_refused()
    {
        using var p = P(new double[] { 1 }, 1);
        var one = new[] { new OptimizedParameter("p", p, 0) };
        Assert.Throws<ArgumentException>(() => new AdamW(Array.Empty<OptimizedParameter>()));
        Assert.Throws<ArgumentOutOfRangeException>(() => new AdamW(one, beta1: 1.0));
        Assert.Throws<ArgumentException>(() => new AdamW(new[] { one[0], one[0] }));
        using var opt = new AdamW(one);
        Assert.Throws<ArgumentOutOfRangeException>(() => opt.Step(double.NaN));
    }
}
