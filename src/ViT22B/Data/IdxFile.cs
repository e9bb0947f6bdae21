using System.Buffers.Binary;
using System.IO.Compression;
using TorchSharp;
using static TorchSharp.torch;

namespace ViT22B.Data;

/// <summary>
/// Reads IDX files (the MNIST / Fashion-MNIST format), gzipped or not: a big-endian header (two zero bytes, a
/// type byte, the number of dimensions, then each dimension as u32) followed by the raw values. Only unsigned-byte
/// data (type 0x08) is read, which is what MNIST-style datasets hold.
/// </summary>
public static class IdxFile
{
    /// <summary>Fashion-MNIST's class names (Zalando Research), index = label.</summary>
    public static readonly IReadOnlyList<string> FashionMnistClasses = new[]
    {
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    };

    /// <summary>Reads the file as a uint8 tensor of the header's shape (e.g. [60000, 28, 28] or [60000]).</summary>
    /// <exception cref="InvalidDataException">Wrong magic number, unsupported type, or a data length that does not
    /// match the header (the message names the file).</exception>
    public static Tensor Read(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"IDX file '{path}' does not exist.", path);
        using var file = File.OpenRead(path);
        bool gz = file.Length >= 2 && file.ReadByte() == 0x1f && file.ReadByte() == 0x8b;
        file.Position = 0;
        using Stream stream = gz ? new GZipStream(file, CompressionMode.Decompress) : file;
        try
        {
            return Read(stream, path);
        }
        catch (InvalidDataException e) when (gz && e.Message.IndexOf(path, StringComparison.Ordinal) < 0)
        {
            throw new InvalidDataException($"IDX file '{path}': the gzip stream is corrupt ({e.Message}).", e);
        }
    }

    private static Tensor Read(Stream s, string path)
    {
        var head = new byte[4];
        if (ReadFully(s, head) < 4) throw new InvalidDataException($"IDX file '{path}' is shorter than its 4-byte magic number.");
        uint magic = BinaryPrimitives.ReadUInt32BigEndian(head);
        if (head[0] != 0 || head[1] != 0)
            throw new InvalidDataException($"IDX file '{path}': magic number 0x{magic:X8} does not start with two zero bytes; not an IDX file.");
        if (head[2] != 0x08)
            throw new InvalidDataException($"IDX file '{path}': magic number 0x{magic:X8} declares data type 0x{head[2]:X2}; only unsigned bytes (0x08, magic 0x0000080N) are supported.");
        int rank = head[3];
        if (rank is < 1 or > 4) throw new InvalidDataException($"IDX file '{path}': magic number 0x{magic:X8} declares {rank} dimensions; expected 1 to 4.");
        var dimBytes = new byte[4 * rank];
        if (ReadFully(s, dimBytes) < dimBytes.Length) throw new InvalidDataException($"IDX file '{path}' ends inside its header ({rank} dimensions declared).");
        var shape = new long[rank];
        long count = 1;
        for (int i = 0; i < rank; i++)
        {
            shape[i] = BinaryPrimitives.ReadUInt32BigEndian(dimBytes.AsSpan(4 * i));
            count *= shape[i];
            if (count > Array.MaxLength) throw new InvalidDataException($"IDX file '{path}': header shape [{string.Join(", ", shape.Take(i + 1))}] exceeds {Array.MaxLength:N0} values, the most one array holds.");
        }
        // A file's remaining length is checked before its data is allocated, and a gzip stream's data is collected as it
        // arrives, so a header that declares more than the file holds is refused without allocating what it declares.
        InvalidDataException Short(long got) => new($"IDX file '{path}': header shape [{string.Join(", ", shape)}] needs {count:N0} data bytes, the file holds {got:N0}.");
        byte[] data;
        if (s.CanSeek)
        {
            if (s.Length - s.Position < count) throw Short(s.Length - s.Position);
            data = new byte[count];
            if (ReadFully(s, data) is var got && got < count) throw Short(got);
        }
        else
        {
            using var received = new MemoryStream((int)Math.Min(count, 1L << 20));
            var chunk = new byte[1 << 20];
            int n;
            while (received.Length < count && (n = s.Read(chunk, 0, (int)Math.Min(chunk.Length, count - received.Length))) > 0) received.Write(chunk, 0, n);
            if (received.Length < count) throw Short(received.Length);
            data = received.Length == received.Capacity ? received.GetBuffer() : received.ToArray();
        }
        if (s.ReadByte() >= 0)
            throw new InvalidDataException($"IDX file '{path}': data continues past the {count:N0} bytes the header shape [{string.Join(", ", shape)}] declares.");
        return torch.tensor(data, shape, ScalarType.Byte);
    }

    /// <summary>Loads an images file and a labels file as a <see cref="TensorDataset"/> (images [N, 1, H, W]
    /// scaled to [0, 1] then passed through <paramref name="transform"/>).</summary>
    public static TensorDataset LoadDataset(string imagesPath, string labelsPath, IReadOnlyList<string> classes, ImageTransform? transform = null)
    {
        using var images = Read(imagesPath);
        using var labels = Read(labelsPath);
        if (images.dim() != 3) throw new InvalidDataException($"IDX images file '{imagesPath}' has shape [{string.Join(", ", images.shape)}]; expected [N, H, W].");
        if (labels.dim() != 1) throw new InvalidDataException($"IDX labels file '{labelsPath}' has shape [{string.Join(", ", labels.shape)}]; expected [N].");
        if (images.shape[0] != labels.shape[0])
            throw new InvalidDataException($"IDX files disagree: '{imagesPath}' holds {images.shape[0]} images, '{labelsPath}' holds {labels.shape[0]} labels.");
        if (labels.shape[0] == 0) throw new InvalidDataException($"IDX files '{imagesPath}' and '{labelsPath}' hold no examples.");
        long max = labels.max().item<byte>();
        if (max >= classes.Count) throw new InvalidDataException($"IDX labels file '{labelsPath}' holds label {max}, but only {classes.Count} classes are given.");
        return new TensorDataset(images, labels, classes, transform, Path.GetFileName(imagesPath));
    }

    /// <summary>Fashion-MNIST's training or test split from a folder holding the four files
    /// (<c>train-images-idx3-ubyte[.gz]</c> …; Debian's <c>dataset-fashion-mnist</c> installs them under
    /// <c>/usr/share/datasets/fashion-mnist</c>).</summary>
    public static TensorDataset LoadFashionMnist(string folder, bool train, ImageTransform? transform = null)
    {
        string prefix = train ? "train" : "t10k";
        return LoadDataset(Find(folder, $"{prefix}-images-idx3-ubyte"), Find(folder, $"{prefix}-labels-idx1-ubyte"), FashionMnistClasses, transform);
    }

    private static string Find(string folder, string name)
    {
        foreach (var candidate in new[] { name + ".gz", name })
        {
            string p = Path.Combine(folder, candidate);
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException($"'{name}.gz' (or '{name}') not found in '{folder}'. Install Fashion-MNIST with `apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist) or pass its folder.");
    }

    private static int ReadFully(Stream s, byte[] buffer)
    {
        int total = 0;
        while (total < buffer.Length)
        {
            int n = s.Read(buffer, total, buffer.Length - total);
            if (n == 0) break;
            total += n;
        }
        return total;
    }
}
