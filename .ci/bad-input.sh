#!/usr/bin/env bash
# Every sample meets bad input with a clear message and exit code 1, never an unhandled-exception trace (an option
# error: System.CommandLine's message and the help; anything found while running: one error: line).
# Usage: .ci/bad-input.sh (after `dotnet build -c Release`). Runs every case, then fails if any case failed.
set -uo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0

# expect_error [-m SUBSTRING] <sample> <args...>: must exit with code 1, print no stack-trace line ("   at ..."), no
# "Unhandled exception" and no "unexpected <Type>:" (SampleMain's mark of an exception it does not count as bad input),
# and, with -m, say SUBSTRING. Exit code 1 is the samples' only bad-input code by design: SampleMain returns 1 for an
# exception from an action, and System.CommandLine returns 1 for a parse error (a validator, an unknown option, a missing
# required one). Any other code (0, a native crash's 134 or 139, Sharding's 2 for a sharded model that does not match
# the unsharded one) fails the case.
expect_error() {
  local want=""
  if [ "$1" = "-m" ]; then want="$2"; shift 2; fi
  local sample="$1"; shift
  local out rc
  out="$(dotnet run --project "samples/$sample" -c Release --no-build -- "$@" 2>&1)"; rc=$?
  if [ "$rc" -ne 1 ]; then
    echo "FAIL ($sample $*): exit code $rc, expected 1:"; head -5 <<<"$out"; failures=$((failures + 1))
  elif grep -qE '^\s+at |Unhandled exception|unexpected [A-Za-z.]+(Exception|Error):' <<<"$out"; then
    echo "FAIL ($sample $*): printed a trace or an unexpected exception:"; head -5 <<<"$out"; failures=$((failures + 1))
  elif [ -n "$want" ] && ! grep -qF -- "$want" <<<"$out"; then
    echo "FAIL ($sample $*): the message does not say '$want':"; head -5 <<<"$out"; failures=$((failures + 1))
  else
    echo "ok   ($sample $*): $(grep -m1 -iE 'error|must|required|not' <<<"$out" || head -1 <<<"$out")"
  fi
}

# Bad image files in an otherwise good folder (the bundled images beside them) each get named.
mkdir -p "$work/empty" "$work/truncated" "$work/corrupt" "$work/oversized"
: > "$work/empty/empty.jpg"
head -c 2000 samples/images/chelsea.jpg > "$work/truncated/truncated.jpg"
head -c 4096 /dev/urandom > "$work/corrupt/corrupt.png"
cp .ci/bad-input/oversized.png "$work/oversized/"
declare -A bad_file=([empty]=empty.jpg [truncated]=truncated.jpg [corrupt]=corrupt.png [oversized]=oversized.png)
for kind in empty truncated corrupt oversized; do
  cp samples/images/*.jpg "$work/$kind/"
  expect_error -m "${bad_file[$kind]}" Features --config Ti/16 --input "$work/$kind" --output "$work/o.safetensors"
  expect_error -m "${bad_file[$kind]}" Classify --checkpoint samples/models/fashion-mnist-vit.safetensors --labels samples/models/fashion-mnist-vit.labels.txt "$work/$kind"
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
# Classify: a checkpoint of another layout (written by Features --save-weights, config in its metadata) without a
# classifier, and --config beside a training checkpoint, which stores its own.
printf '{"img_size":32,"patch_size":16,"embed_dim":64,"depth":1,"num_heads":2,"mlp_dim":128,"num_classes":0}' > "$work/headless.json"
dotnet run --project samples/Features -c Release --no-build -- --config "$work/headless.json" --input samples/images \
  --output "$work/h.safetensors" --save-weights "$work/headless.safetensors" > /dev/null \
  || { echo "FAIL (setup): Features could not write a checkpoint without a classifier"; failures=$((failures + 1)); }
expect_error -m "no classifier" Classify --checkpoint "$work/headless.safetensors" --labels samples/models/fashion-mnist-vit.labels.txt samples/images
expect_error -m "--config" Classify --config Ti/16 --checkpoint samples/models/fashion-mnist-vit.safetensors --labels samples/models/fashion-mnist-vit.labels.txt samples/images
# Features --num-classes: a negative count, and a classifier the checkpoint lacks without --reset-head.
expect_error -m "--num-classes" Features --config Ti/16 --num-classes -1 --input samples/images --output "$work/o.safetensors"
expect_error -m "classifier differs" Features --config "$work/headless.json" --weights "$work/headless.safetensors" --num-classes 10 \
  --input samples/images --output "$work/o.safetensors"
expect_error LinearProbe --checkpoint /nonexistent.safetensors
expect_error Mfu --preset nonsense
# ONNX: a truncated export, a file that is not ONNX, a bad backend or weight type, a training mode on ONNX Runtime.
head -c 3000 samples/models/fashion-mnist-vit.safetensors > "$work/truncated.onnx"
expect_error Classify --backend onnx --checkpoint "$work/truncated.onnx" --labels samples/models/fashion-mnist-vit.labels.txt samples/images
expect_error Classify --backend onnx --checkpoint samples/models/fashion-mnist-vit.safetensors --labels samples/models/fashion-mnist-vit.labels.txt samples/images
expect_error Classify --backend tensorflow --checkpoint samples/models/fashion-mnist-vit.safetensors --labels samples/models/fashion-mnist-vit.labels.txt samples/images
expect_error ExportOnnx --checkpoint samples/models/fashion-mnist-vit.safetensors --output "$work/m.onnx" --weights int4
expect_error ExportOnnx --checkpoint /nonexistent.safetensors --output "$work/m.onnx"
expect_error ExportOnnx --checkpoint "$work/bad.safetensors" --output "$work/m.onnx"
expect_error Features --config Ti/16 --input samples/images --output "$work/o.safetensors" --backend onnx --layers 2
expect_error Mfu --preset Ti/16 --backend onnx --mode training
expect_error Mfu --preset Ti/16 --batch-size 0
expect_error -m "--peak-tflops" Mfu --preset Ti/16 --peak-tflops 0
expect_error -m "--peak-tflops" Mfu --preset Ti/16 --peak-tflops -1
expect_error -m "--peak-tflops" TrainFashionMnist --peak-tflops 0
expect_error Quickstart --preset nonsense
expect_error Quickstart --images /nonexistent
expect_error QkNormStability --data /nonexistent
expect_error Sharding --data 0
expect_error Sharding launch 0

# Errors inside the ranks of a threaded run are named like any other (each rank's own message, not "unexpected").
expect_error -m "names block 4" Sharding --checkpointing blocks:4
# --device is checked while parsing.
expect_error -m "--device" Mfu --preset Ti/16 --device vulkan
expect_error -m "--device" Features --config Ti/16 --device gpu --input samples/images --output "$work/o.safetensors"
# Output folders are checked before the work starts (nothing is written), and an output is never one of the inputs.
rm -f "$work/o2.safetensors"
expect_error -m "does not exist" Features --config Ti/16 --input samples/images --output "$work/o2.safetensors" --save-weights /nonexistent/w.safetensors
if [ -e "$work/o2.safetensors" ]; then echo "FAIL (Features): wrote --output before finding --save-weights unwritable"; failures=$((failures + 1)); fi
expect_error -m "--csv" Mfu --preset Ti/16 --csv /nonexistent/m.csv
cp samples/models/fashion-mnist-vit.safetensors "$work/existing.safetensors"
expect_error -m "also an input" ExportOnnx --checkpoint "$work/existing.safetensors" --output "$work/existing.safetensors"
# TrainFashionMnist never replaces an existing checkpoint without --resume (before reading the dataset or writing anything).
expect_error -m "--resume" TrainFashionMnist --epochs 1 --train-limit 10 --test-limit 10 --checkpoint "$work/existing.safetensors"
if ! cmp -s samples/models/fashion-mnist-vit.safetensors "$work/existing.safetensors"; then
  echo "FAIL (TrainFashionMnist): the existing checkpoint was changed"; failures=$((failures + 1))
fi
if [ -e "$work/existing.labels.txt" ]; then echo "FAIL (TrainFashionMnist): wrote its labels before refusing"; failures=$((failures + 1)); fi
# Classify: a folder without images among other inputs is named, not skipped.
mkdir -p "$work/noimages"
expect_error -m "noimages" Classify --checkpoint samples/models/fashion-mnist-vit.safetensors --labels samples/models/fashion-mnist-vit.labels.txt \
  samples/images/chelsea.jpg "$work/noimages"
# ExportOnnx takes a checkpoint that stores its config (Features --save-weights) without --config, as Classify does.
dotnet run --project samples/ExportOnnx -c Release --no-build -- --checkpoint "$work/headless.safetensors" --output "$work/headless.onnx" > /dev/null \
  && test -s "$work/headless.onnx" \
  || { echo "FAIL (ExportOnnx): could not export a checkpoint that stores its config"; failures=$((failures + 1)); }

if [ "$failures" -gt 0 ]; then
  echo "$failures bad-input case(s) failed"
  exit 1
fi
echo "all bad-input cases gave one clear error"
