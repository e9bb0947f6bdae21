namespace ViT22B.Interop;

/// <summary>Writes files so that a crash mid-write never leaves a half-written file in place of the old one.</summary>
public static class AtomicFile
{
    // Test hook: runs after the temporary file is complete and flushed, just before the rename (a crash there must
    // leave the previous file intact). Flow-local, so concurrent tests do not see each other's hooks.
    internal static readonly AsyncLocal<Action<string>?> BeforeRename = new();

    /// <summary>
    /// Calls <paramref name="write"/> on a temporary file in the destination folder, flushes it to disk, then
    /// renames it over <paramref name="path"/>. On any exception the temporary file is deleted and the previous
    /// content of <paramref name="path"/> (if any) is untouched.
    /// </summary>
    public static void Write(string path, Action<Stream> write)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(write);
        string full = Path.GetFullPath(path);
        string dir = Path.GetDirectoryName(full) ?? ".";
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"Cannot write '{path}': folder '{dir}' does not exist.");
        string tmp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(fs);
                fs.Flush(flushToDisk: true);
            }
            BeforeRename.Value?.Invoke(tmp);
            File.Move(tmp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }
}
