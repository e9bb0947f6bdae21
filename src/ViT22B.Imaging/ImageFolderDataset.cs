using ViT22B.Data;

namespace ViT22B.Imaging;

/// <summary>
/// A folder with one sub-folder per class (torchvision's <c>ImageFolder</c>): classes are the sub-folder names in
/// ordinal order, examples the image files anywhere inside each, in torchvision's order (<c>sorted(os.walk(…,
/// followlinks=True))</c>: folders by path, ordinally, then files by name), following links (unlike os.walk, a link
/// to a folder already walked is not walked again, so a link back up the tree ends). Images are recognised by extension (<see cref="ImageTensors.IsImageFile"/>: JPEG, PNG, WebP, BMP and
/// GIF; torchvision also lists TIFF, PPM and PGM, which SkiaSharp does not decode, and not GIF). Images are decoded when
/// asked for (<see cref="ImageTensors.Decode(string, long)"/>) and passed through the transform.
/// </summary>
public sealed class ImageFolderDataset : IDataset
{
    private readonly (string Path, int Label)[] _items;
    private readonly ImageTransform _transform;
    private readonly long _maxPixels;

    /// <summary>Scans <paramref name="root"/>.</summary>
    /// <exception cref="DirectoryNotFoundException">The folder does not exist.</exception>
    /// <exception cref="InvalidDataException">It has no class sub-folders, or a class holds no images (named).</exception>
    public ImageFolderDataset(string root, ImageTransform transform, long maxPixels = ImageTensors.DefaultMaxPixels)
    {
        ArgumentNullException.ThrowIfNull(root);
        _transform = transform ?? throw new ArgumentNullException(nameof(transform));
        if (!Directory.Exists(root)) throw new DirectoryNotFoundException($"Dataset folder '{root}' does not exist.");
        var classDirs = Directory.EnumerateDirectories(root).OrderBy(d => Path.GetFileName(d), StringComparer.Ordinal).ToList();
        if (classDirs.Count == 0)
            throw new InvalidDataException($"Dataset folder '{root}' has no class sub-folders; expected one folder of images per class ({root}/<class>/<image>).");
        var items = new List<(string, int)>();
        for (int c = 0; c < classDirs.Count; c++)
        {
            var files = Walk(classDirs[c]);
            if (files.Count == 0)
                throw new InvalidDataException($"Class folder '{classDirs[c]}' holds no images (JPEG, PNG, WebP, BMP or GIF).");
            items.AddRange(files.Select(f => (f, c)));
        }
        _items = items.ToArray();
        Classes = classDirs.Select(d => Path.GetFileName(d)).ToList();
        Root = root;
        _maxPixels = maxPixels;
    }

    // The image files under a class folder: every folder reached (links followed, unless to a folder already walked)
    // in ordinal order of its path, its files in ordinal order of their names.
    private static List<string> Walk(string classDir)
    {
        var folders = new List<string>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var pending = new Stack<string>();
        pending.Push(classDir);
        while (pending.Count > 0)
        {
            string dir = pending.Pop();
            string real = new DirectoryInfo(dir).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? Path.GetFullPath(dir);
            if (!seen.Add(real)) continue;
            folders.Add(dir);
            foreach (string sub in Directory.EnumerateDirectories(dir)) pending.Push(sub);
        }
        return folders.Order(StringComparer.Ordinal).SelectMany(ImageTensors.ListImages).ToList();
    }

    /// <summary>The dataset folder.</summary>
    public string Root { get; }

    /// <inheritdoc />
    public int Count => _items.Length;

    /// <inheritdoc />
    public IReadOnlyList<string> Classes { get; }

    /// <inheritdoc />
    public Example Get(int index, Random rng)
    {
        var (path, label) = _items[index];
        using var scope = TorchSharp.torch.NewDisposeScope();
        var x = ImageTensors.Decode(path, _maxPixels);
        return new Example(_transform(x, rng).MoveToOuterDisposeScope(), label);
    }

    /// <inheritdoc />
    public string Describe(int index) => _items[index].Path;
}
