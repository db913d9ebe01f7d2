#!/usr/bin/env bash
# Issue 16's network comparison in the x86 nested lane: examples/bench_net.rs boots the project's
# kernel + agent initramfs under our VMM (user-mode network) and under Firecracker (TAP device,
# kernel routing), in a network namespace of its own inside L1, and prints both and the ratios.
#
#   lane/peers/net.sh [MIB] [ROUNDS] [VMMS] [RUNS]      (defaults: 8 20 ours,firecracker 5)
#
# Firecracker: $SUPERMACHINE_FIRECRACKER, default ../shared/peers/firecracker (see its
# README.md). Keep MIB at 8 or below for it (a 16 MiB download once triple-faulted its guest).
# The lane is shared: start this only when no other QEMU runs (`pgrep -f qemu-system`).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SUPERMACHINE_FIRECRACKER="${SUPERMACHINE_FIRECRACKER:-$(cd .. && pwd)/shared/peers/firecracker}"
[[ -x $SUPERMACHINE_FIRECRACKER ]] || { echo "lane/peers/net.sh: no Firecracker at $SUPERMACHINE_FIRECRACKER" >&2; exit 2; }
exec lane/bench.sh --timeout "${LANE_TIMEOUT:-900}" bench_net "${1:-8}" "${2:-20}" "${3:-ours,firecracker}" "${4:-5}"
