using System.Reflection;
using ViT22B.Cuda;
using ViT22B.Parallel;
using ViT22B.Tests.Fakes;
using Xunit.Sdk;

namespace ViT22B.Tests.Parallel;

/// <summary>The communicator backends the sharded-model tests run on.</summary>
public enum Backend
{
    /// <summary><see cref="ThreadedCommunicator"/>: the in-process backend.</summary>
    Threaded,
    /// <summary><see cref="NcclCommunicator"/> (the library's NCCL code, unchanged) over <see cref="NcclStandIn"/>.</summary>
    NcclStandIn,
}

/// <summary>Runs one body per rank of a mesh on a backend; each rank is a thread with its own device.</summary>
internal static class Backends
{
    public static readonly Backend[] All = { Backend.Threaded, Backend.NcclStandIn };

    /// <summary>
    /// Runs <paramref name="body"/> for every rank of <paramref name="mesh"/> and returns the results by rank.
    /// Threaded: a <see cref="ThreadedWorld"/> (a failing rank poisons the world). NCCL stand-in: rank r is "GPU" r;
    /// rank 0's ids are handed to every rank as the rendezvous would; every rank initializes its communicators on its own
    /// thread and disposes them at the end; a failing rank leaves its peers to their timeout, as NCCL does. After the
    /// run the stand-in must have seen no violation of NCCL's rules.
    /// </summary>
    public static T[] Run<T>(Backend backend, DeviceMesh mesh, Func<RankContext, T> body, TimeSpan? timeout = null,
        Func<int, TimeSpan>? delay = null, NcclStandIn? standIn = null)
    {
        var limit = timeout ?? TimeSpan.FromSeconds(60);
        if (backend == Backend.Threaded)
        {
            var world = new ThreadedWorld(mesh.WorldSize, limit, delay);
            var contexts = RankContext.CreateThreaded(world, mesh);
            return Spmd.Run(world, r => body(contexts[r]));
        }
        var nccl = standIn ?? new NcclStandIn(deviceCount: mesh.WorldSize, delay: delay);
        try
        {
            var payload = NcclCommunicator.NewGroupIds(nccl, mesh);
            return Spmd.Run(mesh.WorldSize, r =>
            {
                var ctx = NcclCommunicator.InitRankContext(nccl, nccl, mesh, r, device: r, payload, limit);
                try
                {
                    return body(ctx);
                }
                finally
                {
                    ctx.Dispose();
                }
            });
        }
        finally
        {
            nccl.AssertClean();
            if (standIn is null) nccl.Dispose();
        }
    }

    /// <summary>One communicator group of <paramref name="k"/> ranks (the model axis of a 1 × k mesh).</summary>
    public static T[] RunGroup<T>(Backend backend, int k, Func<ICommunicator, T> body, TimeSpan? timeout = null,
        Func<int, TimeSpan>? delay = null, NcclStandIn? standIn = null) =>
        Run(backend, new DeviceMesh(1, k), ctx => body(ctx.Model), timeout, delay, standIn);
}

/// <summary>
/// One case of a sharded-model test, run on every <see cref="Backend"/>: the backend is passed first, then
/// <paramref name="data"/>. Sharded-model tests that communicate take their cases through this attribute only, so that
/// none runs on the in-process backend alone (tests that only load per-rank checkpoints, issuing no collective, build
/// in-process ranks directly).
/// </summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = true)]
public sealed class OnEveryBackendAttribute(params object[] data) : DataAttribute
{
    public override IEnumerable<object[]> GetData(MethodInfo testMethod) =>
        Backends.All.Select(b => new object[] { b }.Concat(data).ToArray());
}
