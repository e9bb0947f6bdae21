namespace ViT22B.Parallel;

/// <summary>Arguments of the ring autograd functions (kept in the autograd context).</summary>
internal sealed record RingArgs(ICommunicator Comm, long[] Counts, CommMode Mode);
