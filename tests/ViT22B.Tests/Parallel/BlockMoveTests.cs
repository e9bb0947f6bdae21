using TorchSharp;
using ViT22B.Layers;
using ViT22B.Parallel;
using static TorchSharp.torch;

namespace ViT22B.Tests.Parallel;

/// <summary>
/// Block streaming on a GPU builds a prefetched block in host memory and moves it with <c>Module.to</c> on the computing
/// thread (BlockStreaming). TorchSharp's <c>to</c> replaces each parameter and writes the new one back into the field of
/// the same name; a field it missed would keep a disposed host tensor. No GPU here: a dtype change goes through the
/// same replacement, so each block kind converted to float64 must hold only float64 parameters and compute exactly
/// what the same block built in float64 with the same values computes.
/// </summary>
public class BlockMoveTests
{
    [Theory]
    [InlineData(BlockKind.Parallel, false)]
    [InlineData(BlockKind.Sequential, false)]
    [InlineData(BlockKind.Parallel, true)]
    [InlineData(BlockKind.Sequential, true)]
    public void A_block_converted_by_module_to_computes_with_its_converted_parameters(BlockKind kind, bool sharded)
    {
        var c = ShardedModelTests.Config(kind) with { InitValues = 0.5 };
        var mesh = new DeviceMesh(1, 1);
        var rank = RankContext.CreateThreaded(new ThreadedWorld(1), mesh)[0];
        try
        {
            var s = new ShardContext(new ShardingPlan(c, 1, 1), rank, CommMode.Overlapped);
            nn.Module Build(ScalarType dtype) => (kind, sharded) switch
            {
                (BlockKind.Parallel, false) => new ParallelBlock(c.BlockOptions, torch.CPU, dtype),
                (BlockKind.Sequential, false) => new SequentialBlock(c.BlockOptions, torch.CPU, dtype),
                (BlockKind.Parallel, true) => new ShardedParallelBlock(c.BlockOptions, 0, s, torch.CPU, dtype),
                _ => new ShardedSequentialBlock(c.BlockOptions, 0, s, torch.CPU, dtype),
            };
            using var moved = Build(ScalarType.Float32);
            using var reference = Build(ScalarType.Float64);
            TestUtil.Randomize(moved, seed: 51, scale: 0.3);
            using (torch.no_grad())
            {
                var values = moved.named_parameters().ToDictionary(p => p.name, p => p.parameter);
                foreach (var (name, p) in reference.named_parameters()) p.copy_(values[name]);
            }

            moved.to(ScalarType.Float64);

            Assert.All(moved.named_parameters(), p => Assert.Equal(ScalarType.Float64, p.parameter.dtype));
            using var x = torch.randn(new long[] { c.NumTokens, 2, c.EmbedDim }, dtype: ScalarType.Float64, generator: new torch.Generator(52));
            using var inference = torch.inference_mode();
            using var scope = torch.NewDisposeScope();
            Tensor Run(nn.Module block) => sharded
                ? ((nn.Module<Tensor, long[], Tensor>)block).call(x, new[] { (long)c.NumTokens })
                : ((nn.Module<Tensor, Tensor>)block).call(x.transpose(0, 1));
            Assert.True(TensorAssert.Same(Run(reference), Run(moved)), $"{kind} (sharded: {sharded}) computes otherwise after Module.to");
        }
        finally
        {
            rank.Dispose();
        }
    }
}
