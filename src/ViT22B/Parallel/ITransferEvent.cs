namespace ViT22B.Parallel;

/// <summary>A device event of <see cref="IGpuTransport"/>: whether (or once) the work it captured has finished.</summary>
internal interface ITransferEvent : IDisposable
{
    /// <summary>Whether the captured work has finished (never blocks).</summary>
    bool IsComplete { get; }

    /// <summary>Blocks until the captured work has finished.</summary>
    void Synchronize();
}
