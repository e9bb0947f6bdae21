#!/usr/bin/env bash
# Every sample meets bad input with one clear line and a non-zero exit code, never an unhandled-exception trace.
# Usage: .ci/bad-input.sh (after `dotnet build -c Release`). Fails on the first case that exits 0 or prints a trace.
set -uo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0

# expect_error <sample> <args...>: must exit non-zero, say "error" (System.CommandLine's parse errors name the option
# instead) and print no stack-trace line ("   at ...") and no "Unhandled exception".
expect_error() {
  local sample="$1"; shift
  local out rc
  out="$(dotnet run --project "samples/$sample" -c Release --no-build -- "$@" 2>&1)"; rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "FAIL ($sample $*): exit code 0"; failures=$((failures + 1))
  elif grep -qE '^\s+at |Unhandled exception' <<<"$out"; then
    echo "FAIL ($sample $*): printed a trace:"; head -5 <<<"$out"; failures=$((failures + 1))
  else
    echo "ok   ($sample $*): $(grep -m1 -iE 'error|must|required|not' <<<"$out" || head -1 <<<"$out")"
  fi
}

# Bad image files in an otherwise good folder each get named.
mkdir -p "$work/empty" "$work/truncated" "$work/corrupt" "$work/oversized"
: > "$work/empty/empty.jpg"
head -c 2000 samples/images/chelsea.jpg > "$work/truncated/truncated.jpg"
head -c 4096 /dev/urandom > "$work/corrupt/corrupt.png"
cp .ci/bad-input/oversized.png "$work/oversized/"
for kind in empty truncated corrupt oversized; do
  expect_error Features --config Ti/16 --input "$work/$kind" --output "$work/o.safetensors"
done
expect_error Features --config Ti/16 --input /nonexistent --output "$work/o.safetensors"
expect_error Features --config nonsense --input samples/images --output "$work/o.safetensors"
expect_error Features --config Ti/16 --weights /nonexistent.safetensors --input samples/images --output "$work/o.safetensors"
printf 'not a checkpoint' > "$work/bad.safetensors"
expect_error Features --config Ti/16 --weights "$work/bad.safetensors" --input samples/images --output "$work/o.safetensors"
printf 'PK' > "$work/bad.npz"
expect_error Features --config Ti/16 --weights "$work/bad.npz" --input samples/images --output "$work/o.safetensors"
expect_error Features --config Ti/16 --batch-size 0 --input samples/images --output "$work/o.safetensors"
expect_error Features --config Ti/16 --img-size 0 --input samples/images --output "$work/o.safetensors"
expect_error Features --config Ti/16 --layers x --input samples/images --output "$work/o.safetensors"
expect_error Features --config Ti/16 --layers 99 --input samples/images --output "$work/o.safetensors"

# TrainFashionMnist's options and a missing dataset.
expect_error TrainFashionMnist --epochs 0
expect_error TrainFashionMnist --batch-size 0
expect_error TrainFashionMnist --data /nonexistent
expect_error TrainFashionMnist --patch 5
expect_error TrainFashionMnist --width 130 --heads 4 --epochs 1 --train-limit 10 --test-limit 10 --checkpoint "$work/fm.safetensors"
expect_error TrainFashionMnist --lr -1
expect_error TrainFashionMnist --checkpointing every:0 --epochs 1 --train-limit 10 --test-limit 10 --checkpoint "$work/fm.safetensors"
expect_error Mfu --preset Ti/16 --mode training --checkpointing blocks:12
expect_error Streaming --model 5
expect_error Streaming --preset S/16 --depth 0
expect_error Streaming --preset S/16 --dtype int8
expect_error Sharding --checkpointing every:x

expect_error Classify --checkpoint /nonexistent.safetensors --labels /nonexistent.txt samples/images
expect_error Classify --checkpoint "$work/bad.safetensors" --labels /nonexistent.txt --top-k 0 samples/images
expect_error LinearProbe --checkpoint /nonexistent.safetensors
expect_error Mfu --preset nonsense
# ONNX: a truncated export, a file that is not ONNX, a bad backend or weight type, a training mode on ONNX Runtime.
head -c 3000 fashion-mnist-vit.safetensors > "$work/truncated.onnx"
expect_error Classify --backend onnx --checkpoint "$work/truncated.onnx" --labels fashion-mnist-vit.labels.txt samples/images
expect_error Classify --backend onnx --checkpoint fashion-mnist-vit.safetensors --labels fashion-mnist-vit.labels.txt samples/images
expect_error Classify --backend tensorflow --checkpoint fashion-mnist-vit.safetensors --labels fashion-mnist-vit.labels.txt samples/images
expect_error ExportOnnx --checkpoint fashion-mnist-vit.safetensors --output "$work/m.onnx" --weights int4
expect_error ExportOnnx --checkpoint /nonexistent.safetensors --output "$work/m.onnx"
expect_error ExportOnnx --checkpoint "$work/bad.safetensors" --output "$work/m.onnx"
expect_error Features --config Ti/16 --input samples/images --output "$work/o.safetensors" --backend onnx --layers 2
expect_error Mfu --preset Ti/16 --backend onnx --mode training
expect_error Mfu --preset Ti/16 --batch-size 0
expect_error Quickstart --preset nonsense
expect_error Quickstart --images /nonexistent
expect_error QkNormStability --data /nonexistent
expect_error Sharding --data 0
expect_error Sharding launch 0

if [ "$failures" -gt 0 ]; then
  echo "$failures bad-input case(s) failed"
  exit 1
fi
echo "all bad-input cases gave one clear error"
