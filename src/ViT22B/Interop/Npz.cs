using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary>A NumPy <c>.npz</c>/<c>.npy</c> file is malformed or holds what this reader refuses; the message names the
/// file, the member and the problem.</summary>
public sealed class NpzFormatException : FormatException
{
    /// <summary>Creates the exception.</summary>
    public NpzFormatException(string message, Exception? inner = null) : base(message, inner) { }
}

/// <summary>
/// Reader of NumPy <c>.npz</c> archives (what <c>np.savez</c> and <c>np.savez_compressed</c> write, and what big_vision
/// saves its checkpoints as): a zip of <c>name.npy</c> members, stored or deflated. Each member's <c>.npy</c> header
/// (magic <c>\x93NUMPY</c>, version 1–3, a Python dict literal with <c>descr</c>, <c>fortran_order</c> and
/// <c>shape</c>) is parsed when the archive is opened; tensor data is streamed from the archive one member at a time.
/// <para>Refused before any tensor memory is allocated, with a message naming the member: dtypes other than little-endian
/// float16/32/64 (integers, object arrays that would need unpickling, void and structured dtypes), a member whose
/// stored size disagrees with its header's shape, a member that claims to expand more than deflate can
/// (<see cref="MaxDeflateRatio"/>: a zip bomb), and members whose compressed sizes add up to more than the file or
/// whose data overlap in it (entries sharing data: the overlapping-file zip bomb). A member whose data ends early is reported as truncated.</para>
/// </summary>
public sealed class NpzReader : ITensorSource
{
    /// <summary>The largest expansion a deflate stream can achieve (258 bytes per 2-bit code, about 1032:1); a member
    /// claiming more is not an honest deflate stream.</summary>
    public const long MaxDeflateRatio = 1032;

    private const int MaxHeaderBytes = 1 << 16;

    private readonly FileStream _file;
    private readonly ZipArchive _zip;
    private readonly Dictionary<string, Member> _members;

    private sealed record Member(ZipArchiveEntry Entry, long HeaderBytes, ScalarType DType, long[] Shape, bool FortranOrder, long DataBytes);

    /// <inheritdoc />
    public string Path { get; }

    /// <inheritdoc />
    public IReadOnlyList<string> Names { get; }

    /// <inheritdoc />
    public IReadOnlyDictionary<string, string> Metadata { get; } = new Dictionary<string, string>();

    private NpzReader(string path, FileStream file, ZipArchive zip, Dictionary<string, Member> members, IReadOnlyList<string> names)
    {
        (Path, _file, _zip, _members, Names) = (path, file, zip, members, names);
    }

    /// <summary>Opens an archive and validates every member's header and sizes.</summary>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="NpzFormatException">Anything malformed or refused.</exception>
    public static NpzReader Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"NumPy archive '{path}' does not exist.", path);
        var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        ZipArchive? zip = null;
        try
        {
            try
            {
                zip = new ZipArchive(file, ZipArchiveMode.Read, leaveOpen: true);
            }
            catch (InvalidDataException e)
            {
                throw new NpzFormatException($"NumPy archive '{path}' is not a readable zip file (truncated or corrupt): {e.Message}", e);
            }
            long compressedTotal = 0;
            var directory = CentralDirectory(file);
            RefuseOverlaps(path, directory);
            var methods = new Dictionary<string, int>(StringComparer.Ordinal);
            foreach (var d in directory) methods.TryAdd(d.Name, d.Method);
            var members = new Dictionary<string, Member>(StringComparer.Ordinal);
            var names = new List<string>();
            IReadOnlyList<ZipArchiveEntry> entries;
            try
            {
                entries = zip.Entries;      // the central directory is parsed here, not by the constructor
            }
            catch (InvalidDataException e)
            {
                throw new NpzFormatException($"NumPy archive '{path}' has a corrupt central directory: {e.Message}", e);
            }
            foreach (var entry in entries)
            {
                string where = $"NumPy archive '{path}', member '{entry.FullName}'";
                if (entry.FullName.EndsWith('/')) continue;   // a directory entry
                if (!entry.FullName.EndsWith(".npy", StringComparison.Ordinal))
                    throw new NpzFormatException($"{where}: not a .npy array (an .npz holds only name.npy members).");
                compressedTotal += entry.CompressedLength;
                if (compressedTotal > file.Length)
                    throw new NpzFormatException($"NumPy archive '{path}': the members' compressed sizes add up to more than the file ({file.Length} bytes), so members share data (a zip bomb); refused.");
                int method = methods.GetValueOrDefault(entry.FullName, -1);
                if (method == 0 && entry.Length != entry.CompressedLength)
                    throw new NpzFormatException($"{where}: a stored (uncompressed) member that claims {entry.Length} bytes in {entry.CompressedLength}; refused.");
                if (method is not (0 or 8))
                    throw new NpzFormatException($"{where}: compression method {method} is neither stored (0) nor deflate (8), the two NumPy writes; refused.");
                if (entry.Length > Math.Max(entry.CompressedLength, 1) * MaxDeflateRatio)
                    throw new NpzFormatException($"{where}: claims {entry.Length} bytes from {entry.CompressedLength} compressed, more than deflate's {MaxDeflateRatio}:1 (a zip bomb); refused.");
                var member = ReadMember(where, entry);
                string name = entry.FullName[..^4];
                if (!members.TryAdd(name, member)) throw new NpzFormatException($"{where}: the archive holds '{name}' twice.");
                names.Add(name);
            }
            return new NpzReader(path, file, zip, members, names);
        }
        catch
        {
            zip?.Dispose();
            file.Dispose();
            throw;
        }
    }

    /// <inheritdoc />
    public bool Contains(string name) => _members.ContainsKey(name);

    /// <inheritdoc />
    public long[] ShapeOf(string name) => (long[])Get(name).Shape.Clone();

    /// <inheritdoc />
    public Tensor Read(string name)
    {
        var m = Get(name);
        string where = $"NumPy archive '{Path}', member '{m.Entry.FullName}'";
        // A Fortran-ordered array's bytes are its transpose in C order.
        var storedShape = m.FortranOrder ? m.Shape.Reverse().ToArray() : m.Shape;
        var t = torch.empty(storedShape, dtype: m.DType, device: torch.CPU);
        try
        {
            using (var entry = OpenEntry(where, m.Entry))
            using (var s = new Crc32Stream(entry))
            {
                SkipExactly(where, s, m.HeaderBytes);
                TensorPointers.ReadInto(t, s, m.DataBytes);
                if (s.ReadByte() != -1) throw new NpzFormatException($"{where}: more data than its header's shape [{string.Join(", ", m.Shape)}] holds.");
                // A stored member has no other check (NumPy's reader, Python's zipfile, compares it too).
                if (s.Crc != m.Entry.Crc32)
                    throw new NpzFormatException($"{where}: its bytes have CRC-32 0x{s.Crc:X8} but the archive records 0x{m.Entry.Crc32:X8}; the member is corrupt.");
            }
            if (!m.FortranOrder || m.Shape.Length < 2) return t;
            using var stored = t;
            using var transposed = stored.permute(Enumerable.Range(0, m.Shape.Length).Reverse().Select(i => (long)i).ToArray());
            return transposed.contiguous();
        }
        catch (Exception e) when (e is EndOfStreamException or IOException or InvalidDataException)
        {
            t.Dispose();
            throw new NpzFormatException($"{where}: the data ends early or is corrupt (truncated member): {e.Message}", e);
        }
        catch
        {
            t.Dispose();
            throw;
        }
    }

    /// <summary>Closes the archive.</summary>
    public void Dispose()
    {
        _zip.Dispose();
        _file.Dispose();
    }

    private Member Get(string name) => _members.TryGetValue(name, out var m) ? m
        : throw new KeyNotFoundException($"NumPy archive '{Path}' has no array '{name}'.");

    // One central-directory entry as this reader checks it: the compression method, and where its local header starts
    // with the smallest span it covers (30-byte header, name, compressed data).
    private sealed record DirectoryEntry(string Name, int Method, long LocalOffset, long Span);

    // Entries whose data ranges overlap share data: the overlapping-entry zip bomb, which can pass a size sum when the
    // shared member is small. Each entry's local header must start after the previous entry's span ends.
    private static void RefuseOverlaps(string path, List<DirectoryEntry> directory)
    {
        var placed = directory.OrderBy(d => d.LocalOffset).ToList();
        for (int i = 1; i < placed.Count; i++)
        {
            var (a, b) = (placed[i - 1], placed[i]);
            if (b.LocalOffset < a.LocalOffset + a.Span)
                throw new NpzFormatException($"NumPy archive '{path}': members '{a.Name}' and '{b.Name}' overlap in the file (their data starts at bytes {a.LocalOffset} and {b.LocalOffset}), so they share data (a zip bomb); refused.");
        }
    }

    // The central directory (ZipArchiveEntry exposes neither the compression method nor the local header's offset): the
    // end record (or its zip64 locator) gives the directory's offset; each 46-byte entry header holds the method at byte
    // 10, the compressed size at 20, the name's length at 28 and the local header's offset at 42, the name at 46 (PKWARE
    // APPNOTE 4.3.12-4.3.16). Entries that cannot be read here get no method, and are refused.
    private static List<DirectoryEntry> CentralDirectory(FileStream file)
    {
        var result = new List<DirectoryEntry>();
        long length = file.Length;
        int tail = (int)Math.Min(length, 22 + 65535);
        var end = new byte[tail];
        file.Seek(length - tail, SeekOrigin.Begin);
        file.ReadExactly(end);
        int eocd = -1;
        for (int i = tail - 22; i >= 0; i--)
            if (BinaryPrimitives.ReadUInt32LittleEndian(end.AsSpan(i)) == 0x06054b50) { eocd = i; break; }
        if (eocd < 0) return result;
        long count = BinaryPrimitives.ReadUInt16LittleEndian(end.AsSpan(eocd + 10));
        long offset = BinaryPrimitives.ReadUInt32LittleEndian(end.AsSpan(eocd + 16));
        if ((offset == 0xFFFFFFFF || count == 0xFFFF) && eocd >= 20 && BinaryPrimitives.ReadUInt32LittleEndian(end.AsSpan(eocd - 20)) == 0x07064b50)
        {
            long zip64End = (long)BinaryPrimitives.ReadUInt64LittleEndian(end.AsSpan(eocd - 20 + 8));
            var record = new byte[56];
            if (zip64End < 0 || zip64End + 56 > length) return result;
            file.Seek(zip64End, SeekOrigin.Begin);
            file.ReadExactly(record);
            count = (long)BinaryPrimitives.ReadUInt64LittleEndian(record.AsSpan(32));
            offset = (long)BinaryPrimitives.ReadUInt64LittleEndian(record.AsSpan(48));
        }
        if (offset < 0 || offset >= length) return result;
        file.Seek(offset, SeekOrigin.Begin);
        var header = new byte[46];
        for (long i = 0; i < count && file.Position + 46 <= length; i++)
        {
            file.ReadExactly(header);
            if (BinaryPrimitives.ReadUInt32LittleEndian(header) != 0x02014b50) break;
            int method = BinaryPrimitives.ReadUInt16LittleEndian(header.AsSpan(10));
            long compressed = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(20));
            long uncompressed = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(24));
            long local = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(42));
            int nameLength = BinaryPrimitives.ReadUInt16LittleEndian(header.AsSpan(28));
            int extraLength = BinaryPrimitives.ReadUInt16LittleEndian(header.AsSpan(30));
            int commentLength = BinaryPrimitives.ReadUInt16LittleEndian(header.AsSpan(32));
            var name = new byte[nameLength];
            var extra = new byte[extraLength];
            if (file.Position + nameLength + extraLength + commentLength > length) break;
            file.ReadExactly(name);
            file.ReadExactly(extra);
            file.Seek(commentLength, SeekOrigin.Current);
            // Sizes and offsets too large for 32 bits are 0xFFFFFFFF here and follow in the zip64 extra field (id 1):
            // the uncompressed size, the compressed size, the local header's offset, each only if its field overflowed
            // (APPNOTE 4.5.3).
            bool known = true;
            if (compressed == 0xFFFFFFFF || local == 0xFFFFFFFF || uncompressed == 0xFFFFFFFF)
            {
                known = false;
                for (int at = 0; at + 4 <= extra.Length;)
                {
                    int id = BinaryPrimitives.ReadUInt16LittleEndian(extra.AsSpan(at)), size = BinaryPrimitives.ReadUInt16LittleEndian(extra.AsSpan(at + 2));
                    if (id == 1 && at + 4 + size <= extra.Length)
                    {
                        int v = at + 4, stop = at + 4 + size;
                        long Next(byte[] b)
                        {
                            if (v + 8 > stop) return -1;
                            v += 8;
                            return (long)BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(v - 8));
                        }
                        if (uncompressed == 0xFFFFFFFF) uncompressed = Next(extra);
                        if (compressed == 0xFFFFFFFF) compressed = Next(extra);
                        if (local == 0xFFFFFFFF) local = Next(extra);
                        known = compressed >= 0 && local >= 0 && uncompressed >= 0;
                        break;
                    }
                    at += 4 + size;
                }
            }
            // An entry whose place cannot be read is placed at the file's start with the whole file as its span, so
            // it overlaps every other entry and the archive is refused.
            result.Add(new DirectoryEntry(Encoding.UTF8.GetString(name), method, known ? local : 0, known ? 30 + nameLength + compressed : length));
        }
        file.Seek(0, SeekOrigin.Begin);
        return result;
    }

    private static Stream OpenEntry(string where, ZipArchiveEntry entry)
    {
        try
        {
            return entry.Open();
        }
        catch (InvalidDataException e)
        {
            throw new NpzFormatException($"{where}: cannot be read (unsupported compression or corrupt entry): {e.Message}", e);
        }
    }

    private static void SkipExactly(string where, Stream s, long count)
    {
        var buffer = new byte[Math.Min(count, 1 << 16)];
        while (count > 0)
        {
            int n = s.Read(buffer, 0, (int)Math.Min(count, buffer.Length));
            if (n == 0) throw new NpzFormatException($"{where}: the data ends inside the .npy header (truncated member).");
            count -= n;
        }
    }

    private static Member ReadMember(string where, ZipArchiveEntry entry)
    {
        byte[] prefix = new byte[12];
        byte[] header;
        long headerBytes;
        try
        {
            using var s = OpenEntry(where, entry);
            s.ReadExactly(prefix, 0, 10);
            if (prefix[0] != 0x93 || Encoding.ASCII.GetString(prefix, 1, 5) != "NUMPY")
                throw new NpzFormatException($"{where}: not a .npy array (no \\x93NUMPY magic).");
            int major = prefix[6];
            if (major is < 1 or > 3) throw new NpzFormatException($"{where}: unsupported .npy format version {major}.{prefix[7]}.");
            if (major > 1) s.ReadExactly(prefix, 10, 2);
            long headerLength = major == 1 ? BinaryPrimitives.ReadUInt16LittleEndian(prefix.AsSpan(8)) : BinaryPrimitives.ReadUInt32LittleEndian(prefix.AsSpan(8));
            if (headerLength > MaxHeaderBytes) throw new NpzFormatException($"{where}: .npy header of {headerLength} bytes exceeds the {MaxHeaderBytes}-byte limit.");
            headerBytes = (major == 1 ? 10 : 12) + headerLength;
            header = new byte[headerLength];
            s.ReadExactly(header);
            var (dtype, size, fortran, shape) = ParseHeader(where, (major == 3 ? Encoding.UTF8 : Encoding.Latin1).GetString(header));
            long elements = 1;
            foreach (long d in shape)
                elements = d == 0 ? 0 : elements > long.MaxValue / d / size ? throw new NpzFormatException($"{where}: shape [{string.Join(", ", shape)}] is too large.") : elements * d;
            long dataBytes = elements * size;
            if (entry.Length != headerBytes + dataBytes)
                throw new NpzFormatException($"{where}: the member holds {entry.Length - headerBytes} data bytes but its header's {dtype} shape [{string.Join(", ", shape)}] needs {dataBytes} (truncated or inconsistent member); refused.");
            return new Member(entry, headerBytes, dtype, shape, fortran, dataBytes);
        }
        catch (EndOfStreamException e)
        {
            throw new NpzFormatException($"{where}: the data ends inside the .npy header (truncated member).", e);
        }
        catch (Exception e) when (e is IOException or InvalidDataException)
        {
            throw new NpzFormatException($"{where}: cannot be read (truncated or corrupt): {e.Message}", e);
        }
    }

    private static readonly Regex Descr = new(@"['""]descr['""]\s*:\s*(?<v>'[^']*'|""[^""]*""|\[.*?\](?=\s*,\s*['""]))", RegexOptions.Singleline | RegexOptions.CultureInvariant);
    private static readonly Regex Fortran = new(@"['""]fortran_order['""]\s*:\s*(?<v>True|False)", RegexOptions.CultureInvariant);
    private static readonly Regex Shape = new(@"['""]shape['""]\s*:\s*\((?<v>[^)]*)\)", RegexOptions.CultureInvariant);

    // The .npy header is a Python dict literal written by numpy.lib.format: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
    private static (ScalarType DType, int Size, bool Fortran, long[] Shape) ParseHeader(string where, string header)
    {
        var d = Descr.Match(header);
        var f = Fortran.Match(header);
        var s = Shape.Match(header);
        if (!header.TrimStart().StartsWith('{') || !d.Success || !f.Success || !s.Success)
            throw new NpzFormatException($"{where}: malformed .npy header {Quote(header)} (expected a dict with 'descr', 'fortran_order' and 'shape').");
        string descr = d.Groups["v"].Value.Trim('\'', '"');
        (ScalarType, int) type = descr switch
        {
            "<f4" => (ScalarType.Float32, 4),
            "<f8" => (ScalarType.Float64, 8),
            "<f2" => (ScalarType.Float16, 2),
            _ when descr.Contains('O', StringComparison.Ordinal) => throw new NpzFormatException($"{where}: dtype '{descr}' is an object array, which would need unpickling (never done here); refused."),
            _ when descr.StartsWith('>') => throw new NpzFormatException($"{where}: dtype '{descr}' is big-endian; save it little-endian (arr.astype('<f4')); refused."),
            _ => throw new NpzFormatException($"{where}: dtype '{descr}' is not a float array (float16, float32 or float64 expected; a bfloat16 array saved from ml_dtypes shows as '<V2': convert it to float32 before saving); refused."),
        };
        var dims = new List<long>();
        foreach (string part in s.Groups["v"].Value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            if (!long.TryParse(part.TrimEnd('L'), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out long v))
                throw new NpzFormatException($"{where}: shape entry '{part}' is not a non-negative integer in header {Quote(header)}.");
            dims.Add(v);
        }
        return (type.Item1, type.Item2, f.Groups["v"].Value == "True", dims.ToArray());
    }

    private static string Quote(string header) => "\"" + (header.Length > 200 ? header[..200] + "…" : header).TrimEnd() + "\"";
}

/// <summary>A read-only stream that passes another through and keeps the CRC-32 (zip's checksum) of what was read.</summary>
internal sealed class Crc32Stream(Stream inner) : Stream
{
    private readonly System.IO.Hashing.Crc32 _crc = new();

    /// <summary>The CRC-32 of every byte read so far.</summary>
    public uint Crc => _crc.GetCurrentHashAsUInt32();

    public override int Read(Span<byte> buffer)
    {
        int n = inner.Read(buffer);
        _crc.Append(buffer[..n]);
        return n;
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}
