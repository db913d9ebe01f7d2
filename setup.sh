#!/usr/bin/env bash
# One command from a fresh clone to a command running in a microVM:
#
#   sudo ./setup.sh
#
# 1. Debian packages: everything in debian-packages.txt, the one list of what supermachine and its
#    whole test suite need (CI installs it the same way: `./setup.sh --packages-only`), and what
#    the guest kernel build needs (supermachine-vmm/guest/build-kernel.sh installs those itself).
# 2. Rust (rustup, if cargo is missing) and the x86_64-unknown-linux-musl target (static agent),
#    and aarch64-unknown-linux-musl for arm64 guests (`cargo build --release -p supermachine-agent
#    --target aarch64-unknown-linux-musl`; with `supermachine-vmm/guest/build-kernel.sh --arch
#    aarch64` for their kernel; neither is built here), and aarch64-apple-darwin, for which CI
#    type-checks the macOS build (README, "macOS (Apple Silicon)").
# 3. The guest kernel (Debian's linux-source-6.1 + our config and patches; ~5 min on 2 cores, then
#    cached under ~/.cache/supermachine/kernel/).
# 4. The guest agent (static musl binary) and the `supermachine` CLI (into ~/.local/bin).
# 5. Kernel and agent into ~/.local/share/supermachine/, where the CLI and the library find them.
# 6. A busybox demo image (OCI layout) in ~/.local/share/supermachine/demo, and a first run of it:
#    `supermachine run oci:...demo:latest uname -a`. The first run boots the guest and snapshots
#    it; every later run of that image restores the snapshot instead of booting.
#
# Root is needed for apt-get and to build image root filesystems (they keep the layers' owners);
# /dev/kvm is needed to run VMs. Tested on Debian 12 (bookworm), which ships linux-source-6.1.
#
# Options:     --packages-only   step 1 alone (what .ci/run uses), then exit.
# Environment: SUPERMACHINE_INSTALL_DIR (default ~/.local/share/supermachine),
#              SUPERMACHINE_BIN_DIR (default ~/.local/bin), SUPERMACHINE_SKIP_DEMO=1.
set -euo pipefail
cd "$(dirname "$0")"

packages_only=0
case "${1:-}" in
  "") ;;
  --packages-only) packages_only=1 ;;
  *) printf 'usage: sudo ./setup.sh [--packages-only]\n' >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

[[ $(uname -m) == x86_64 ]] || die "supermachine runs on x86_64 Linux hosts (this is $(uname -m))"
((EUID == 0)) || die "run as root (sudo ./setup.sh): apt-get and building image root filesystems need it"
command -v apt-get >/dev/null || die "apt-get not found: setup.sh supports Debian (12, bookworm)"
if ! apt-cache show linux-source-6.1 >/dev/null 2>&1; then
  apt-get update -q || true
  apt-cache show linux-source-6.1 >/dev/null 2>&1 \
    || die "this distribution has no linux-source-6.1 package (Debian 12 has it; Ubuntu does not): the guest kernel is built from it"
fi

install_dir="${SUPERMACHINE_INSTALL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/supermachine}"
bin_dir="${SUPERMACHINE_BIN_DIR:-$HOME/.local/bin}"

step "Debian packages"
# Package names are the first word of each line; `#` starts a comment.
mapfile -t packages < <(sed -e 's/#.*//' debian-packages.txt | awk 'NF { print $1 }')
((${#packages[@]})) || die "debian-packages.txt lists no packages"
missing=()
for p in "${packages[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi
((packages_only)) && exit 0

step "Rust toolchain"
if ! command -v cargo >/dev/null; then
  [[ -x $HOME/.cargo/bin/cargo ]] \
    || curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl aarch64-apple-darwin; do
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
done

step "Guest kernel (built once, then cached)"
kernel="$(supermachine-vmm/guest/build-kernel.sh)"
echo "kernel: $kernel"

step "Guest agent and the supermachine CLI"
cargo build --release --locked -p supermachine-agent --target x86_64-unknown-linux-musl
cargo build --release --locked -p supermachine --features cli --bin supermachine
mkdir -p "$install_dir" "$bin_dir"
install -m 0644 "$kernel" "$install_dir/vmlinux"
install -m 0755 target/x86_64-unknown-linux-musl/release/supermachine-agent "$install_dir/supermachine-agent"
install -m 0755 target/release/supermachine "$bin_dir/supermachine"
echo "installed: $bin_dir/supermachine, $install_dir/{vmlinux,supermachine-agent}"

if [[ ${SUPERMACHINE_SKIP_DEMO:-} == 1 ]]; then
  exit 0
fi

step "Demo image"
cargo run --release --locked -q --example demo_image -- "$install_dir/demo"
[[ -e /dev/kvm ]] || die "/dev/kvm is missing: enable virtualisation (VT-x/AMD-V) or load kvm_intel / kvm_amd, then run: $bin_dir/supermachine run oci:$install_dir/demo:latest uname -a"

step "supermachine run oci:$install_dir/demo:latest uname -a   (first run: boot + snapshot)"
SUPERMACHINE_INSTALL_DIR="$install_dir" "$bin_dir/supermachine" run "oci:$install_dir/demo:latest" uname -a

cat <<DONE

Done. Try (with $bin_dir on your PATH):
  supermachine run -it oci:$install_dir/demo:latest sh
  supermachine run -d --name web -p 8080:80 oci:$install_dir/demo:latest httpd -f -p 80 -h /www
  curl http://127.0.0.1:8080/ && supermachine stop web
DONE
