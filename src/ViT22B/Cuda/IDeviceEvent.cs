namespace ViT22B.Cuda;

/// <summary>A device event: record it after work on a stream, make another stream wait for it, ask whether it has
/// passed (never blocks).</summary>
internal interface IDeviceEvent : IDisposable
{
    /// <summary>Captures the work queued on <paramref name="stream"/> so far.</summary>
    void Record(nint stream);

    /// <summary>Makes <paramref name="stream"/> wait (on the device) for the captured work.</summary>
    void Wait(nint stream);

    /// <summary>Whether the captured work has finished.</summary>
    bool IsComplete { get; }
}
