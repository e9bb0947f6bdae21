using TorchSharp;
using ViT22B.Tests;
using ViT22B.Torch;

namespace ViT22B.GpuTests;

/// <summary>The GPU bundle carries no libtorch: TorchSharp must load the machine's own, from the folder the run script
/// names (and, on a CPU machine, the NuGet package's copy named the same way, which is how CI checks the route).</summary>
public sealed class LibtorchRouteTests
{
    public const string Variable = "VIT22B_EXPECT_LIBTORCH_DIR";

    [Fact]
    public void Libtorch_is_loaded_from_the_folder_the_run_named()
    {
        var dir = Environment.GetEnvironmentVariable(Variable);
        if (string.IsNullOrEmpty(dir)) Assert.Skip($"{Variable} is not set: only tests/Gpu/run.sh names the libtorch the bundle must load.");
        using var x = ScalarMath.Arange(6, torch.ScalarType.Float32, torch.CPU).reshape(2, 3);
        using var y = x.matmul(x.t());
        Assert.Equal(50f, y[1, 1].item<float>());                       // 3² + 4² + 5²
        string expected = Real(Path.Combine(dir, "libtorch_cpu.so"));
        var mapped = TestUtil.MappedFiles().Where(p => Path.GetFileName(p) == "libtorch_cpu.so").Select(Real).Distinct().ToList();
        Assert.Equal(expected, Assert.Single(mapped));
    }

    private static string Real(string path) => new FileInfo(path).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? Path.GetFullPath(path);
}
