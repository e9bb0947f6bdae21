// A miniature of the library's namespaces with two arrows against the dependency graph, for
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
}

namespace ViT22B.Tests.Architecture.Fixture.Parallel
{
    internal sealed class BadRing(Cuda.FixtureStream stream)
    {
        public nint Handle { get; } = stream.Handle;
    }
}
