#!/usr/bin/env bash
# Issue 18's breakdown of a restore in the nested lane: examples/bench_restore with the L1
# kernel's KVM trace events on (kvm_exit, kvm_page_fault) and a trace marker at each step of
# every restore, then, per step, the KVM exits by reason and the nested page faults:
#   (a) restore call -> vCPUs running, then (b) -> first ping answered or (c) -> first `true`
#   exec done, each on restores of its own (the first request carries the reseed).
#
#   lane/trace-restore.sh [RUNS]                     (default 5; x86_64 lane)
#
# Tracing slows every exit a little: take the times from lane/bench.sh bench_restore, the
# counts from here. The lane is shared: start this only when no other QEMU runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --in-l1 ]]; then
  shift
  t=/sys/kernel/tracing
  [[ -d $t/events ]] || mount -t tracefs nodev "$t"
  echo 0 >"$t/tracing_on"
  echo >"$t/trace"
  echo 65536 >"$t/buffer_size_kb"
  echo 1 >"$t/events/kvm/kvm_exit/enable"
  echo 1 >"$t/events/kvm/kvm_page_fault/enable"
  echo 1 >"$t/tracing_on"
  BENCH_TRACE_MARKER="$t/trace_marker" "$@"
  echo 0 >"$t/tracing_on"
  trace=/tmp/restore.trace
  cat "$t/trace" >"$trace"
  grep -c 'kvm_exit' "$trace" | sed 's/^/kvm_exit events in the trace: /'
  grep -q 'LOST\|lost' "$trace" && echo "warning: the trace buffer overflowed; counts are low"
  awk -f lane/trace-restore.awk "$trace" "$trace"
  exit 0
fi

runs="${1:-5}"
exec lane/bench.sh --timeout 900 --wrap "lane/trace-restore.sh --in-l1" bench_restore "$runs" 2
