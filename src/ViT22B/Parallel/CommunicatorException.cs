namespace ViT22B.Parallel;

/// <summary>A collective failed: a peer raised, the ranks' calls did not match, or a peer did not arrive in time.
/// Every rank of the world sees one.</summary>
public sealed class CommunicatorException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CommunicatorException(string message, Exception? inner = null) : base(message, inner) { }
}
