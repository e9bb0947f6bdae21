namespace ViT22B.Cuda;

/// <summary>A CUDA driver call failed.</summary>
public sealed class CudaException : InvalidOperationException
{
    /// <summary>Creates the exception.</summary>
    public CudaException(string operation, CudaResult result, string detail)
        : base($"{operation} failed: {result} ({(int)result}){(detail.Length > 0 ? $": {detail}" : "")}.")
        => (Operation, Result) = (operation, result);

    /// <summary>The driver function that failed.</summary>
    public string Operation { get; }
    /// <summary>The driver's result code.</summary>
    public CudaResult Result { get; }
}
