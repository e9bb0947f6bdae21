// A miniature of the library's namespaces with three arrows against the dependency graph, for
// DependencyTests.An_arrow_against_the_graph_fails_the_rules. Nothing else uses these types.
namespace ViT22B.Tests.Architecture.Fixture.Models
{
    internal sealed class FixtureConfig
    {
        public int Width { get; init; }
    }

    internal sealed class GoodModel(Layers.GoodLayer layer)
    {
        public Layers.GoodLayer Layer { get; } = layer;
    }
}

namespace ViT22B.Tests.Architecture.Fixture.Layers
{
    internal sealed class GoodLayer
    {
        public int Width { get; init; }
    }

    internal sealed class BadLayer(Models.FixtureConfig config)
    {
        public int Width { get; } = config.Width;
    }
}

namespace ViT22B.Tests.Architecture.Fixture.Cuda
{
    internal sealed class FixtureStream
    {
        public nint Handle { get; init; }
    }

    // Uses Parallel's public API and implements its seam: allowed.
    internal sealed class GoodTransport(Parallel.FixtureMesh mesh) : Parallel.IFixtureTransport
    {
        public int Size { get; } = mesh.Size;
    }

    // Uses an internal helper of Parallel: forbidden.
    internal sealed class BadCommunicator
    {
        public long Rows { get; } = Parallel.FixtureRows.Total(new long[] { 1, 2 });
    }
}

namespace ViT22B.Tests.Architecture.Fixture.Parallel
{
    public sealed class FixtureMesh
    {
        public int Size { get; init; }
    }

    internal interface IFixtureTransport
    {
        int Size { get; }
    }

    internal static class FixtureRows
    {
        public static long Total(long[] counts) => counts.Sum();
    }

    internal sealed class BadRing(Cuda.FixtureStream stream)
    {
        public nint Handle { get; } = stream.Handle;
    }
}
