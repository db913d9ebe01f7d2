#!/bin/sh
# Runs test binaries inside L1 for lane/ci.sh and sums their counts. POSIX sh, because the
# aarch64 lane's L1 has only busybox (the x86_64 lane runs it with the host's /bin/sh).
#
#   sh lane/suites.sh SUITE=PACKAGE_DIR:BINARY[@FILTER] ...
#
# Each binary runs from its package's directory, as `cargo test` would (with FILTER, only its
# tests whose names contain it); a section per suite with its counts, then the total; exits 1
# when any suite failed.
failed= passed=0 fails=0 ignored=0
for spec in "$@"; do
  name="${spec%%=*}" rest="${spec#*=}"
  dir="${rest%%:*}" bin="${rest#*:}" filter=
  case "$bin" in *@*) filter="${bin#*@}" bin="${bin%@*}" ;; esac
  log="${TMPDIR:-/tmp}/$name.log"
  printf '\n=== lane: %s (%s)\n' "$name" "$(date -u +%H:%M:%S)"
  start=$(date +%s)
  # The binary's status, past the pipe into tee (POSIX sh has no pipefail).
  { (cd "$dir" && "$bin" $filter) 2>&1; echo "$?" >"$log.status"; } | tee "$log"
  status=$(cat "$log.status")
  # `test result: ok. 12 passed; 0 failed; 1 ignored; ...`
  counts=$(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' \
    "$log" | tail -n1)
  read -r p f i <<COUNTS
$counts
COUNTS
  printf '=== lane: %s: %s passed, %s failed, %s ignored, %ss (exit %s)\n' \
    "$name" "${p:-?}" "${f:-?}" "${i:-?}" "$(($(date +%s) - start))" "$status"
  passed=$((passed + ${p:-0})) fails=$((fails + ${f:-0})) ignored=$((ignored + ${i:-0}))
  [ "$status" = 0 ] || failed="$failed $name"
done
printf '\n=== lane: total: %s passed, %s failed, %s ignored\n' "$passed" "$fails" "$ignored"
[ -z "$failed" ] || { echo "=== lane: FAILED:$failed"; exit 1; }
exit 0
