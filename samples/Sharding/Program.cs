// Sharding: a ViT-22B-style model split over a data × model mesh, checked against the unsharded model. Three ways to
// run it, one file each:
//
//   Threads.cs          one process, every rank a thread (CPU, or GPUs with --device cuda)
//     dotnet run --project samples/Sharding -c Release
//     dotnet run --project samples/Sharding -c Release -- --data 1 --model 4 --mode plain
//     dotnet run --project samples/Sharding -c Release -- --device cuda --data 1 --model 2
//   OneProcessPerGpu.cs this process is one NCCL rank (torchrun variables; started by `launch`, torchrun or a scheduler)
//     dotnet run --project samples/Sharding -c Release -- nccl --data 1 --model 8
//   Launcher.cs         start N local processes with the torchrun variables
//     dotnet run --project samples/Sharding -c Release -- launch 3                                 # rendezvous check
//     dotnet run --project samples/Sharding -c Release -- launch 8 --nccl --data 1 --model 8       # 8 GPUs, NCCL
//
// RankCheck.cs holds what every mode shares: the small model, the unsharded reference and one rank's check.
using System.CommandLine;
using ViT22B.Parallel;

var data = new Option<int>("--data") { Description = "Data-parallel axis size.", DefaultValueFactory = _ => 2 }.AtLeast(1);
var model = new Option<int>("--model") { Description = "Tensor-parallel (model) axis size; must divide the heads and the MLP size.", DefaultValueFactory = _ => 2 }.AtLeast(1);
var mode = new Option<CommMode>("--mode") { Description = "Overlapped (ring loops) or Plain (collective, then matmul).", DefaultValueFactory = _ => CommMode.Overlapped };
var fsdp = new Option<bool>("--fsdp") { Description = "Also shard the block weights over the data axis (ZeRO-3)." };
var batch = new Option<int>("--batch-size") { Description = "Global batch (split over the data axis).", DefaultValueFactory = _ => 4 }.AtLeast(1);
var device = new Option<string>("--device") { Description = "cpu, or cuda (rank r on GPU r mod the GPU count; ranks sharing a GPU check the forward pass only).", DefaultValueFactory = _ => "cpu" };
var recompute = new Option<string>("--checkpointing") { Description = "Blocks that recompute their activations (and their collectives) in backward: none, all, every:N or blocks:I,J,…", DefaultValueFactory = _ => "none" };
MeshArgs Mesh(ParseResult p) => new(p.GetValue(data), p.GetValue(model), p.GetValue(mode), p.GetValue(fsdp), p.GetValue(batch),
    ViT22B.Layers.ActivationCheckpointing.Parse(p.GetValue(recompute)!));

var root = new RootCommand("Run a ViT-22B-style model on a mesh of threads and check it against the unsharded model.")
{
    data, model, mode, fsdp, batch, device, recompute,
};
// Errors a user can cause (a mesh that does not fit, a missing GPU or library, a peer that fails) print one line with
// exit code 1 through SampleMain.
root.SetAction(p => Threads.Run(Mesh(p), p.GetValue(device) ?? "cpu"));

var nccl = new Command("nccl", "Run this process's rank of the mesh on its GPU through NCCL (torchrun variables).") { data, model, mode, fsdp, batch, recompute };
nccl.SetAction(p => OneProcessPerGpu.Run(Mesh(p)));
root.Subcommands.Add(nccl);

var processes = new Argument<int>("processes") { Description = "How many local processes to start." };
var ncclWorkers = new Option<bool>("--nccl") { Description = "Each process runs `nccl` (one per GPU); otherwise each runs `rendezvous-check`." };
var launch = new Command("launch", "Start local processes with the torchrun variables and report each one's outcome.") { processes, ncclWorkers, data, model, mode, fsdp, batch, recompute };
launch.SetAction(p => Launcher.Run(p.GetValue(processes), p.GetValue(ncclWorkers) ? Mesh(p) : null));
root.Subcommands.Add(launch);

var check = new Command("rendezvous-check", "Worker: read the torchrun variables, receive a 128-byte id from rank 0 over TCP, print its checksum.");
check.SetAction(_ => Launcher.RendezvousWorker());
root.Subcommands.Add(check);

return SampleMain.Invoke(root, args);
