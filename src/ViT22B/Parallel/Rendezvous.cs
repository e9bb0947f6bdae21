using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;

namespace ViT22B.Parallel;

/// <summary>
/// Where this process sits in a multi-process run, in the <c>torchrun</c> convention: <c>MASTER_ADDR</c>,
/// <c>MASTER_PORT</c>, <c>RANK</c>, <c>WORLD_SIZE</c>, <c>LOCAL_RANK</c> and, optionally, <c>LOCAL_WORLD_SIZE</c>.
/// </summary>
/// <param name="MasterAddress">Host of rank 0 (name or address).</param>
/// <param name="MasterPort">TCP port rank 0 listens on.</param>
/// <param name="Rank">This process's global rank.</param>
/// <param name="WorldSize">Number of processes.</param>
/// <param name="LocalRank">This process's rank on its machine (its GPU is this index modulo the GPUs it sees).</param>
public sealed record LaunchEnvironment(string MasterAddress, int MasterPort, int Rank, int WorldSize, int LocalRank)
{
    /// <summary>Processes on this machine (<c>LOCAL_WORLD_SIZE</c>, optional): tells whether several share a GPU.</summary>
    public int? LocalWorldSize { get; init; }

    /// <summary>Reads the five variables (from <paramref name="get"/>, default the process environment).</summary>
    /// <exception cref="InvalidOperationException">A variable is missing or out of range (named, with its value).</exception>
    public static LaunchEnvironment FromEnvironment(Func<string, string?>? get = null)
    {
        get ??= Environment.GetEnvironmentVariable;
        string Need(string name) => get(name) is { Length: > 0 } v ? v
            : throw new InvalidOperationException($"Environment variable {name} is not set; a multi-process run needs MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (the torchrun convention).");
        int Int(string name, int min, int max)
        {
            string v = Need(name);
            if (!int.TryParse(v, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int x) || x < min || x > max)
                throw new InvalidOperationException($"Environment variable {name} = '{v}' is not an integer in [{min}, {max}].");
            return x;
        }
        int world = Int("WORLD_SIZE", 1, 1 << 20);
        return new LaunchEnvironment(Need("MASTER_ADDR"), Int("MASTER_PORT", 1, 65535), Int("RANK", 0, world - 1), world, Int("LOCAL_RANK", 0, world - 1))
        {
            LocalWorldSize = get("LOCAL_WORLD_SIZE") is { Length: > 0 } ? Int("LOCAL_WORLD_SIZE", 1, world) : null,
        };
    }
}

/// <summary>The rendezvous failed: a peer did not arrive in time, or arrived with another world size or a duplicate rank.</summary>
public sealed class RendezvousException : IOException
{
    /// <summary>Creates the exception.</summary>
    public RendezvousException(string message, Exception? inner = null) : base(message, inner) { }
}

/// <summary>
/// Hands one payload (an NCCL unique id) from rank 0 to every other rank over TCP: rank 0 listens on
/// <see cref="LaunchEnvironment.MasterPort"/>, every other rank connects (retrying until the deadline) and introduces
/// itself (magic, protocol version, rank, world size); once all have arrived and agree, rank 0 sends each the payload.
/// Disagreement or a missing peer is an exception naming it, never a hang.
/// </summary>
public static class Rendezvous
{
    private const ulong Magic = 0x5649543232425256;   // "VIT22BRV"
    private const int Version = 1;

    /// <summary>Rank 0 passes the payload and gets it back; other ranks pass null and receive it.</summary>
    /// <exception cref="RendezvousException">Timeout, world-size disagreement, duplicate or out-of-range rank.</exception>
    public static byte[] Broadcast(LaunchEnvironment env, byte[]? payload, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(env);
        if (timeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(timeout), $"timeout must be positive, found {timeout}.");
        var deadline = DateTime.UtcNow + timeout;
        if (env.Rank == 0)
        {
            ArgumentNullException.ThrowIfNull(payload);
            return env.WorldSize == 1 ? payload : Serve(env, payload, deadline, timeout);
        }
        if (payload is not null) throw new ArgumentException($"Only rank 0 provides the payload; rank {env.Rank} was given one.", nameof(payload));
        return Join(env, deadline, timeout);
    }

    private static byte[] Serve(LaunchEnvironment env, byte[] payload, DateTime deadline, TimeSpan timeout)
    {
        using var listener = new TcpListener(IPAddress.Any, env.MasterPort);
        listener.Server.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        try { listener.Start(); }
        catch (SocketException e) { throw new RendezvousException($"Rank 0 cannot listen on port {env.MasterPort}: {e.Message}.", e); }
        var peers = new Dictionary<int, TcpClient>();
        try
        {
            while (peers.Count < env.WorldSize - 1)
            {
                var left = deadline - DateTime.UtcNow;
                var accept = listener.AcceptTcpClientAsync();
                if (left <= TimeSpan.Zero || !accept.Wait(left))
                {
                    var missing = Enumerable.Range(1, env.WorldSize - 1).Where(r => !peers.ContainsKey(r));
                    throw new RendezvousException($"Rendezvous timed out after {timeout.TotalSeconds:F0} s on port {env.MasterPort}: ranks {string.Join(", ", missing)} of {env.WorldSize} did not arrive.");
                }
                var client = accept.Result;
                client.ReceiveTimeout = client.SendTimeout = (int)Math.Max(1, (deadline - DateTime.UtcNow).TotalMilliseconds);
                var stream = client.GetStream();
                var hello = ReadExactly(stream, 20, "the hello of a peer");
                ulong magic = BinaryPrimitives.ReadUInt64BigEndian(hello);
                int version = BinaryPrimitives.ReadInt32BigEndian(hello.AsSpan(8)), rank = BinaryPrimitives.ReadInt32BigEndian(hello.AsSpan(12)), world = BinaryPrimitives.ReadInt32BigEndian(hello.AsSpan(16));
                string? problem = magic != Magic || version != Version ? "it does not speak this rendezvous protocol"
                    : world != env.WorldSize ? $"it says WORLD_SIZE = {world}, rank 0 has {env.WorldSize}"
                    : rank <= 0 || rank >= env.WorldSize ? $"its rank {rank} is outside [1, {env.WorldSize})"
                    : peers.ContainsKey(rank) ? $"rank {rank} arrived twice" : null;
                if (problem is not null)
                {
                    var from = client.Client.RemoteEndPoint;
                    Reply(stream, 1, System.Text.Encoding.UTF8.GetBytes($"rank 0 refused this peer: {problem}"));
                    client.Dispose();
                    throw new RendezvousException($"Rendezvous on port {env.MasterPort} failed: a peer from {from} was refused because {problem}.");
                }
                peers[rank] = client;
            }
            foreach (var client in peers.Values) Reply(client.GetStream(), 0, payload);
            return payload;
        }
        catch (IOException e) when (e is not RendezvousException)
        {
            throw new RendezvousException($"Rendezvous on port {env.MasterPort} failed while talking to a peer: {e.Message}.", e);
        }
        finally
        {
            foreach (var c in peers.Values) c.Dispose();
            listener.Stop();
        }
    }

    private static byte[] Join(LaunchEnvironment env, DateTime deadline, TimeSpan timeout)
    {
        Exception? last = null;
        while (DateTime.UtcNow < deadline)
        {
            using var client = new TcpClient();
            try
            {
                var connect = client.ConnectAsync(env.MasterAddress, env.MasterPort);
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero || !connect.Wait(left)) break;
                client.ReceiveTimeout = client.SendTimeout = (int)Math.Max(1, (deadline - DateTime.UtcNow).TotalMilliseconds);
                var stream = client.GetStream();
                var hello = new byte[20];
                BinaryPrimitives.WriteUInt64BigEndian(hello, Magic);
                BinaryPrimitives.WriteInt32BigEndian(hello.AsSpan(8), Version);
                BinaryPrimitives.WriteInt32BigEndian(hello.AsSpan(12), env.Rank);
                BinaryPrimitives.WriteInt32BigEndian(hello.AsSpan(16), env.WorldSize);
                stream.Write(hello);
                var head = ReadExactly(stream, 8, "rank 0's reply");
                int status = BinaryPrimitives.ReadInt32BigEndian(head), length = BinaryPrimitives.ReadInt32BigEndian(head.AsSpan(4));
                if (length is < 0 or > 1 << 20) throw new RendezvousException($"Rank {env.Rank}: rank 0 replied with an invalid length {length}.");
                var body = ReadExactly(stream, length, "rank 0's payload");
                if (status != 0) throw new RendezvousException($"Rank {env.Rank}: {System.Text.Encoding.UTF8.GetString(body)}.");
                return body;
            }
            catch (Exception e) when (e is SocketException or AggregateException { InnerException: SocketException })
            {
                last = e;   // rank 0 not listening yet: retry
                Thread.Sleep(50);
            }
            catch (IOException e) when (e is not RendezvousException)
            {
                throw new RendezvousException($"Rank {env.Rank}: the connection to rank 0 at {env.MasterAddress}:{env.MasterPort} failed: {e.Message}.", e);
            }
        }
        throw new RendezvousException($"Rank {env.Rank}: rank 0 at {env.MasterAddress}:{env.MasterPort} did not answer within {timeout.TotalSeconds:F0} s{(last is null ? "" : $" (last error: {(last as AggregateException)?.InnerException?.Message ?? last.Message})")}.", last);
    }

    private static void Reply(NetworkStream stream, int status, byte[] body)
    {
        var head = new byte[8];
        BinaryPrimitives.WriteInt32BigEndian(head, status);
        BinaryPrimitives.WriteInt32BigEndian(head.AsSpan(4), body.Length);
        stream.Write(head);
        stream.Write(body);
        stream.Flush();
    }

    private static byte[] ReadExactly(NetworkStream stream, int count, string what)
    {
        var buffer = new byte[count];
        try
        {
            stream.ReadExactly(buffer);
        }
        catch (EndOfStreamException e)
        {
            throw new RendezvousException($"The connection closed while reading {what}.", e);
        }
        return buffer;
    }
}
