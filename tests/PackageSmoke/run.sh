#!/usr/bin/env bash
# Packs ViT22B (and ViT22B.Onnx, ViT22B.OnnxRuntime, ViT22B.Imaging), then builds and runs a console app in a temporary folder that references the package from a
# local feed (plus libtorch-cpu-linux-x64), as a user would. Proves the package carries everything, including
# the libstdc++ compatibility step for GCC 12 distributions (Debian 12, Ubuntu 22.04).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
version="0.1.0-smoke.$(date +%s)"
cleanup() {
  rm -rf "$work"
  # The unique smoke version was extracted into the package cache by restore; drop it again.
  rm -rf "${NUGET_PACKAGES:-$HOME/.nuget/packages}/vit22b/$version" "${NUGET_PACKAGES:-$HOME/.nuget/packages}/vit22b.onnxruntime/$version" \
    "${NUGET_PACKAGES:-$HOME/.nuget/packages}/vit22b.onnx/$version" "${NUGET_PACKAGES:-$HOME/.nuget/packages}/vit22b.imaging/$version"
}
trap cleanup EXIT

dotnet pack "$root/src/ViT22B/ViT22B.csproj" -c Release -o "$work/feed" -p:Version="$version" --nologo -v quiet
dotnet pack "$root/src/ViT22B.OnnxRuntime/ViT22B.OnnxRuntime.csproj" -c Release -o "$work/feed" -p:Version="$version" --nologo -v quiet
dotnet pack "$root/src/ViT22B.Onnx/ViT22B.Onnx.csproj" -c Release -o "$work/feed" -p:Version="$version" --nologo -v quiet
dotnet pack "$root/src/ViT22B.Imaging/ViT22B.Imaging.csproj" -c Release -o "$work/feed" -p:Version="$version" --nologo -v quiet
ls "$work/feed"
command -v unzip >/dev/null || { echo "package smoke test: needs unzip to read the packages (apt-get install unzip)" >&2; exit 1; }
# The listing goes to a file first: with pipefail, grep -q closing the pipe early would fail unzip (SIGPIPE).
unzip -l "$work/feed/ViT22B.$version.nupkg" > "$work/ViT22B.listing"
grep -q "buildTransitive/ViT22B.targets" "$work/ViT22B.listing" \
  || { echo "package lacks buildTransitive/ViT22B.targets" >&2; exit 1; }
# ViT22B.Onnx and ViT22B.Imaging use ViT22B's internals: each must depend on exactly its own ViT22B version.
for companion in ViT22B.Onnx ViT22B.Imaging; do
  unzip -p "$work/feed/$companion.$version.nupkg" "$companion.nuspec" > "$work/$companion.nuspec"
  grep -q "<dependency id=\"ViT22B\" version=\"\[$version\]\"" "$work/$companion.nuspec" \
    || { echo "$companion does not depend on exactly ViT22B $version:" >&2; grep dependency "$work/$companion.nuspec" >&2; exit 1; }
done
cache_lib="${NUGET_PACKAGES:-$HOME/.nuget/packages}/torchsharp/0.107.0/runtimes/linux-x64/native/libLibTorchSharp.so"
cache_sum_before="$(sha256sum "$cache_lib" 2>/dev/null || true)"

# console_app <folder> <name> <source> <package reference>...: a net10.0 console app that restores from the local feed.
console_app() {
  local dir="$1" name="$2" source="$3"; shift 3
  mkdir "$dir"
  cp "$source" "$dir/Program.cs"
  cat > "$dir/nuget.config" <<XML
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <add key="vit22b-local" value="$work/feed" />
  </packageSources>
</configuration>
XML
  {
    cat <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <ImplicitUsings>enable</ImplicitUsings>
    <Nullable>enable</Nullable>
    <NoWarn>\$(NoWarn);NU1603</NoWarn>
  </PropertyGroup>
  <ItemGroup>
XML
    for reference in "$@"; do echo "    $reference"; done
    printf '  </ItemGroup>\n</Project>\n'
  } > "$dir/$name.csproj"
}

console_app "$work/app" SmokeApp "$root/tests/PackageSmoke/Program.cs.txt" \
  "<PackageReference Include=\"ViT22B\" Version=\"$version\" />" \
  "<PackageReference Include=\"ViT22B.Onnx\" Version=\"$version\" />" \
  '<PackageReference Include="libtorch-cpu-linux-x64" Version="2.10.0" />'
cd "$work/app"
dotnet build -c Release --nologo -v quiet
dotnet run -c Release --no-build
# Publishing applies the same step to the publish folder.
dotnet publish -c Release --nologo -v quiet -o "$work/publish"
dotnet "$work/publish/SmokeApp.dll"

# The compatibility step must never modify the shared NuGet cache.
if [ -n "$cache_sum_before" ] && [ "$(sha256sum "$cache_lib")" != "$cache_sum_before" ]; then
  echo "the NuGet cache copy of libLibTorchSharp.so was modified" >&2
  exit 1
fi
# A deployment: an app that references ViT22B.OnnxRuntime and ONNX Runtime's CPU build alone runs a model exported by samples/ExportOnnx, and its
# output folder holds no TorchSharp or libtorch file.
dotnet run --project "$root/samples/ExportOnnx" -c Release -- --checkpoint "$root/samples/models/fashion-mnist-vit.safetensors" --output "$work/fm.onnx"
console_app "$work/deploy" Deploy "$root/tests/PackageSmoke/Deploy.cs.txt" \
  "<PackageReference Include=\"ViT22B.OnnxRuntime\" Version=\"$version\" />" \
  '<PackageReference Include="Microsoft.ML.OnnxRuntime" Version="1.31.1" />'
cd "$work/deploy"
dotnet build -c Release --nologo -v quiet -o "$work/deploy-bin"
if ls "$work/deploy-bin" | grep -iE 'torch|ViT22B\.dll'; then echo "the ONNX deployment carries TorchSharp or the library" >&2; exit 1; fi
dotnet "$work/deploy-bin/Deploy.dll" "$work/fm.onnx"
echo "package smoke test passed"
