using BenchmarkDotNet.Running;

// dotnet run -c Release --project benchmarks/ViT22B.Benchmarks -- --filter '*'
BenchmarkSwitcher.FromAssembly(typeof(ViT22B.Benchmarks.BlockForwardBenchmarks).Assembly).Run(args);
