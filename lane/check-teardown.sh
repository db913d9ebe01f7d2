#!/usr/bin/env bash
# Checks that lane/run.sh always tears down: after SIGKILL of the runner, SIGKILL of its QEMU,
# and its --timeout, while the command runs in L1, no QEMU of it, no run directory and no new
# mount are left behind; and that a lane without KVM in L1 (x86_64: no svm; aarch64: not started
# at EL2) fails with exit 125. ~2 min (four L1 boots).
#
#   lane/check-teardown.sh [--arch x86_64|aarch64]       (root; lane/ci.sh runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

arch=x86_64
case "${1:-}" in
  "") ;;
  --arch) arch="${2:?--arch needs x86_64 or aarch64}" ;;
  *) echo "usage: lane/check-teardown.sh [--arch x86_64|aarch64]" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The runs checked here keep their run directories under a base of their own, so lanes that
# other processes run meanwhile (another checkout's CI, a developer's lane) are not mistaken
# for leftovers, nor theirs for ours.
export TMPDIR="$work/tmp"
mkdir -p "$TMPDIR"
base="$TMPDIR/supermachine-lane"
failures=0
fail() { printf 'check-teardown: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
pass() { printf 'check-teardown: ok: %s\n' "$*"; }

mounts() { awk '{print $5}' /proc/self/mountinfo | sort; }
lane_qemus() { # pids of the QEMU (of either lane) serving $rundir; other runs' are not ours to judge
  local pid
  for pid in $(pgrep -f '^qemu-system-(x86_64|aarch64) ' 2>/dev/null || true); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "lane.run=$rundir " && echo "$pid"
  done | sort -u
}

# Starts `lane/run.sh ARGS` in the background (log in $work/log), waits for L1 to start the
# command, and sets runner (its pid) and rundir (its run directory).
start_lane() {
  lane/run.sh --arch "$arch" "$@" >"$work/log" 2>&1 &
  runner=$!
  local i
  for ((i = 0; i < 300; i++)); do
    grep -qs '^lane: L1 up' "$work/log" && break
    kill -0 "$runner" 2>/dev/null || { cat "$work/log"; fail "the runner exited before L1 came up"; return 1; }
    sleep 1
  done
  # The runner holds its run directory's lock open: that names it, whatever other runs exist.
  rundir="$(for fd in /proc/"$runner"/fd/*; do readlink "$fd"; done 2>/dev/null \
    | sed -n "s|^\($base/run\.[^/]*\)/lock\$|\1|p" | head -n1)"
  [[ -n $rundir ]] || { fail "no run directory of the runner under $base"; return 1; }
}

# Waits up to 20 s for the run to be gone without a trace.
expect_clean() {
  local what="$1" i
  for ((i = 0; i < 40; i++)); do
    [[ -z $(lane_qemus) && ! -e $rundir ]] && [[ $(mounts) == "$mounts_before" ]] && break
    sleep 0.5
  done
  local left=0
  [[ -z $(lane_qemus) ]] || { fail "$what: QEMU still running: $(lane_qemus)"; left=1; }
  [[ ! -e $rundir ]] || { fail "$what: run directory $rundir left behind"; left=1; }
  [[ $(mounts) == "$mounts_before" ]] || { fail "$what: mounts changed"; left=1; }
  ((left)) || pass "$what: no QEMU, no run directory, no mount left"
}

mounts_before="$(mounts)"

# 1. SIGKILL of the runner: its QEMU dies with it (PDEATHSIG), its watchdog removes the directory.
if start_lane --timeout 300 -- sleep 600; then
  kill -KILL "$runner"
  wait "$runner" 2>/dev/null || true
  expect_clean "SIGKILL of the runner"
fi

# 2. SIGKILL of QEMU: the runner reports the lane failure (125) and cleans up.
if start_lane --timeout 300 -- sleep 600; then
  kill -KILL "$(<"$rundir/qemu.pid")"
  status=0
  wait "$runner" || status=$?
  ((status == 125)) && pass "SIGKILL of QEMU: runner exited 125" \
    || { cat "$work/log"; fail "SIGKILL of QEMU: runner exited $status, not 125"; }
  expect_clean "SIGKILL of QEMU"
fi

# 3. --timeout: L1 is killed and the runner exits 124.
if start_lane --timeout 45 -- sleep 600; then
  status=0
  wait "$runner" || status=$?
  ((status == 124)) && pass "--timeout: runner exited 124" \
    || { cat "$work/log"; fail "--timeout: runner exited $status, not 124"; }
  expect_clean "--timeout"
fi

# 4. No KVM in L1: a clear error and exit 125 (what CI's SUPERMACHINE_REQUIRE_KVM relies on).
if [[ $arch == x86_64 ]]; then
  no_kvm=(env SUPERMACHINE_LANE_CPU=qemu64,-svm) what="no svm" expect='no svm flag'
else
  no_kvm=(env SUPERMACHINE_LANE_MACHINE=virt,gic-version=3) what="no EL2" expect='must start at EL2'
fi
status=0
"${no_kvm[@]}" lane/run.sh --arch "$arch" --timeout 120 -- true >"$work/log" 2>&1 || status=$?
if ((status == 125)) && grep -q "$expect" "$work/log"; then
  pass "$what: exit 125 with \"$(grep -m1 'error:' "$work/log")\""
else
  cat "$work/log"
  fail "$what: exit $status (expected 125 and an error containing '$expect')"
fi

((failures == 0)) || { echo "check-teardown: $failures failure(s)" >&2; exit 1; }
echo "check-teardown: all passed"
