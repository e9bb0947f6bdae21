// Linked into the samples that write reports: an output goes to a temporary file in its folder and is then renamed
// over the destination, so an interrupted run never leaves a half-written file where an earlier one was.
internal static class OutputFile
{
    public static void WriteAllBytes(string path, byte[] bytes)
    {
        string full = Path.GetFullPath(path);
        string tmp = $"{full}.{Environment.ProcessId}.tmp";
        try
        {
            using (var file = new FileStream(tmp, FileMode.Create, FileAccess.Write))
            {
                file.Write(bytes);
                file.Flush(flushToDisk: true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        finally
        {
            File.Delete(tmp);    // nothing left behind after a failure (a no-op after the move)
        }
    }

    public static void WriteAllText(string path, string text) => WriteAllBytes(path, System.Text.Encoding.UTF8.GetBytes(text));
}
