#!/usr/bin/env bash
# Builds the GPU bundle (docs/gpu.md): the GPU tests (an xunit v3 executable), samples/Sharding and samples/Mfu,
# published self-contained for linux-x64 into one folder, without libtorch (-p:ExternalLibTorch=true: the GPU
# machine's own is loaded), compressed. That machine has no .NET SDK and no NuGet, and at most 64 MiB of the
# working tree travels to it, so the bundle must stay under 40 MiB (checked here).
#
#   tests/Gpu/bundle.sh [output]        # default: artifacts/gpu-bundle.tar.xz (ignored by git; carried to the machine)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/artifacts/gpu-bundle.tar.xz}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
app="$work/gpu-bundle"
for project in tests/ViT22B.GpuTests samples/Sharding samples/Mfu; do
  # --artifacts-path keeps this build's restore and outputs apart from the normal build's.
  dotnet publish "$root/$project" -c Release -r linux-x64 --self-contained \
    -p:ExternalLibTorch=true -p:InvariantGlobalization=true -p:SatelliteResourceLanguages=en \
    --artifacts-path "$work/build" -o "$app" --nologo -v quiet
done
if find "$app" -name 'libtorch*' -o -name 'libc10*' | grep -q .; then
  echo "bundle: libtorch files were published; the bundle must load the machine's own" >&2
  exit 1
fi
for f in ViT22B.GpuTests Sharding Mfu; do test -x "$app/$f" || { echo "bundle: $f is missing" >&2; exit 1; }; done
test -f "$app/libLibTorchSharp.so" || { echo "bundle: libLibTorchSharp.so is missing" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
tar -C "$work" -cf - gpu-bundle | xz -9 -T0 > "$out.partial"
mv "$out.partial" "$out"
size=$(stat -c %s "$out")
limit=$((40 * 1024 * 1024))
echo "GPU bundle: $out, $(( (size + 524288) / 1048576 )) MiB ($size bytes; limit $limit)"
[ "$size" -lt "$limit" ] || { echo "bundle: over the 40 MiB limit" >&2; exit 1; }
