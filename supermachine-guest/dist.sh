#!/usr/bin/env bash
# Makes the guest kernel and agent a release artifact for hosts that cannot build them (macOS on
# Apple silicon: the arm64 kernel and the static musl agent are built on Linux):
#
#   supermachine-guest/dist.sh [--arch aarch64|x86_64]        (default aarch64)
#
# -> target/dist/supermachine-guest-<arch>-<version>.tar.gz holding `vmlinux` (the kernel: an
# arm64 `Image` for aarch64, despite the name, which is what the install directory calls it),
# `supermachine-agent` and SHA256SUMS. It runs build-artifacts.sh for <arch> (cached kernel
# build; the bundled .zst files under supermachine-guest/artifacts/ are refreshed too, so a
# `cargo package` after it bundles the same bytes) and unpacks what that made.
#
# On the Mac, unpack it into the install directory, where the library and the CLI look when no
# path is given (README, "macOS (Apple Silicon)"):
#   mkdir -p ~/Library/Application\ Support/supermachine
#   tar -xzf supermachine-guest-aarch64-<version>.tar.gz -C ~/Library/Application\ Support/supermachine
# or point SUPERMACHINE_KERNEL / SUPERMACHINE_AGENT_BIN at the two files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

arch=aarch64
case "${1:-}" in
  "") ;;
  --arch) arch="${2:?--arch needs aarch64 or x86_64}" ;;
  *) echo "usage: supermachine-guest/dist.sh [--arch aarch64|x86_64]" >&2; exit 2 ;;
esac

"$here/build-artifacts.sh" --arch "$arch"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
src="$here/artifacts/$arch"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
zstd -q -d "$src/kernel.zst" -o "$stage/vmlinux"
zstd -q -d "$src/agent.zst" -o "$stage/supermachine-agent"
chmod 0644 "$stage/vmlinux"
chmod 0755 "$stage/supermachine-agent"
# The same sums build-artifacts.sh recorded, under the installed names; checked here.
(cd "$stage" && printf '%s  vmlinux\n%s  supermachine-agent\n' \
  "$(awk '$2 == "kernel" { print $1 }' "$src/SHA256SUMS")" \
  "$(awk '$2 == "agent" { print $1 }' "$src/SHA256SUMS")" >SHA256SUMS && sha256sum -c --quiet SHA256SUMS)

mkdir -p target/dist
out="target/dist/supermachine-guest-$arch-$version.tar.gz"
tar -C "$stage" --owner=0 --group=0 --numeric-owner --mtime=@0 --sort=name \
  -czf "$out" vmlinux supermachine-agent SHA256SUMS
echo "$out"
