#!/usr/bin/env bash
# One benchmark example in the nested lane: builds it (release), the static agent and the guest
# kernel on the host, then runs it in L1 with lane/run.sh. The example prints which lane it ran in.
#
#   lane/bench.sh [lane/run.sh options] EXAMPLE [ARG...]
#   lane/bench.sh bench_vm 3 30 1      lane/bench.sh bench_restore 20 5      lane/bench.sh bench_exec
#   lane/bench.sh --arch aarch64 bench_vm 3 30 1    (kernel, agent and example built for arm64;
#                                                   the example static, for aarch64-unknown-linux-musl)
set -euo pipefail
cd "$(dirname "$0")/.."

lane_opts=() arch="${SUPERMACHINE_LANE_ARCH:-x86_64}" wrap=()
while [[ ${1:-} == --* ]]; do
  case "$1" in
    --verbose) lane_opts+=("$1"); shift ;;
    --arch) arch="${2:?--arch needs a value}"; shift 2 ;;
    # A command (words split on spaces) that runs the example in L1: lane/trace-restore.sh.
    --wrap) read -ra wrap <<<"${2:?--wrap needs a command}"; shift 2 ;;
    *) lane_opts+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
  esac
done
example="${1:?usage: lane/bench.sh [--arch x86_64|aarch64] [--cpus N] [--memory MiB] [--timeout S] EXAMPLE [ARG...]}"
shift
case "$arch" in
  x86_64) example_target=() examples=target/release/examples ;;
  aarch64)
    # L1 runs busybox, not the host's programs: a static example; C parts (ring, zstd-sys)
    # with Debian's arm64 cross gcc, as lane/ci.sh says.
    example_target=(--target aarch64-unknown-linux-musl) examples=target/aarch64-unknown-linux-musl/release/examples
    export CC_aarch64_unknown_linux_musl="${CC_aarch64_unknown_linux_musl:-aarch64-linux-gnu-gcc}" ;;
  *) echo "lane/bench.sh: error: --arch is x86_64 or aarch64, not '$arch'" >&2; exit 2 ;;
esac

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# Kernel and agent found on the host, so nothing in L1 runs cargo or the kernel script (TCG).
SUPERMACHINE_KERNEL="${SUPERMACHINE_KERNEL:-$(supermachine-vmm/guest/build-kernel.sh --arch "$arch")}"
cargo build -q -p supermachine-agent --release --target "$arch-unknown-linux-musl"
cargo build -q --release "${example_target[@]}" --example "$example"
export SUPERMACHINE_KERNEL SUPERMACHINE_AGENT_BIN="$PWD/target/$arch-unknown-linux-musl/release/supermachine-agent"
exec lane/run.sh --arch "$arch" "${lane_opts[@]}" -- "${wrap[@]}" "$examples/$example" "$@"
