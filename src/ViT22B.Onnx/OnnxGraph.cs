using Google.Protobuf;
using TorchSharp;
using ViT22B.Onnx.Proto;
using static TorchSharp.torch;

namespace ViT22B.Onnx;

/// <summary>
/// Builds one ONNX graph node by node: each call adds a node of a standard (default-domain) operator and returns the
/// name of its output; constants and weights become initializers. Values are float32 unless a method says
/// otherwise; the caller keeps the nodes in topological order by building them in the order they run.
/// </summary>
internal sealed class OnnxGraph
{
    private readonly GraphProto _graph = new() { Name = "vit" };
    private readonly HashSet<string> _names = new(StringComparer.Ordinal);
    private readonly Dictionary<string, string> _constants = new(StringComparer.Ordinal);
    private int _counter;
    private readonly Stream? _external;
    private readonly string? _externalName;
    private readonly bool _sizeOnly;

    /// <summary>A graph whose weights of at least <see cref="ExternalThreshold"/> bytes go to <paramref name="external"/>
    /// (ONNX external data, file name <paramref name="externalName"/> beside the model) when it is given.</summary>
    public OnnxGraph(Stream? external = null, string? externalName = null) => (_external, _externalName) = (external, externalName);

    private OnnxGraph(bool sizeOnly) => _sizeOnly = sizeOnly;

    /// <summary>A graph that stores no weight data and only adds up <see cref="InitializerBytes"/>: the dry run that says,
    /// exactly, whether an export's weights fit one protobuf message.</summary>
    public static OnnxGraph SizeOnly() => new(sizeOnly: true);

    /// <summary>Whether this is the dry run of <see cref="SizeOnly"/> (initializers need only the right shape).</summary>
    public bool IsSizeOnly => _sizeOnly;

    /// <summary>Weights this large or larger go to the external-data file, each at an offset that is a multiple of 4096
    /// (the page size, so that a runtime can map them).</summary>
    public const int ExternalThreshold = 1024;

    public GraphProto Proto => _graph;

    /// <summary>Bytes of weight data added so far (the raw data of every initializer).</summary>
    public long InitializerBytes { get; private set; }

    private string Fresh(string hint)
    {
        string name = hint;
        while (!_names.Add(name)) name = $"{hint}_{++_counter}";
        return name;
    }

    /// <summary>Adds a node and returns its first output.</summary>
    public string Node(string op, IEnumerable<string> inputs, string? output = null, params AttributeProto[] attributes) =>
        NodeN(op, inputs, 1, output, attributes)[0];

    /// <summary>Adds a node with <paramref name="outputs"/> outputs and returns them.</summary>
    public string[] NodeN(string op, IEnumerable<string> inputs, int outputs, string? output = null, params AttributeProto[] attributes)
    {
        var node = new NodeProto { OpType = op, Name = Fresh($"{op}_{_graph.Node.Count}") };
        node.Input.AddRange(inputs);
        var names = Enumerable.Range(0, outputs).Select(i => output is not null && i == 0 ? Fresh(output) : Fresh($"{node.Name}_out{i}")).ToArray();
        node.Output.AddRange(names);
        node.Attribute.AddRange(attributes);
        _graph.Node.Add(node);
        return names;
    }

    public static AttributeProto Int(string name, long value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = value };
    public static AttributeProto Float(string name, float value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = value };
    public static AttributeProto Text(string name, string value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8(value) };
    public static AttributeProto Ints(string name, params long[] values)
    {
        var a = new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Ints };
        a.Ints.AddRange(values);
        return a;
    }

    /// <summary>An int64 constant tensor (one initializer per distinct value list).</summary>
    public string Int64s(params long[] values) => Int64s(values, new long[] { values.Length });

    /// <summary>An int64 scalar constant.</summary>
    public string Int64Scalar(long value) => Int64s(new[] { value }, Array.Empty<long>());

    private string Int64s(long[] values, long[] dims)
    {
        string key = $"i64[{string.Join(",", dims)}]:{string.Join(",", values)}";
        if (_constants.TryGetValue(key, out var existing)) return existing;
        var t = new TensorProto { Name = Fresh("const_i64"), DataType = (int)TensorProto.Types.DataType.Int64 };
        t.Dims.AddRange(dims);
        t.Int64Data.AddRange(values);
        _graph.Initializer.Add(t);
        return _constants[key] = t.Name;
    }

    /// <summary>A float32 scalar constant.</summary>
    public string Scalar(double value)
    {
        string key = $"f32:{BitConverter.SingleToInt32Bits((float)value)}";
        if (_constants.TryGetValue(key, out var existing)) return existing;
        var t = new TensorProto { Name = Fresh("const_f32"), DataType = (int)TensorProto.Types.DataType.Float };
        t.FloatData.Add((float)value);
        _graph.Initializer.Add(t);
        return _constants[key] = t.Name;
    }

    /// <summary>
    /// A float initializer named <paramref name="name"/> holding <paramref name="value"/> stored as
    /// <paramref name="storage"/> (float32, float16 or bfloat16); a 16-bit one is followed by a Cast to float32, whose
    /// output is returned (ONNX Runtime folds it at session creation).
    /// </summary>
    public string Weight(string name, Tensor value, ScalarType storage)
    {
        var stored = Initializer(name, value, storage);
        return storage == ScalarType.Float32 ? stored : Cast(stored, TensorProto.Types.DataType.Float, name + ".float");
    }

    /// <summary>An initializer of <paramref name="value"/> converted to <paramref name="dtype"/> (float32, float64,
    /// float16, bfloat16, int8 or uint8): its bytes in raw_data, or in the external-data file when the graph has one
    /// and the tensor is large enough.</summary>
    private TensorProto Tensor(string name, Tensor value, ScalarType dtype)
    {
        var (code, size) = dtype switch
        {
            ScalarType.Float32 => (TensorProto.Types.DataType.Float, 4),
            ScalarType.Float64 => (TensorProto.Types.DataType.Double, 8),
            ScalarType.Float16 => (TensorProto.Types.DataType.Float16, 2),
            ScalarType.BFloat16 => (TensorProto.Types.DataType.Bfloat16, 2),
            ScalarType.Int8 => (TensorProto.Types.DataType.Int8, 1),
            ScalarType.Byte => (TensorProto.Types.DataType.Uint8, 1),
            _ => throw new ArgumentException($"No ONNX initializer type for {dtype}.", nameof(dtype)),
        };
        long bytes = value.numel() * size;
        var proto = new TensorProto { Name = name, DataType = (int)code };
        proto.Dims.AddRange(value.shape);
        InitializerBytes += bytes;
        if (_sizeOnly) return proto;
        using var scope = torch.NewDisposeScope();
        var cpu = value.detach().to(torch.CPU).to(dtype).contiguous();
        if (_external is not null && bytes >= ExternalThreshold)
        {
            long offset = (_external.Position + 4095) / 4096 * 4096;
            _external.Write(new byte[offset - _external.Position]);
            cpu.WriteBytesToStream(_external, 1 << 20);
            proto.DataLocation = TensorProto.Types.DataLocation.External;
            proto.ExternalData.Add(new StringStringEntryProto { Key = "location", Value = _externalName });
            proto.ExternalData.Add(new StringStringEntryProto { Key = "offset", Value = offset.ToString(System.Globalization.CultureInfo.InvariantCulture) });
            proto.ExternalData.Add(new StringStringEntryProto { Key = "length", Value = bytes.ToString(System.Globalization.CultureInfo.InvariantCulture) });
            return proto;
        }
        using var ms = new MemoryStream();
        if (bytes > 0) cpu.WriteBytesToStream(ms, 1 << 20);
        proto.RawData = ByteString.CopyFrom(ms.GetBuffer(), 0, (int)ms.Length);
        return proto;
    }

    /// <summary>Adds an initializer of <paramref name="value"/> in <paramref name="dtype"/> (see <c>Tensor</c>) and returns its name.</summary>
    public string Initializer(string name, Tensor value, ScalarType dtype)
    {
        var proto = Tensor(Fresh(name), value, dtype);
        _graph.Initializer.Add(proto);
        return proto.Name;
    }

    /// <summary>Declares a graph input or output of element type <paramref name="type"/> with the given dimensions (a
    /// string is a symbolic one).</summary>
    public static ValueInfoProto Value(string name, TensorProto.Types.DataType type, params object[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var d in dims)
            shape.Dim.Add(d is string s ? new TensorShapeProto.Types.Dimension { DimParam = s } : new TensorShapeProto.Types.Dimension { DimValue = Convert.ToInt64(d, System.Globalization.CultureInfo.InvariantCulture) });
        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
    }

    // The operators the model uses, named as in the ONNX operator list.
    public string Add(string a, string b) => Node("Add", new[] { a, b });
    public string Mul(string a, string b) => Node("Mul", new[] { a, b });
    public string MatMul(string a, string b) => Node("MatMul", new[] { a, b });
    public string Transpose(string x, params long[] perm) => Node("Transpose", new[] { x }, null, Ints("perm", perm));
    public string Reshape(string x, params long[] shape) => Node("Reshape", new[] { x, Int64s(shape) });
    public string Concat(int axis, params string[] xs) => Node("Concat", xs, null, Int("axis", axis));
    public string Shape(string x) => Node("Shape", new[] { x });
    public string Cast(string x, TensorProto.Types.DataType to, string? output = null) => Node("Cast", new[] { x }, output, Int("to", (long)to));

    /// <summary>x[start:end] along <paramref name="axis"/> (an end past the dimension means "to the end").</summary>
    public string Slice(string x, long start, long end, long axis) => Node("Slice", new[] { x, Int64s(start), Int64s(end), Int64s(axis) });

    public string[] Split(string x, int axis, params long[] sizes) => NodeN("Split", new[] { x, Int64s(sizes) }, sizes.Length, null, Int("axis", axis));
}
