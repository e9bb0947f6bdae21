using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary><c>ncclDataType_t</c>.</summary>
internal enum NcclDataType
{
    /// <summary>ncclInt8.</summary>
    Int8 = 0,
    /// <summary>ncclUint8.</summary>
    Uint8 = 1,
    /// <summary>ncclInt32.</summary>
    Int32 = 2,
    /// <summary>ncclUint32.</summary>
    Uint32 = 3,
    /// <summary>ncclInt64.</summary>
    Int64 = 4,
    /// <summary>ncclUint64.</summary>
    Uint64 = 5,
    /// <summary>ncclFloat16.</summary>
    Float16 = 6,
    /// <summary>ncclFloat32.</summary>
    Float32 = 7,
    /// <summary>ncclFloat64.</summary>
    Float64 = 8,
    /// <summary>ncclBfloat16 (NCCL ≥ 2.10).</summary>
    BFloat16 = 9,
}

/// <summary><c>ncclRedOp_t</c> (built-in operations).</summary>
internal enum NcclRedOp
{
    /// <summary>ncclSum.</summary>
    Sum = 0,
    /// <summary>ncclProd.</summary>
    Prod = 1,
    /// <summary>ncclMax.</summary>
    Max = 2,
    /// <summary>ncclMin.</summary>
    Min = 3,
    /// <summary>ncclAvg (NCCL ≥ 2.10).</summary>
    Avg = 4,
}

/// <summary><c>ncclUniqueId</c>: 128 opaque bytes, passed by value to <c>ncclCommInitRank</c>.</summary>
[StructLayout(LayoutKind.Sequential, Size = Bytes)]
internal unsafe struct NcclUniqueId
{
    /// <summary><c>NCCL_UNIQUE_ID_BYTES</c>.</summary>
    public const int Bytes = 128;

    /// <summary>The raw bytes.</summary>
    public fixed byte Internal[Bytes];

    /// <summary>A copy of the bytes (to send to the other ranks).</summary>
    public readonly byte[] ToArray()
    {
        var result = new byte[Bytes];
        fixed (byte* p = Internal) new ReadOnlySpan<byte>(p, Bytes).CopyTo(result);
        return result;
    }

    /// <summary>The id from 128 received bytes.</summary>
    public static NcclUniqueId FromBytes(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length != Bytes) throw new ArgumentException($"An NCCL unique id is {Bytes} bytes, found {bytes.Length}.", nameof(bytes));
        var id = new NcclUniqueId();
        bytes.CopyTo(new Span<byte>(id.Internal, Bytes));
        return id;
    }
}

/// <summary>
/// <c>ncclConfig_t</c> as NCCL 2.14 introduced it (<c>size</c>, <c>magic</c>, <c>version</c>, <c>blocking</c>). The
/// structure grows with every release; NCCL copies the first <c>size</c> bytes a caller passes and gives every field
/// that the caller's <c>version</c> did not have its default (<c>parseCommConfig</c> in NCCL's <c>init.cc</c>), so this
/// prefix stays valid for every NCCL ≥ 2.14 and managed code never has to follow the newest layout.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NcclConfig
{
    /// <summary><c>NCCL_API_MAGIC</c>.</summary>
    public const uint ApiMagic = 0xcafebeef;

    /// <summary><c>NCCL_VERSION(2, 14, 0)</c>: the version whose layout this is.</summary>
    public const uint LayoutVersion = 21400;

    public nuint Size;
    public uint Magic;
    public uint Version;
    public int Blocking;

    /// <summary>A configuration for a non-blocking communicator (<c>blocking = 0</c>): no NCCL call waits for peers,
    /// so initialization and every collective can be abandoned with <c>ncclCommAbort</c> at a deadline.</summary>
    public static NcclConfig NonBlocking() => new()
    {
        Size = (nuint)System.Runtime.CompilerServices.Unsafe.SizeOf<NcclConfig>(), Magic = ApiMagic, Version = LayoutVersion, Blocking = 0,
    };
}

/// <summary>
/// NCCL (<c>libnccl.so.2</c>, version ≥ 2.14: non-blocking communicators and <c>ncclGetLastError</c>) through function
/// pointers resolved on first use: nothing loads until a member that calls NCCL runs, so a CPU-only machine never
/// opens the library. The path can be set with the environment variable <c>VIT22B_NCCL_PATH</c> (a file); otherwise
/// the loader's search path is used.
/// </summary>
internal static unsafe class Nccl
{
    /// <summary>Environment variable naming the NCCL library file to load instead of the search path's.</summary>
    public const string PathVariable = "VIT22B_NCCL_PATH";

    /// <summary>The oldest NCCL the library works with, as NCCL encodes versions (2.14.0).</summary>
    public const int MinimumVersion = 21400;

    /// <summary>The library (loaded on first use).</summary>
    public static readonly LazyNativeLibrary Library = new("libnccl.so.2",
        (Environment.GetEnvironmentVariable(PathVariable) is { Length: > 0 } p ? new[] { p } : Array.Empty<string>()).Concat(new[] { "libnccl.so.2", "libnccl.so" }).ToArray(),
        $"Install NCCL ≥ 2.14 (NVIDIA's libnccl2 package or the nvidia-nccl-cu12/cu13 wheel) and put it on the library path, or set {PathVariable} to the file.");

    private static readonly Lazy<NativeApi> Api = new(() => new NativeApi(Library), LazyThreadSafetyMode.ExecutionAndPublication);

    /// <summary>The real library behind the <see cref="INcclApi"/> seam.</summary>
    internal static INcclApi Native => Api.Value;

    /// <summary>Whether NCCL's user guide asks for the communicator to be aborted after this code (everything but
    /// success, invalid argument, in-progress). The library aborts after every failed call regardless: ranks issue
    /// collectives in lockstep, and a rank whose call failed can no longer match its peers' sequence.</summary>
    public static bool IsFatal(NcclResult result) => result is not (NcclResult.Success or NcclResult.InvalidArgument or NcclResult.InProgress);

    /// <summary>The NCCL type of a tensor dtype.</summary>
    /// <exception cref="NotSupportedException">A dtype NCCL has no type for (bool, complex).</exception>
    public static NcclDataType DataType(ScalarType dtype) => dtype switch
    {
        ScalarType.Int8 => NcclDataType.Int8,
        ScalarType.Byte => NcclDataType.Uint8,
        ScalarType.Int32 => NcclDataType.Int32,
        ScalarType.Int64 => NcclDataType.Int64,
        ScalarType.Float16 => NcclDataType.Float16,
        ScalarType.Float32 => NcclDataType.Float32,
        ScalarType.Float64 => NcclDataType.Float64,
        ScalarType.BFloat16 => NcclDataType.BFloat16,
        _ => throw new NotSupportedException($"NCCL has no data type for {dtype}."),
    };

    /// <summary>Bytes per element of an NCCL type.</summary>
    internal static int ElementSize(NcclDataType type) => type switch
    {
        NcclDataType.Int8 or NcclDataType.Uint8 => 1,
        NcclDataType.Float16 or NcclDataType.BFloat16 => 2,
        NcclDataType.Int32 or NcclDataType.Uint32 or NcclDataType.Float32 => 4,
        NcclDataType.Int64 or NcclDataType.Uint64 or NcclDataType.Float64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(type), $"Not an NCCL data type: {(int)type}."),
    };

    /// <summary>Throws <see cref="NcclException"/> (with NCCL's own error string) unless <paramref name="result"/> is success.</summary>
    public static void Check(NcclResult result, string operation)
    {
        if (result == NcclResult.Success) return;
        string detail = Library.IsLoaded ? Native.ErrorString(result) : "";
        throw new NcclException(operation, result, detail);
    }

    /// <summary>NCCL's text for a result code.</summary>
    public static string ErrorString(NcclResult result) => Native.ErrorString(result);

    /// <summary>The library version as NCCL encodes it (e.g. 23007 for 2.30.7).</summary>
    public static int Version() => Version(Native);

    internal static int Version(INcclApi api)
    {
        int v;
        Check(api, api.GetVersion(&v), "ncclGetVersion");
        return v;
    }

    /// <summary>A new unique id (on rank 0; hand it to the others, e.g. with <see cref="ViT22B.Parallel.Rendezvous"/>).</summary>
    public static NcclUniqueId GetUniqueId() => GetUniqueId(Native);

    internal static NcclUniqueId GetUniqueId(INcclApi api)
    {
        NcclUniqueId id;
        Check(api, api.GetUniqueId(&id), "ncclGetUniqueId");
        return id;
    }

    internal static void Check(INcclApi api, NcclResult result, string operation, string lastError = "")
    {
        if (result == NcclResult.Success) return;
        string detail = api.ErrorString(result);
        if (lastError.Length > 0) detail = detail.Length > 0 ? $"{detail}; {lastError}" : lastError;
        throw new NcclException(operation, result, detail);
    }

    // The function table; each pointer is resolved when the table is first built, so a missing symbol (an NCCL older
    // than 2.14) is reported by name before any collective runs. Signatures follow nccl.h: size_t → nuint, handles →
    // nint, the unique id by value.
    private sealed class NativeApi : INcclApi
    {
        private readonly delegate* unmanaged<int*, NcclResult> _getVersion;
        private readonly delegate* unmanaged<NcclUniqueId*, NcclResult> _getUniqueId;
        private readonly delegate* unmanaged<NcclResult, nint> _getErrorString;
        private readonly delegate* unmanaged<nint, nint> _getLastError;
        private readonly delegate* unmanaged<nint*, int, NcclUniqueId, int, NcclConfig*, NcclResult> _commInitRankConfig;
        private readonly delegate* unmanaged<nint, NcclResult> _commDestroy;
        private readonly delegate* unmanaged<nint, NcclResult> _commAbort;
        private readonly delegate* unmanaged<nint, NcclResult*, NcclResult> _commGetAsyncError;
        private readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult> _allReduce;
        private readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult> _reduceScatter;
        private readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, nint, nint, NcclResult> _allGather;
        private readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, int, nint, nint, NcclResult> _broadcast;
        private readonly delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult> _send;
        private readonly delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult> _recv;
        private readonly delegate* unmanaged<NcclResult> _groupStart;
        private readonly delegate* unmanaged<NcclResult> _groupEnd;

        public NativeApi(LazyNativeLibrary lib)
        {
            _getVersion = (delegate* unmanaged<int*, NcclResult>)lib.GetExport("ncclGetVersion");
            _getUniqueId = (delegate* unmanaged<NcclUniqueId*, NcclResult>)lib.GetExport("ncclGetUniqueId");
            _getErrorString = (delegate* unmanaged<NcclResult, nint>)lib.GetExport("ncclGetErrorString");
            _getLastError = (delegate* unmanaged<nint, nint>)lib.GetExport("ncclGetLastError");
            _commInitRankConfig = (delegate* unmanaged<nint*, int, NcclUniqueId, int, NcclConfig*, NcclResult>)lib.GetExport("ncclCommInitRankConfig");
            _commDestroy = (delegate* unmanaged<nint, NcclResult>)lib.GetExport("ncclCommDestroy");
            _commAbort = (delegate* unmanaged<nint, NcclResult>)lib.GetExport("ncclCommAbort");
            _commGetAsyncError = (delegate* unmanaged<nint, NcclResult*, NcclResult>)lib.GetExport("ncclCommGetAsyncError");
            _allReduce = (delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult>)lib.GetExport("ncclAllReduce");
            _reduceScatter = (delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult>)lib.GetExport("ncclReduceScatter");
            _allGather = (delegate* unmanaged<nint, nint, nuint, NcclDataType, nint, nint, NcclResult>)lib.GetExport("ncclAllGather");
            _broadcast = (delegate* unmanaged<nint, nint, nuint, NcclDataType, int, nint, nint, NcclResult>)lib.GetExport("ncclBroadcast");
            _send = (delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult>)lib.GetExport("ncclSend");
            _recv = (delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult>)lib.GetExport("ncclRecv");
            _groupStart = (delegate* unmanaged<NcclResult>)lib.GetExport("ncclGroupStart");
            _groupEnd = (delegate* unmanaged<NcclResult>)lib.GetExport("ncclGroupEnd");
        }

        public NcclResult GetVersion(int* version) => _getVersion(version);
        public NcclResult GetUniqueId(NcclUniqueId* id) => _getUniqueId(id);
        public NcclResult CommInitRankConfig(nint* comm, int nranks, NcclUniqueId id, int rank, NcclConfig* config) => _commInitRankConfig(comm, nranks, id, rank, config);
        public NcclResult CommGetAsyncError(nint comm, NcclResult* state) => _commGetAsyncError(comm, state);
        public NcclResult CommAbort(nint comm) => _commAbort(comm);
        public NcclResult CommDestroy(nint comm) => _commDestroy(comm);
        public NcclResult AllReduce(nint send, nint recv, nuint count, NcclDataType type, NcclRedOp op, nint comm, nint stream) => _allReduce(send, recv, count, type, op, comm, stream);
        public NcclResult ReduceScatter(nint send, nint recv, nuint recvCount, NcclDataType type, NcclRedOp op, nint comm, nint stream) => _reduceScatter(send, recv, recvCount, type, op, comm, stream);
        public NcclResult AllGather(nint send, nint recv, nuint sendCount, NcclDataType type, nint comm, nint stream) => _allGather(send, recv, sendCount, type, comm, stream);
        public NcclResult Broadcast(nint send, nint recv, nuint count, NcclDataType type, int root, nint comm, nint stream) => _broadcast(send, recv, count, type, root, comm, stream);
        public NcclResult Send(nint send, nuint count, NcclDataType type, int peer, nint comm, nint stream) => _send(send, count, type, peer, comm, stream);
        public NcclResult Recv(nint recv, nuint count, NcclDataType type, int peer, nint comm, nint stream) => _recv(recv, count, type, peer, comm, stream);
        public NcclResult GroupStart() => _groupStart();
        public NcclResult GroupEnd() => _groupEnd();
        public string ErrorString(NcclResult result) => Marshal.PtrToStringUTF8(_getErrorString(result)) ?? "";
        public string LastError(nint comm) => Marshal.PtrToStringUTF8(_getLastError(comm)) ?? "";
    }
}
