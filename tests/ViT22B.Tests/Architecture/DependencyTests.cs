using ArchUnitNET.Fluent;
using ArchUnitNET.Loader;
using ViT22B.Models;
using static ArchUnitNET.Fluent.ArchRuleDefinition;

namespace ViT22B.Tests.Architecture;

/// <summary>
/// The dependency graph of docs/architecture.md, enforced: each namespace of the library may use only the namespaces
/// listed for it (and TorchSharp, .NET and its packages). A new arrow against the graph, or a new namespace that is not
/// placed in it, fails here.
/// </summary>
public class DependencyTests
{
    /// <summary>The intended graph: namespace (below the root) → the namespaces it may use.</summary>
    internal static readonly IReadOnlyDictionary<string, string[]> Graph = new Dictionary<string, string[]>
    {
        ["Torch"] = Array.Empty<string>(),
        ["Interop"] = new[] { "Torch" },
        ["Layers"] = new[] { "Torch" },
        ["Data"] = new[] { "Torch" },
        ["Models"] = new[] { "Layers", "Interop", "Data", "Torch" },
        ["Accounting"] = new[] { "Models", "Layers", "Torch" },
        ["Training"] = new[] { "Models", "Layers", "Data", "Interop", "Accounting", "Torch" },
        ["Parallel"] = new[] { "Models", "Layers", "Interop", "Torch" },
        ["Cuda"] = new[] { "Parallel", "Interop", "Torch" },
        ["Imaging"] = new[] { "Data", "Interop", "Torch" },
        ["Onnx"] = new[] { "Models", "Layers", "Interop", "Data", "Torch" },
        ["OnnxRuntime"] = Array.Empty<string>(),
    };

    private static readonly System.Reflection.Assembly[] Assemblies =
    {
        typeof(VisionTransformer).Assembly, typeof(ViT22B.Imaging.ImageTensors).Assembly,
        typeof(ViT22B.Onnx.OnnxExport).Assembly, typeof(ViT22B.OnnxRuntime.OnnxVisionTransformer).Assembly,
    };

    private static readonly ArchUnitNET.Domain.Architecture Library = new ArchLoader()
        .LoadAssemblies(Assemblies).Build();

    /// <summary>The GPU seam: the internal types of <c>Parallel</c> that <c>Cuda</c> implements or registers with.</summary>
    private static readonly System.Type[] GpuSeam =
        { typeof(ViT22B.Parallel.IGpuTransport), typeof(ViT22B.Parallel.ITransferEvent), typeof(ViT22B.Parallel.GpuTransport) };

    /// <summary>One rule per forbidden arrow between the graph's namespaces below <paramref name="root"/>, and one
    /// that keeps <c>Cuda</c> to <c>Parallel</c>'s public types and its GPU seam (<paramref name="seam"/>): both live in
    /// one assembly, so nothing else would stop <c>Cuda</c> from reaching into <c>Parallel</c>'s internals.</summary>
    internal static IEnumerable<IArchRule> Rules(string root, System.Type[] seam) =>
        (from source in Graph.Keys
         from target in Graph.Keys
         where target != source && !Graph[source].Contains(target)
         select (IArchRule)Types().That().ResideInNamespaceOrBelow($"{root}.{source}")
             .Should().NotDependOnAny(Types().That().ResideInNamespaceOrBelow($"{root}.{target}"))
             .Because($"{source} may use only {(Graph[source].Length == 0 ? "TorchSharp and .NET" : string.Join(", ", Graph[source]))}")
             .WithoutRequiringPositiveResults())
        .Append(Types().That().ResideInNamespaceOrBelow($"{root}.Cuda")
            .Should().NotDependOnAny(Types().That().ResideInNamespaceOrBelow($"{root}.Parallel").And().AreNotPublic().And().AreNot(seam))
            .Because("Cuda uses Parallel's public API and implements its GPU seam, never its internals")
            .WithoutRequiringPositiveResults());

    /// <summary>The failures of the rules on <paramref name="architecture"/>, one line each.</summary>
    internal static List<string> Violations(ArchUnitNET.Domain.Architecture architecture, string root, System.Type[] seam) =>
        Rules(root, seam).SelectMany(r => r.Evaluate(architecture)).Where(e => !e.Passed).Select(e => e.Description).ToList();

    [Fact]
    public void The_library_follows_the_graph()
    {
        var violations = Violations(Library, "ViT22B", GpuSeam);
        Assert.True(violations.Count == 0, string.Join("\n", violations));
    }

    [Fact]
    public void Every_namespace_of_the_library_is_placed_in_the_graph()
    {
        var namespaces = Assemblies.SelectMany(a => a.GetTypes())
            .Select(t => t.Namespace).Where(n => n is not null && n.StartsWith("ViT22B", StringComparison.Ordinal))
            .Distinct().Order().ToList();
        var unplaced = namespaces.Where(n => !Graph.ContainsKey(n!["ViT22B.".Length..].Split('.')[0])).ToList();
        Assert.True(unplaced.Count == 0, $"Namespaces not in the dependency graph (add them to Graph and docs/architecture.md): {string.Join(", ", unplaced)}");
    }

    [Fact]
    public void The_onnx_runner_needs_neither_TorchSharp_nor_the_library()
    {
        var references = typeof(ViT22B.OnnxRuntime.OnnxVisionTransformer).Assembly.GetReferencedAssemblies().Select(a => a.Name!).ToList();
        Assert.Contains("Microsoft.ML.OnnxRuntime", references);
        Assert.DoesNotContain(references, r => r.StartsWith("TorchSharp", StringComparison.Ordinal) || r.StartsWith("ViT22B", StringComparison.Ordinal));
    }

    [Fact]
    public void An_arrow_against_the_graph_fails_the_rules()
    {
        // The same rules on a miniature of the library in this test assembly, where Layers uses Models (the cycle
        // this graph removed), Parallel uses Cuda (a device-specific dependency the graph forbids) and Cuda uses an
        // internal helper of Parallel that is not part of its GPU seam.
        const string root = "ViT22B.Tests.Architecture.Fixture";
        var fixture = new ArchLoader().LoadNamespacesWithinAssembly(typeof(DependencyTests).Assembly, root).Build();
        var violations = Violations(fixture, root, new[] { typeof(Fixture.Parallel.IFixtureTransport) });
        Assert.Equal(3, violations.Count);
        Assert.Contains(violations, v => v.Contains("BadLayer") && v.Contains("Fixture.Models.FixtureConfig"));
        Assert.Contains(violations, v => v.Contains("BadRing") && v.Contains("Fixture.Cuda.FixtureStream"));
        Assert.Contains(violations, v => v.Contains("BadCommunicator") && v.Contains("Fixture.Parallel.FixtureRows"));
    }
}
