#!/usr/bin/env bash
# Makes what supermachine-guest bundles, for each architecture asked (default: this host's):
#
#   supermachine-guest/build-artifacts.sh [--arch x86_64|aarch64]...
#
# -> supermachine-guest/artifacts/<arch>/kernel.zst, agent.zst and SHA256SUMS (the SHA-256 of each
# uncompressed file). The kernel comes from supermachine-vmm/guest/build-kernel.sh (cached by its
# own key; Debian's linux-source with the checked-in config and patches), the agent from a
# release build for <arch>-unknown-linux-musl with the paths of this machine remapped, so the
# same sources give the same bytes. Needs zstd; root only for build-kernel.sh's first run
# (apt-get).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

archs=()
while (($#)); do
  case "$1" in
    --arch) archs+=("${2:?--arch needs x86_64 or aarch64}"); shift 2 ;;
    *) echo "usage: supermachine-guest/build-artifacts.sh [--arch x86_64|aarch64]..." >&2; exit 2 ;;
  esac
done
((${#archs[@]})) || archs=("$(uname -m)")
command -v zstd >/dev/null || { echo "build-artifacts.sh: zstd is missing: apt-get install zstd" >&2; exit 1; }

for arch in "${archs[@]}"; do
  case "$arch" in
    x86_64 | aarch64) ;;
    *) echo "build-artifacts.sh: error: --arch is x86_64 or aarch64, not '$arch'" >&2; exit 2 ;;
  esac
  echo "== $arch: kernel" >&2
  kernel="$(supermachine-vmm/guest/build-kernel.sh --arch "$arch")"
  echo "== $arch: agent" >&2
  rustup target list --installed | grep -qx "$arch-unknown-linux-musl" \
    || rustup target add "$arch-unknown-linux-musl"
  RUSTFLAGS="--remap-path-prefix=$repo=/supermachine --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
    cargo build -q --release -p supermachine-agent --target "$arch-unknown-linux-musl" \
      --target-dir "$repo/target/guest-artifacts"
  agent="$repo/target/guest-artifacts/$arch-unknown-linux-musl/release/supermachine-agent"

  out="$here/artifacts/$arch"
  mkdir -p "$out"
  tmp="$(mktemp -d "$out/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  zstd -q -19 -T0 "$kernel" -o "$tmp/kernel.zst"
  zstd -q -19 -T0 "$agent" -o "$tmp/agent.zst"
  printf '%s  kernel\n%s  agent\n' "$(sha256sum <"$kernel" | cut -d' ' -f1)" \
    "$(sha256sum <"$agent" | cut -d' ' -f1)" >"$tmp/SHA256SUMS"
  mv -f "$tmp/kernel.zst" "$tmp/agent.zst" "$tmp/SHA256SUMS" "$out/"
  rm -rf "$tmp"
  trap - EXIT
  echo "== $arch: $(du -b "$out/kernel.zst" | cut -f1) + $(du -b "$out/agent.zst" | cut -f1) bytes compressed in $out" >&2
done
