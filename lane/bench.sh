#!/usr/bin/env bash
# One benchmark example in the nested lane: builds it (release), the static agent and the guest
# kernel on the host, then runs it in L1 with lane/run.sh. The example prints which lane it ran in.
#
#   lane/bench.sh [lane/run.sh options] EXAMPLE [ARG...]
#   lane/bench.sh bench_vm 3 30 1      lane/bench.sh bench_restore 20 5      lane/bench.sh bench_exec
set -euo pipefail
cd "$(dirname "$0")/.."

lane_opts=()
while [[ ${1:-} == --* ]]; do
  case "$1" in
    --verbose) lane_opts+=("$1"); shift ;;
    *) lane_opts+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
  esac
done
example="${1:?usage: lane/bench.sh [--cpus N] [--memory MiB] [--timeout S] EXAMPLE [ARG...]}"
shift

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# Kernel and agent found on the host, so nothing in L1 runs cargo or the kernel script (TCG).
SUPERMACHINE_KERNEL="${SUPERMACHINE_KERNEL:-$(supermachine-vmm/guest/build-kernel.sh)}"
cargo build -q -p supermachine-agent --release --target x86_64-unknown-linux-musl
cargo build -q --release --example "$example"
export SUPERMACHINE_KERNEL SUPERMACHINE_AGENT_BIN="$PWD/target/x86_64-unknown-linux-musl/release/supermachine-agent"
exec lane/run.sh "${lane_opts[@]}" -- "target/release/examples/$example" "$@"
