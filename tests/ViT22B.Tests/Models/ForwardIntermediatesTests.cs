using TorchSharp;
using ViT22B.Layers;
using ViT22B.Models;
using static TorchSharp.torch;

namespace ViT22B.Tests.Models;

/// <summary><see cref="VisionTransformer.ForwardIntermediates(Tensor, IEnumerable{int}, bool, bool)"/> against the float64
/// reference run for fewer blocks (timm's <c>forward_intermediates</c> semantics).</summary>
public class ForwardIntermediatesTests
{
    [Theory]
    [InlineData(BlockKind.Sequential)]
    [InlineData(BlockKind.Parallel)]
    public void Intermediates_are_the_reference_after_that_many_blocks(BlockKind kind)
    {
        var c = TestUtil.Tiny(kind) with { Depth = 3, ClassToken = true, RegTokens = 2, GlobalPool = GlobalPool.Token };
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 40);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(c, 2, seed: 41, h: 16, w: 16);
        var sd = model.state_dict();

        var normed = model.ForwardIntermediates(images, new[] { 0, -1 }, norm: true);
        Assert.Equal(new[] { 0, 2 }, normed.Select(o => o.Block));
        foreach (var o in normed)
        {
            var expected = new Reference(sd, c with { Depth = o.Block + 1 }).Model(images).Tokens;   // final-normed, prefix first
            Assert.True(TestUtil.MaxAbs(o.Tokens, expected.narrow(1, 3, 16)) < 1e-12);
            Assert.True(TestUtil.MaxAbs(o.Prefix!, expected.narrow(1, 0, 3)) < 1e-12);
        }

        // Without the norm: the raw tokens, which the reference's norm maps onto the normed ones.
        var raw = model.ForwardIntermediates(images, lastBlocks: 1);
        var full = torch.cat(new[] { raw[0].Prefix!, raw[0].Tokens }, 1);
        Assert.True(TestUtil.MaxAbs(new Reference(sd, c).Norm("norm.", full).narrow(1, 3, 16), normed[1].Tokens) < 1e-12);
        Assert.True(TestUtil.MaxAbs(raw[0].Tokens, normed[1].Tokens) > 1e-3);   // the norm did something

        // Feature maps: [B, D, h, w] with token (y, x) at [:, :, y, x].
        var maps = model.ForwardIntermediates(images, new[] { 1 }, featureMaps: true);
        var tokens = model.ForwardIntermediates(images, new[] { 1 });
        Assert.Equal(new long[] { 2, c.EmbedDim, 4, 4 }, maps[0].Tokens.shape);
        Assert.True(TensorAssert.Same(maps[0].Tokens[.., .., 2, 3], tokens[0].Tokens[.., 2 * 4 + 3, ..]));
    }

    [Theory]
    [InlineData(BlockKind.Sequential)]
    [InlineData(BlockKind.Parallel)]
    public void A_non_square_fc_norm_model_gives_raw_tokens_and_non_square_maps(BlockKind kind)
    {
        // timm: with fc_norm the model's norm is an identity, so norm=True changes nothing; maps follow the real grid
        // (here 4 × 6 patches); prefix tokens without position slots (no_embed_class) are split off all the same.
        var c = TestUtil.Tiny(kind) with
        {
            Depth = 3, ImgWidth = 24, ClassToken = true, RegTokens = 1, NoEmbedClass = true, GlobalPool = GlobalPool.Gap,
        };
        Assert.True(c.UsesFcNorm);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float64);
        TestUtil.Randomize(model, seed: 42);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var images = TestUtil.RandomImages(c, 2, seed: 43, h: 16, w: 24);
        var sd = model.state_dict();
        var normed = model.ForwardIntermediates(images, new[] { 1, 2 }, norm: true);
        var raw = model.ForwardIntermediates(images, new[] { 1, 2 });
        foreach (var (o, r) in normed.Zip(raw))
        {
            Assert.True(TensorAssert.Same(o.Tokens, r.Tokens));
            var expected = new Reference(sd, c with { Depth = o.Block + 1 }).Model(images).Tokens;   // raw: fc_norm model
            Assert.True(TestUtil.MaxAbs(o.Tokens, expected.narrow(1, 2, 24)) < 1e-12);
            Assert.True(TestUtil.MaxAbs(o.Prefix!, expected.narrow(1, 0, 2)) < 1e-12);
        }
        var maps = model.ForwardIntermediates(images, new[] { 2 }, featureMaps: true);
        Assert.Equal(new long[] { 2, c.EmbedDim, 4, 6 }, maps[0].Tokens.shape);
        Assert.True(TensorAssert.Same(maps[0].Tokens[.., .., 3, 1], raw[1].Tokens[.., 3 * 6 + 1, ..]));
    }

    [Fact]
    public void Bad_indices_are_named()
    {
        var c = TestUtil.Tiny(BlockKind.Parallel);
        using var model = new VisionTransformer(c, torch.CPU, ScalarType.Float32);
        var images = torch.zeros(1, 3, 16, 16);
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => model.ForwardIntermediates(images, new[] { 2 }));
        Assert.Contains("outside the model's 2 blocks", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentOutOfRangeException>(() => model.ForwardIntermediates(images, Array.Empty<int>()));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.ForwardIntermediates(images, lastBlocks: 3));
        Assert.Null(model.ForwardIntermediates(images, new[] { 0 })[0].Prefix);   // no prefix tokens
    }
}
