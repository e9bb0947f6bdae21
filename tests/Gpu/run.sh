#!/usr/bin/env bash
# The first GPU run of ViT22B as one prepared command (docs/gpu.md). For a machine with an NVIDIA GPU, Python with
# PyTorch (its libtorch under torch/lib, NCCL under nvidia/nccl/lib) and timm, but no .NET SDK: the bundle built by
# tests/Gpu/bundle.sh carries everything .NET, and this script points TorchSharp at the machine's libtorch.
#
#   tests/Gpu/run.sh [--bundle FILE] [--out DIR]          # GPU mode (step limits of 480 s in all)
#   tests/Gpu/run.sh --cpu [--bundle FILE] [--out DIR]    # CPU mode (CI): the same route, against the NuGet libtorch-cpu
#
# Steps, each with its own time limit, output in DIR/<step>.log: the symbol check (stops the run when libtorch lacks
# a symbol TorchSharp imports: TorchSharp 0.107 was built against libtorch 2.10), the GPU tests, samples/Sharding
# with ranks as threads sharing the GPU, the same with two NCCL processes sharing it (NCCL >= 2.30), samples/Mfu in
# bf16 for the sequential and parallel models against the same run's bf16 GEMM, and benchmarks/pytorch/blocks.py
# timing the same models in PyTorch. DIR/summary.md and DIR/summary.json collect everything. Exit status 0 when every
# step that ran passed. DIR defaults to $OUT (the device tool's output folder) or artifacts/gpu-run.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bundle="$root/artifacts/gpu-bundle.tar.xz"
out="${OUT:-$root/artifacts/gpu-run}"
mode=gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --cpu) mode=cpu; shift ;;
    *) echo "run.sh: unknown argument '$1' (use --bundle FILE, --out DIR, --cpu)" >&2; exit 2 ;;
  esac
done
[ -f "$bundle" ] || { echo "run.sh: no bundle at $bundle (build it with tests/Gpu/bundle.sh)" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: > "$out/steps.tsv"
echo "mode	$mode" > "$out/environment.txt"

tar -xJf "$bundle" -C "$work" || { echo "run.sh: cannot unpack $bundle" >&2; exit 2; }
app="$work/gpu-bundle"

# Where libtorch (and NCCL) come from.
nccllib=""
if [ "$mode" = gpu ]; then
  torchlib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
    || { echo "run.sh: python3 cannot import torch" >&2; exit 2; }
  nccllib="$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)"
  python3 - >> "$out/environment.txt" 2>&1 <<'PY'
import torch
print(f"torch\t{torch.__version__}\ncuda\t{torch.version.cuda}")
print(f"gpu\t{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
try:
    v = torch.cuda.nccl.version()
    print("nccl\t" + (".".join(map(str, v)) if isinstance(v, tuple) else str(v)))
except Exception as e:
    print(f"nccl\tunknown ({e})")
PY
  nvidia-smi -L >> "$out/environment.txt" 2>&1 || true
else
  torchlib="${VIT22B_LIBTORCH_DIR:-${NUGET_PACKAGES:-$HOME/.nuget/packages}/libtorch-cpu-linux-x64/2.10.0/runtimes/linux-x64/native}"
fi
echo "libtorch	$torchlib" >> "$out/environment.txt"
echo "nccl_lib	${nccllib:-none}" >> "$out/environment.txt"
export LD_LIBRARY_PATH="$torchlib${nccllib:+:$nccllib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -n "$nccllib" ] && export VIT22B_NCCL_PATH="$nccllib/libnccl.so.2"
export VIT22B_EXPECT_LIBTORCH_DIR="$torchlib"          # LibtorchRouteTests checks that this one got loaded
export NUGET_PACKAGES="$work/no-nuget-cache"            # so TorchSharp cannot fall back to a NuGet cache's libtorch
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 PYTHONUNBUFFERED=1

# step NAME LIMIT_SECONDS COMMAND...: runs it with its own time limit, logs to $out/NAME.log, records the result.
step() {
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit} s)"
  local start end rc
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN { printf \"%.1f\", $end - $start }")" "$limit" "" >> "$out/steps.tsv"
  tail -n 4 "$out/$name.log"
  return $rc
}
skip() { printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >> "$out/steps.tsv"; echo "== $1 skipped: $2"; }
summary() { python3 "$root/tests/Gpu/summary.py" "$out" || echo "run.sh: summary.py failed" >&2; }

if ! step symbols 45 bash "$root/tests/Gpu/check_symbols.sh" "$app/libLibTorchSharp.so" "$torchlib" "$out/symbols.txt"; then
  echo "run.sh: stopping: this libtorch does not define what TorchSharp's glue imports (see $out/symbols.txt)" >&2
  summary
  exit 1
fi

if [ "$mode" = gpu ]; then
  # The limits add up to 480 s, so that the run, with the unpacking and the 10 s a step may take to be killed, fits
  # one 600-s device call.
  step gpu-tests 135 "$app/ViT22B.GpuTests" -parallel none -xml "$out/gpu-tests.xml"
  step sharding-threads 60 "$app/Sharding" --device cuda --data 1 --model 2
  nccl_ok="$(python3 -c 'import torch; v = torch.cuda.nccl.version(); v = v if isinstance(v, tuple) else (v // 10000, v // 100 % 100); print(int(v >= (2, 30)))' 2>/dev/null || echo 0)"
  if [ "$nccl_ok" = 1 ]; then
    step sharding-nccl 75 env NCCL_MULTI_RANK_GPU_ENABLE=1 "$app/Sharding" launch 2 --nccl --data 1 --model 2
  else
    skip sharding-nccl "two NCCL ranks on one GPU need NCCL >= 2.30 with NCCL_MULTI_RANK_GPU_ENABLE=1; this PyTorch's NCCL is older"
  fi
  step mfu 110 "$app/Mfu" --preset B/16 --block both --mode forward-backward --dtype bfloat16 --device cuda \
    --batch-size 64 --samples 10 --warmup 3 --json "$out/mfu.json"
  step pytorch 55 python3 "$root/benchmarks/pytorch/blocks.py" --preset B/16 --batch-size 64 --mode forward-backward \
    --dtype bfloat16 --device cuda --samples 10 --warmup 3 --json "$out/pytorch.json"
else
  step gpu-tests 150 "$app/ViT22B.GpuTests" -parallel none -xml "$out/gpu-tests.xml"
  step sharding-threads 120 "$app/Sharding" --data 2 --model 2
  step sharding-launch 90 "$app/Sharding" launch 3
  step mfu 120 "$app/Mfu" --preset Ti/16 --block both --mode forward-backward --dtype float32 --batch-size 2 \
    --samples 2 --warmup 1 --json "$out/mfu.json"
  if python3 -c 'import torch, timm' 2>/dev/null; then
    step pytorch 120 python3 "$root/benchmarks/pytorch/blocks.py" --preset Ti/16 --batch-size 2 --mode forward-backward \
      --dtype float32 --device cpu --samples 2 --warmup 1 --json "$out/pytorch.json"
  else
    skip pytorch "PyTorch and timm are not installed on this machine"
  fi
fi
summary
awk -F'\t' '$2 != "0" && $2 != "skipped" { bad = 1 } END { exit bad }' "$out/steps.tsv"
