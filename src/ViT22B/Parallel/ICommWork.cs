using static TorchSharp.torch;

namespace ViT22B.Parallel;

/// <summary>An operation in flight; <see cref="Wait"/> blocks until its result is available on the calling rank.
/// Disposing it without waiting (a rank leaving a ring loop on an exception, say) waits for the operation all the
/// same, so that no buffer it uses is freed early, and never throws; a failure found then makes the communicator fail
/// every later call.</summary>
public interface ICommWork : IDisposable
{
    /// <summary>Waits for the operation and returns its result, registered in the caller's current dispose scope.
    /// Call at most once, on the rank's own thread.</summary>
    /// <exception cref="CommunicatorException">A peer failed, the call did not match the peers' calls, or the
    /// peers did not arrive within the timeout.</exception>
    Tensor Wait();
}
