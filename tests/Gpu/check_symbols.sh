#!/usr/bin/env bash
# Does a libtorch define every symbol that TorchSharp's native glue imports? TorchSharp 0.107 was built against
# libtorch 2.10; another version may lack (or have changed) some of the C++ functions it calls, and a missing
# function would only fail when first called, taking the process down. So the GPU run checks first.
#
#   tests/Gpu/check_symbols.sh <libLibTorchSharp.so> <folder of the libtorch to load> [report]
#
# The symbols checked are the glue's undefined, unversioned dynamic symbols of type U: libtorch's (libtorch exports
# no versioned symbols; versioned imports such as memcpy@GLIBC_2.14 belong to the system libraries, whose versions
# the loader checks itself; weak ones may stay undefined). They must be defined by a library the loader resolves
# for the glue with that folder first on the library path (ldd), or by a shared library in the folder. Prints (and writes to the report) the count and the list of
# missing symbols, demangled; exits 1 when any is missing, 2 when a needed library is not found.
set -euo pipefail
glue="$1"; dir="$2"; report="${3:-/dev/null}"
for tool in nm ldd c++filt; do
  command -v "$tool" >/dev/null || { echo "check_symbols: $tool is not installed (binutils / libc-bin); cannot check." | tee "$report" >&2; exit 3; }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$glue" > "$tmp/ldd" || true
if grep -q "=> not found" "$tmp/ldd"; then
  { echo "libraries the glue needs that are not found with $dir first on the library path:"; grep "=> not found" "$tmp/ldd"; } | tee "$report" >&2
  exit 2
fi
nm -D --undefined-only "$glue" | awk '$1 == "U" && $2 !~ /@/ { print $2 }' | sort -u > "$tmp/imported"
{ awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' "$tmp/ldd"; find "$dir" -maxdepth 1 -name '*.so*' -type f; } | sort -u > "$tmp/libraries"
while read -r lib; do { nm -D --defined-only "$lib" 2>/dev/null || true; } | awk 'NF >= 3 { sub(/@.*/, "", $3); print $3 }'; done < "$tmp/libraries" | sort -u > "$tmp/defined"
comm -23 "$tmp/imported" "$tmp/defined" > "$tmp/missing"
imported=$(wc -l < "$tmp/imported"); missing=$(wc -l < "$tmp/missing")
{
  echo "glue: $glue"
  echo "libtorch: $dir"
  echo "unversioned symbols the glue imports: $imported; defined by the libraries loaded: $((imported - missing)); missing: $missing"
  if [ -e "$dir/libtorch_cuda.so" ]; then
    nm -D --defined-only "$dir/libtorch_cuda.so" | grep -q ' torch_get_cuda_stream_from_pool$' \
      && echo "libtorch_cuda.so exports torch_get_cuda_stream_from_pool: yes (CUDA streams come from libtorch's pool)" \
      || echo "libtorch_cuda.so exports torch_get_cuda_stream_from_pool: no (CUDA streams are created by the driver)"
  fi
  if [ "$missing" -gt 0 ]; then echo "missing:"; c++filt < "$tmp/missing" | sed 's/^/  /'; fi
} | tee "$report"
[ "$missing" -eq 0 ]
