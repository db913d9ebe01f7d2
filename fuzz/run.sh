#!/usr/bin/env bash
# Builds and runs every codec fuzz target for SECONDS (default 60) each, starting from the
# checked-in seeds. New corpus entries go to a temp dir (thrown away) so the repo keeps only the
# hand-made seeds. A crash (or a build failure) fails the script; reproducers land in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-60}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/supermachine"
export PATH="$CACHE/cargo-tools/bin:$PATH"
command -v cargo-fuzz >/dev/null || {
  echo "cargo-fuzz missing: cargo install cargo-fuzz --root $CACHE/cargo-tools" >&2
  exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $(cargo +nightly fuzz list); do
  echo "--- fuzz $target for ${SECONDS_PER_TARGET}s"
  mkdir -p "$work/$target"
  status=0
  cargo +nightly fuzz run "$target" "$work/$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"$work/$target.log" 2>&1 || status=$?
  grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|Done [0-9]+ runs' "$work/$target.log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$work/$target.log" >&2
    echo "fuzz target $target failed (exit $status); reproducers, if any, are in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
