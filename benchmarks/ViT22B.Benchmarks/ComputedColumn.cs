using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace ViT22B.Benchmarks;

/// <summary>A numeric custom column whose value is computed from the summary (other cases, files the benchmark
/// processes wrote); subclasses supply only the name, the legend and the value.</summary>
public abstract class ComputedColumn : IColumn
{
    /// <summary>Creates the column.</summary>
    protected ComputedColumn(string name, string legend, int priority = 0) => (ColumnName, Legend, PriorityInCategory) = (name, legend, priority);

    /// <inheritdoc />
    public string Id => GetType().Name + "." + ColumnName;
    /// <inheritdoc />
    public string ColumnName { get; }
    /// <inheritdoc />
    public string Legend { get; }
    /// <inheritdoc />
    public int PriorityInCategory { get; }
    /// <inheritdoc />
    public bool AlwaysShow => true;
    /// <inheritdoc />
    public ColumnCategory Category => ColumnCategory.Custom;
    /// <inheritdoc />
    public bool IsNumeric => true;
    /// <inheritdoc />
    public UnitType UnitType => UnitType.Dimensionless;
    /// <inheritdoc />
    public bool IsAvailable(Summary summary) => true;
    /// <inheritdoc />
    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    /// <inheritdoc />
    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style) => GetValue(summary, benchmarkCase);
    /// <inheritdoc />
    public abstract string GetValue(Summary summary, BenchmarkCase benchmarkCase);
}
