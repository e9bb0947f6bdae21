using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Running;
using ViT22B.Benchmarks;

// Full run (docs/performance.md):   dotnet run -c Release --project benchmarks/ViT22B.Benchmarks -- --filter '*'
// CI (one iteration each):          dotnet run -c Release --project benchmarks/ViT22B.Benchmarks -- --filter '*' --job Dry --inProcess
if (Directory.Exists(MfuBenchmark.DataFolder)) Directory.Delete(MfuBenchmark.DataFolder, recursive: true);
var config = DefaultConfig.Instance;
if (!args.Contains("--job") && !args.Contains("-j"))
    // Each invocation takes 0.1–10 s here, so few, single-invocation iterations; the peak is sampled after each.
    config = config.AddJob(Job.Default.WithLaunchCount(1).WithWarmupCount(2).WithIterationCount(7).WithInvocationCount(1).WithUnrollFactor(1).AsDefault());
BenchmarkSwitcher.FromAssembly(typeof(MfuBenchmark).Assembly).Run(args, config);
