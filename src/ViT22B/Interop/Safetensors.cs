using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>A safetensors file is malformed; the message names the file and the problem.</summary>
public sealed class SafetensorsFormatException : FormatException
{
    /// <summary>Creates the exception.</summary>
    public SafetensorsFormatException(string message, Exception? inner = null) : base(message, inner) { }
}

/// <summary>One tensor's header entry.</summary>
/// <param name="Name">Tensor name (state-dict key).</param>
/// <param name="DType">dtype string as in the file (F32, BF16, …).</param>
/// <param name="ScalarType">The matching TorchSharp dtype.</param>
/// <param name="Shape">Shape.</param>
/// <param name="Begin">Start offset in the data buffer.</param>
/// <param name="End">End offset (exclusive) in the data buffer.</param>
public sealed record SafetensorsEntry(string Name, string DType, ScalarType ScalarType, long[] Shape, long Begin, long End)
{
    /// <summary>Number of bytes of the tensor's data.</summary>
    public long ByteCount => End - Begin;
}

/// <summary>
/// Reader and writer of the safetensors format (https://github.com/huggingface/safetensors): an 8-byte
/// little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. Supports F64, F32, F16, BF16, I64,
/// I32, I16, I8, U8 and BOOL. Tensors are streamed one at a time in 1 MiB chunks (files and tensors over 2 GB work;
/// the file is never read whole into managed memory). Writes are atomic (temporary file, flush, rename).
/// </summary>
public sealed class SafetensorsReader : ITensorSource
{
    /// <summary>Largest header accepted (the reference implementation's limit).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly FileStream _stream;
    private readonly long _dataStart;

    /// <summary>The file path.</summary>
    public string Path { get; }

    /// <summary>Tensor entries in data order.</summary>
    public IReadOnlyList<SafetensorsEntry> Entries { get; }

    /// <summary>The optional <c>__metadata__</c> map.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    private readonly Dictionary<string, SafetensorsEntry> _byName;

    private SafetensorsReader(string path, FileStream stream, long dataStart, List<SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        (Path, _stream, _dataStart, Entries, Metadata) = (path, stream, dataStart, entries, metadata);
        _byName = entries.ToDictionary(e => e.Name);
    }

    /// <summary>Opens and validates a file: header length, JSON, dtypes, shapes, and that the data offsets are in
    /// range, consistent with dtype and shape, and cover the buffer without overlaps or holes.</summary>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="SafetensorsFormatException">Anything malformed.</exception>
    public static SafetensorsReader Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"Safetensors file '{path}' does not exist.", path);
        var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        try
        {
            var (entries, metadata, dataStart) = ReadHeader(path, fs);
            return new SafetensorsReader(path, fs, dataStart, entries, metadata);
        }
        catch
        {
            fs.Dispose();
            throw;
        }
    }

    /// <summary>True when the file holds a tensor of that name.</summary>
    public bool Contains(string name) => _byName.ContainsKey(name);

    /// <inheritdoc />
    public IReadOnlyList<string> Names => _names ??= Entries.Select(e => e.Name).ToArray();
    private string[]? _names;

    /// <inheritdoc />
    public long[] ShapeOf(string name) => (long[])this[name].Shape.Clone();

    /// <summary>The entry of a tensor.</summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name (the message names the file).</exception>
    public SafetensorsEntry this[string name] => _byName.TryGetValue(name, out var e) ? e
        : throw new KeyNotFoundException($"Safetensors file '{Path}' has no tensor '{name}'.");

    /// <summary>Reads a tensor into a new CPU tensor of the file's dtype (one reader at a time; safe to call from
    /// several threads).</summary>
    public Tensor Read(string name)
    {
        var e = this[name];
        var t = torch.empty(e.Shape, dtype: e.ScalarType, device: torch.CPU);
        try
        {
            if (e.ByteCount > 0)
            {
                lock (_stream)
                {
                    _stream.Seek(_dataStart + e.Begin, SeekOrigin.Begin);
                    t.ReadBytesFromStream(_stream, 1 << 20);
                }
                Interlocked.Add(ref _bytesRead, e.ByteCount);
            }
            return t;
        }
        catch (Exception ex) when (ex is IOException or EndOfStreamException)
        {
            t.Dispose();
            throw new SafetensorsFormatException($"Safetensors file '{Path}': could not read tensor '{name}': {ex.Message}", ex);
        }
    }

    /// <summary>
    /// Reads part of a tensor (<see cref="ITensorSource.ReadSlice"/>) by copying only its bytes out of a read-only
    /// memory mapping of the file, created at the first call: a rank of a sharded model reads its shard of a full
    /// checkpoint without staging the whole tensor. Safe to call from several threads. The header was validated
    /// when the file was opened, and the file's current length is checked before each copy, so a file cut short since
    /// is named; one cut short during the copy itself is not supported (as for any memory mapping: the process faults).
    /// </summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name.</exception>
    /// <exception cref="ArgumentException">The dimension or a range lies outside the tensor.</exception>
    public unsafe Tensor ReadSlice(string name, int dim, IReadOnlyList<(long Start, long Length)> segments)
    {
        var e = this[name];
        TensorSlices.Check(Path, name, e.Shape, dim, segments);
        var shape = (long[])e.Shape.Clone();
        shape[dim] = segments.Sum(g => g.Length);
        var t = torch.empty(shape, dtype: e.ScalarType, device: torch.CPU);
        if (t.numel() == 0) return t;
        long element = e.ByteCount / Math.Max(1, e.Shape.Aggregate(1L, (a, n) => a * n));
        long outer = e.Shape.Take(dim).Aggregate(1L, (a, n) => a * n);
        long inner = e.Shape.Skip(dim + 1).Aggregate(1L, (a, n) => a * n) * element;   // bytes of one index along dim
        long sourceRow = e.Shape[dim] * inner;
        try
        {
            var (mapped, view) = Mapping();
            // The header was checked against the file's length at Open; a file cut short since would be read past its
            // end (a crash, not an exception), so its current length, and the mapping's, are checked before the copy.
            long needed = _dataStart + e.End, fileLength = _stream.Length, mappedLength = _mappedLength;
            if (needed > Math.Min(fileLength, mappedLength))
                throw new SafetensorsFormatException($"Safetensors file '{Path}', tensor '{name}': data_offsets end at byte {needed:N0} of the file, which now holds {fileLength:N0} bytes{(mappedLength < fileLength ? $" ({mappedLength:N0} mapped)" : "")}; the file was truncated while open.");
            bool added = false;
            view.DangerousAddRef(ref added);          // a concurrent Dispose cannot unmap the file under the copy
            try
            {
                byte* source = (byte*)mapped + _dataStart + e.Begin;
                byte* target = (byte*)TensorPointers.DataPointer(t);
                long capacity = t.numel() * element;
                for (long o = 0; o < outer; o++)
                {
                    foreach (var (start, length) in segments)
                    {
                        long bytes = length * inner;
                        Buffer.MemoryCopy(source + o * sourceRow + start * inner, target, capacity, bytes);
                        target += bytes;
                        capacity -= bytes;
                    }
                }
            }
            finally
            {
                if (added) view.DangerousRelease();
            }
            Interlocked.Add(ref _bytesRead, t.numel() * element);
        }
        catch
        {
            t.Dispose();
            throw;
        }
        return t;
    }

    /// <summary>Tensor bytes copied out of the file so far, by <see cref="Read"/> and <see cref="ReadSlice"/> (tests
    /// check that a rank of a sharded model reads only what it holds).</summary>
    internal long BytesRead => Interlocked.Read(ref _bytesRead);

    private long _bytesRead;

    private MemoryMappedFile? _map;
    private MemoryMappedViewAccessor? _view;
    private unsafe byte* _base;
    private long _mappedLength;

    private unsafe (nint Base, SafeHandle View) Mapping()
    {
        lock (_byName)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_base is null)
            {
                _map = MemoryMappedFile.CreateFromFile(_stream.SafeFileHandle, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
                _view = _map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
                byte* p = null;
                _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
                _base = p + _view.PointerOffset;
                _mappedLength = _view.Capacity;
            }
            return ((nint)_base, _view!.SafeMemoryMappedViewHandle);
        }
    }

    private bool _disposed;

    /// <summary>Releases the memory mapping (if any) and the file handle.</summary>
    public unsafe void Dispose()
    {
        lock (_byName)
        {
            if (_disposed) return;
            _disposed = true;
            if (_base is not null)
            {
                _view!.SafeMemoryMappedViewHandle.ReleasePointer();
                _base = null;
            }
            _view?.Dispose();
            _map?.Dispose();
        }
        _stream.Dispose();
    }

    private static (List<SafetensorsEntry>, Dictionary<string, string>, long) ReadHeader(string path, FileStream fs)
    {
        long length = fs.Length;
        if (length < 8)
            throw new SafetensorsFormatException($"Safetensors file '{path}' is truncated: {length} bytes, shorter than the 8-byte header length.");
        Span<byte> lenBytes = stackalloc byte[8];
        fs.ReadExactly(lenBytes);
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(lenBytes);
        if (n > (ulong)(length - 8))
            throw new SafetensorsFormatException($"Safetensors file '{path}': header length {n} is larger than the file ({length} bytes); the file is truncated or not a safetensors file.");
        if (n > MaxHeaderBytes)
            throw new SafetensorsFormatException($"Safetensors file '{path}': header length {n} exceeds the {MaxHeaderBytes}-byte limit.");
        var header = new byte[n];
        fs.ReadExactly(header);
        long dataStart = 8 + (long)n, bufferLength = length - dataStart;

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(header);
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException($"Safetensors file '{path}': header is not valid JSON: {e.Message}", e);
        }
        var entries = new List<SafetensorsEntry>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        var metadata = new Dictionary<string, string>();
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException($"Safetensors file '{path}': header must be a JSON object, found {doc.RootElement.ValueKind}.");
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                if (p.Name == "__metadata__")
                {
                    if (p.Value.ValueKind != JsonValueKind.Object)
                        throw new SafetensorsFormatException($"Safetensors file '{path}': __metadata__ must be an object of strings.");
                    foreach (var m in p.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String)
                            throw new SafetensorsFormatException($"Safetensors file '{path}': __metadata__ value '{m.Name}' is not a string.");
                        metadata[m.Name] = m.Value.GetString()!;
                    }
                    continue;
                }
                if (!names.Add(p.Name))
                    throw new SafetensorsFormatException($"Safetensors file '{path}': tensor '{p.Name}' appears twice in the header.");
                entries.Add(ParseEntry(path, p));
            }
        }
        CheckLayout(path, entries, bufferLength);
        return (entries.OrderBy(e => e.Begin).ThenBy(e => e.End).ToList(), metadata, dataStart);
    }

    private static SafetensorsEntry ParseEntry(string path, JsonProperty p)
    {
        string where = $"Safetensors file '{path}', tensor '{p.Name}'";
        if (p.Value.ValueKind != JsonValueKind.Object)
            throw new SafetensorsFormatException($"{where}: entry must be an object with dtype, shape and data_offsets.");
        if (!p.Value.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String)
            throw new SafetensorsFormatException($"{where}: missing string 'dtype'.");
        string dtype = dt.GetString()!;
        if (!DTypes.TryGetValue(dtype, out var info))
            throw new SafetensorsFormatException($"{where}: unknown dtype '{dtype}'; supported: {string.Join(", ", DTypes.Keys)}.");
        if (!p.Value.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array)
            throw new SafetensorsFormatException($"{where}: missing array 'shape'.");
        var shape = new List<long>();
        foreach (var s in sh.EnumerateArray())
        {
            if (s.ValueKind != JsonValueKind.Number || !s.TryGetInt64(out long v) || v < 0)
                throw new SafetensorsFormatException($"{where}: shape entries must be non-negative integers, found {s.GetRawText()}.");
            shape.Add(v);
        }
        if (!p.Value.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new SafetensorsFormatException($"{where}: 'data_offsets' must be [begin, end].");
        var o = off.EnumerateArray().ToArray();
        if (o[0].ValueKind != JsonValueKind.Number || o[1].ValueKind != JsonValueKind.Number
            || !o[0].TryGetInt64(out long begin) || !o[1].TryGetInt64(out long end) || begin < 0 || end < begin)
            throw new SafetensorsFormatException($"{where}: invalid data_offsets {off.GetRawText()} (need 0 <= begin <= end).");
        long elements = 1;
        foreach (long d in shape)
            elements = d == 0 ? 0 : elements > long.MaxValue / d ? throw new SafetensorsFormatException($"{where}: shape is too large.") : elements * d;
        if (elements > long.MaxValue / info.Size) throw new SafetensorsFormatException($"{where}: shape is too large ({elements} elements of {info.Size} bytes overflow 64 bits).");
        if (elements * info.Size != end - begin)
            throw new SafetensorsFormatException($"{where}: data_offsets {off.GetRawText()} span {end - begin} bytes but dtype {dtype} with shape [{string.Join(", ", shape)}] needs {elements * info.Size}.");
        return new SafetensorsEntry(p.Name, dtype, info.Type, shape.ToArray(), begin, end);
    }

    private static void CheckLayout(string path, List<SafetensorsEntry> entries, long bufferLength)
    {
        long cursor = 0;
        SafetensorsEntry? previous = null;
        foreach (var e in entries.OrderBy(e => e.Begin).ThenBy(e => e.End))
        {
            if (e.End > bufferLength)
                throw new SafetensorsFormatException($"Safetensors file '{path}', tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] run past the end of the data buffer ({bufferLength} bytes); the file is truncated or the offsets are out of range.");
            if (e.Begin < cursor)
                throw new SafetensorsFormatException($"Safetensors file '{path}': tensors '{previous!.Name}' [{previous.Begin}, {previous.End}] and '{e.Name}' [{e.Begin}, {e.End}] have overlapping data_offsets.");
            if (e.Begin > cursor)
                throw new SafetensorsFormatException($"Safetensors file '{path}': bytes [{cursor}, {e.Begin}) of the data buffer belong to no tensor (the format forbids holes).");
            cursor = e.End;
            previous = e;
        }
        if (cursor != bufferLength)
            throw new SafetensorsFormatException($"Safetensors file '{path}': {bufferLength - cursor} bytes after the last tensor belong to no tensor.");
    }

    internal static readonly Dictionary<string, (ScalarType Type, int Size)> DTypes = new()
    {
        ["F64"] = (ScalarType.Float64, 8), ["F32"] = (ScalarType.Float32, 4), ["F16"] = (ScalarType.Float16, 2),
        ["BF16"] = (ScalarType.BFloat16, 2), ["I64"] = (ScalarType.Int64, 8), ["I32"] = (ScalarType.Int32, 4),
        ["I16"] = (ScalarType.Int16, 2), ["I8"] = (ScalarType.Int8, 1), ["U8"] = (ScalarType.Byte, 1), ["BOOL"] = (ScalarType.Bool, 1),
    };
}

/// <summary>Whole-file helpers for safetensors.</summary>
public static class Safetensors
{
    /// <summary>Writes <paramref name="tensors"/> (in the given order) atomically. Tensors may live on any device; each
    /// is copied to the CPU on its own while writing.</summary>
    /// <exception cref="ArgumentException">Duplicate or empty name, or an unsupported dtype.</exception>
    public static void Save(IEnumerable<KeyValuePair<string, Tensor>> tensors, string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        SaveStreamed(path, list.Select(kv => (kv.Key, kv.Value.dtype, kv.Value.shape)).ToList(),
            emit => { foreach (var (name, t) in list) emit(name, t); }, metadata);
    }

    /// <summary>
    /// Writes a safetensors file whose tensors are produced one at a time: the header is written from
    /// <paramref name="layout"/> (name, dtype, shape, in file order), then <paramref name="produce"/> is called with a
    /// function that writes the next tensor, which must come in layout order with its declared dtype and shape (a
    /// sharded model gathers each parameter, writes it and lets it go). Atomic like <see cref="Save"/>: the file
    /// appears only when every tensor was written.
    /// </summary>
    /// <exception cref="ArgumentException">A name is empty, reserved or duplicated, a dtype is not supported, or a
    /// produced tensor is not the next one of the layout.</exception>
    /// <exception cref="InvalidOperationException"><paramref name="produce"/> returned before writing every tensor.</exception>
    public static void SaveStreamed(string path, IReadOnlyList<(string Name, ScalarType DType, long[] Shape)> layout,
        Action<Action<string, Tensor>> produce, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(produce);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors writing needs a little-endian machine.");
        var names = new HashSet<string>();
        using var ms = new MemoryStream();
        long offset = 0;
        using (var w = new Utf8JsonWriter(ms))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject("__metadata__");
                foreach (var (k, v) in metadata) w.WriteString(k, v);
                w.WriteEndObject();
            }
            foreach (var (name, dtype, shape) in layout)
            {
                if (string.IsNullOrEmpty(name) || name == "__metadata__" || !names.Add(name))
                    throw new ArgumentException($"Cannot save '{path}': tensor name '{name}' is empty, reserved or duplicated.", nameof(layout));
                var code = SafetensorsReader.DTypes.FirstOrDefault(kv => kv.Value.Type == dtype);
                if (code.Key is null)
                    throw new ArgumentException($"Cannot save '{path}': tensor '{name}' has dtype {dtype}, which safetensors does not support here.", nameof(layout));
                long bytes = shape.Aggregate(1L, (a, n) => a * n) * code.Value.Size;
                w.WriteStartObject(name);
                w.WriteString("dtype", code.Key);
                w.WriteStartArray("shape");
                foreach (long d in shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + bytes);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += bytes;
            }
            w.WriteEndObject();
        }
        // Pad the header with spaces to a multiple of 8 bytes, as the reference writer does.
        int pad = (int)((8 - ms.Length % 8) % 8);
        for (int i = 0; i < pad; i++) ms.WriteByte((byte)' ');
        AtomicFile.Write(path, s =>
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)ms.Length);
            s.Write(len);
            ms.Position = 0;
            ms.CopyTo(s);
            int next = 0;
            produce((name, t) =>
            {
                if (next >= layout.Count)
                    throw new ArgumentException($"Cannot save '{path}': tensor '{name}' comes after the {layout.Count} tensors of the layout.");
                var (want, dtype, shape) = layout[next];
                if (name != want || t.dtype != dtype || !t.shape.SequenceEqual(shape))
                    throw new ArgumentException($"Cannot save '{path}': expected tensor {next} to be '{want}' {dtype} [{string.Join(", ", shape)}], found '{name}' {t.dtype} [{string.Join(", ", t.shape)}].");
                next++;
                if (t.numel() == 0) return;
                using var scope = torch.NewDisposeScope();
                var cpu = t.detach().to(torch.CPU).contiguous();
                cpu.WriteBytesToStream(s, 1 << 20);
            });
            if (next != layout.Count)
                throw new InvalidOperationException($"Cannot save '{path}': only {next} of the {layout.Count} tensors were written.");
        });
    }

    /// <summary>Reads every tensor of a file into CPU tensors (for files that fit in memory; use
    /// <see cref="SafetensorsReader"/> to stream one tensor at a time).</summary>
    public static Dictionary<string, Tensor> Load(string path)
    {
        using var reader = SafetensorsReader.Open(path);
        var result = new Dictionary<string, Tensor>();
        foreach (var e in reader.Entries) result[e.Name] = reader.Read(e.Name);
        return result;
    }
}
