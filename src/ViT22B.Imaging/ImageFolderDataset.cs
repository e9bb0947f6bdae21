using System.Runtime.InteropServices;
using ViT22B.Data;

namespace ViT22B.Imaging;

/// <summary>
/// A folder with one sub-folder per class (torchvision's <c>ImageFolder</c>): classes are the sub-folder names in
/// ordinal order, examples the image files anywhere inside each, in torchvision's order (<c>sorted(os.walk(…,
/// followlinks=True))</c>: folders by path, ordinally, then files by name), following links (unlike os.walk, a link
/// to one of its own ancestors is not entered, so a loop ends; a folder reached through two links is listed twice, as
/// os.walk lists it). Images are recognised by extension (<see cref="ImageTensors.IsImageFile"/>: JPEG, PNG, WebP, BMP and
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

    // The image files under a class folder, as torchvision's make_dataset finds them: every folder reached (links
    // followed; a link to one of the folder's own ancestors, a loop, is not entered) in ordinal order of its path, its
    // files in ordinal order of their names. A folder reached through two links is listed under both, as os.walk does.
    private static List<string> Walk(string classDir)
    {
        var folders = new List<string>();
        var ancestors = new HashSet<string>(StringComparer.Ordinal);
        void Visit(string dir)
        {
            string real = RealPath(dir);
            if (!ancestors.Add(real)) return;
            folders.Add(dir);
            foreach (string sub in Directory.EnumerateDirectories(dir).Order(StringComparer.Ordinal)) Visit(sub);
            ancestors.Remove(real);
        }
        Visit(classDir);
        return folders.Order(StringComparer.Ordinal).SelectMany(ImageTensors.ListImages).ToList();
    }

    // The canonical path, every link and '..' resolved (POSIX realpath; elsewhere the final link target, which is
    // canonical unless a link lies above it).
    private static string RealPath(string dir)
    {
        if (!OperatingSystem.IsWindows())
        {
            nint resolved = NativeRealPath(System.Text.Encoding.UTF8.GetBytes(dir + "\0"), 0);
            if (resolved != 0)
            {
                try
                {
                    return Marshal.PtrToStringUTF8(resolved)!;
                }
                finally
                {
                    NativeFree(resolved);
                }
            }
        }
        return new DirectoryInfo(dir).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? Path.GetFullPath(dir);
    }

    [DllImport("libc", EntryPoint = "realpath")]
    private static extern nint NativeRealPath(byte[] path, nint resolved);      // path: UTF-8, null-terminated

    [DllImport("libc", EntryPoint = "free")]
    private static extern void NativeFree(nint pointer);

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
