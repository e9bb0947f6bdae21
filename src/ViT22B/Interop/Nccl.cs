using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace ViT22B.Interop;

/// <summary><c>ncclResult_t</c> (nccl.h 2.30).</summary>
public enum NcclResult
{
    /// <summary>ncclSuccess.</summary>
    Success = 0,
    /// <summary>ncclUnhandledCudaError (fatal).</summary>
    UnhandledCudaError = 1,
    /// <summary>ncclSystemError (fatal).</summary>
    SystemError = 2,
    /// <summary>ncclInternalError (fatal).</summary>
    InternalError = 3,
    /// <summary>ncclInvalidArgument: the call had no effect.</summary>
    InvalidArgument = 4,
    /// <summary>ncclInvalidUsage (fatal).</summary>
    InvalidUsage = 5,
    /// <summary>ncclRemoteError: a peer failed.</summary>
    RemoteError = 6,
    /// <summary>ncclInProgress: a non-blocking operation has not finished.</summary>
    InProgress = 7,
    /// <summary>ncclTimeout (new in 2.30).</summary>
    Timeout = 8,
}

/// <summary><c>ncclDataType_t</c>.</summary>
public enum NcclDataType
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
public enum NcclRedOp
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
public unsafe struct NcclUniqueId
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

/// <summary>
/// NCCL (<c>libnccl.so.2</c>, version ≥ 2.10) through function pointers resolved on first use: nothing loads until a
/// member that calls NCCL runs, so a CPU-only machine never opens the library. The path can be set with the
/// environment variable <c>VIT22B_NCCL_PATH</c> (a file); otherwise the loader's search path is used.
/// </summary>
public static unsafe class Nccl
{
    /// <summary>Environment variable naming the NCCL library file to load instead of the search path's.</summary>
    public const string PathVariable = "VIT22B_NCCL_PATH";

    /// <summary>The library (loaded on first use).</summary>
    public static readonly LazyNativeLibrary Library = new("libnccl.so.2",
        (Environment.GetEnvironmentVariable(PathVariable) is { Length: > 0 } p ? new[] { p } : Array.Empty<string>()).Concat(new[] { "libnccl.so.2", "libnccl.so" }).ToArray(),
        $"Install NCCL ≥ 2.10 (NVIDIA's libnccl2 package or the nvidia-nccl-cu12 wheel) and put it on the library path, or set {PathVariable} to the file.");

    private static readonly Lazy<Functions> Api = new(() => new Functions(Library), LazyThreadSafetyMode.ExecutionAndPublication);

    /// <summary>Whether a code requires aborting the communicator (everything but success, invalid argument,
    /// in-progress).</summary>
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

    /// <summary>Throws <see cref="NcclException"/> (with NCCL's own error string) unless <paramref name="result"/> is success.</summary>
    public static void Check(NcclResult result, string operation)
    {
        if (result == NcclResult.Success) return;
        string detail = Library.IsLoaded ? ErrorString(result) : "";
        throw new NcclException(operation, result, detail);
    }

    /// <summary>NCCL's text for a result code.</summary>
    public static string ErrorString(NcclResult result) => Marshal.PtrToStringUTF8(Api.Value.GetErrorString(result)) ?? "";

    /// <summary>The library version as NCCL encodes it (e.g. 23007 for 2.30.7).</summary>
    public static int Version()
    {
        int v;
        Check(Api.Value.GetVersion(&v), "ncclGetVersion");
        return v;
    }

    /// <summary>A new unique id (on rank 0; hand it to the others, e.g. with <see cref="ViT22B.Parallel.Rendezvous"/>).</summary>
    public static NcclUniqueId GetUniqueId()
    {
        NcclUniqueId id;
        Check(Api.Value.GetUniqueId(&id), "ncclGetUniqueId");
        return id;
    }

    internal static Functions F => Api.Value;

    // The function table; each pointer is resolved when the table is first built, so a missing symbol is reported by
    // name before any collective runs. Signatures follow nccl.h (PARALLEL.md §2): size_t → nuint, handles → nint,
    // the unique id by value.
    internal sealed class Functions
    {
        public readonly delegate* unmanaged<int*, NcclResult> GetVersion;
        public readonly delegate* unmanaged<NcclUniqueId*, NcclResult> GetUniqueId;
        public readonly delegate* unmanaged<NcclResult, nint> GetErrorString;
        public readonly delegate* unmanaged<nint*, int, NcclUniqueId, int, NcclResult> CommInitRank;
        public readonly delegate* unmanaged<nint*, int, int*, NcclResult> CommInitAll;
        public readonly delegate* unmanaged<nint, NcclResult> CommDestroy;
        public readonly delegate* unmanaged<nint, NcclResult> CommAbort;
        public readonly delegate* unmanaged<nint, NcclResult*, NcclResult> CommGetAsyncError;
        public readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult> AllReduce;
        public readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult> ReduceScatter;
        public readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, nint, nint, NcclResult> AllGather;
        public readonly delegate* unmanaged<nint, nint, nuint, NcclDataType, int, nint, nint, NcclResult> Broadcast;
        public readonly delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult> Send;
        public readonly delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult> Recv;
        public readonly delegate* unmanaged<NcclResult> GroupStart;
        public readonly delegate* unmanaged<NcclResult> GroupEnd;

        public Functions(LazyNativeLibrary lib)
        {
            GetVersion = (delegate* unmanaged<int*, NcclResult>)lib.GetExport("ncclGetVersion");
            GetUniqueId = (delegate* unmanaged<NcclUniqueId*, NcclResult>)lib.GetExport("ncclGetUniqueId");
            GetErrorString = (delegate* unmanaged<NcclResult, nint>)lib.GetExport("ncclGetErrorString");
            CommInitRank = (delegate* unmanaged<nint*, int, NcclUniqueId, int, NcclResult>)lib.GetExport("ncclCommInitRank");
            CommInitAll = (delegate* unmanaged<nint*, int, int*, NcclResult>)lib.GetExport("ncclCommInitAll");
            CommDestroy = (delegate* unmanaged<nint, NcclResult>)lib.GetExport("ncclCommDestroy");
            CommAbort = (delegate* unmanaged<nint, NcclResult>)lib.GetExport("ncclCommAbort");
            CommGetAsyncError = (delegate* unmanaged<nint, NcclResult*, NcclResult>)lib.GetExport("ncclCommGetAsyncError");
            AllReduce = (delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult>)lib.GetExport("ncclAllReduce");
            ReduceScatter = (delegate* unmanaged<nint, nint, nuint, NcclDataType, NcclRedOp, nint, nint, NcclResult>)lib.GetExport("ncclReduceScatter");
            AllGather = (delegate* unmanaged<nint, nint, nuint, NcclDataType, nint, nint, NcclResult>)lib.GetExport("ncclAllGather");
            Broadcast = (delegate* unmanaged<nint, nint, nuint, NcclDataType, int, nint, nint, NcclResult>)lib.GetExport("ncclBroadcast");
            Send = (delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult>)lib.GetExport("ncclSend");
            Recv = (delegate* unmanaged<nint, nuint, NcclDataType, int, nint, nint, NcclResult>)lib.GetExport("ncclRecv");
            GroupStart = (delegate* unmanaged<NcclResult>)lib.GetExport("ncclGroupStart");
            GroupEnd = (delegate* unmanaged<NcclResult>)lib.GetExport("ncclGroupEnd");
        }
    }
}
