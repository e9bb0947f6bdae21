namespace ViT22B.Interop;

/// <summary>An NCCL call failed; <see cref="Result"/> says how, <see cref="IsFatal"/> whether the communicator must be
/// aborted and re-created.</summary>
public sealed class NcclException : InvalidOperationException
{
    /// <summary>Creates the exception.</summary>
    public NcclException(string operation, NcclResult result, string detail)
        : base($"{operation} failed: {result} ({(int)result}){(detail.Length > 0 ? $": {detail}" : "")}.")
    {
        Operation = operation;
        Result = result;
    }

    /// <summary>The NCCL function that failed.</summary>
    public string Operation { get; }

    /// <summary>The NCCL result code.</summary>
    public NcclResult Result { get; }

    /// <summary>Fatal codes (NCCL user guide, communicators.rst): the communicator must be aborted.</summary>
    public bool IsFatal => Nccl.IsFatal(Result);
}
