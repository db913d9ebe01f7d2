#!/usr/bin/env bash
# Builds every codec fuzz target and runs each for SECONDS (default 60), starting from the
# checked-in seeds (corpus/<target>/) and past crash reproducers (regressions/<target>/).
#
# Corpus policy: libFuzzer writes the inputs it finds into the *first* corpus directory only, so
# that one is a throwaway temp dir and the repository keeps just the hand-made seeds (regenerate
# them with `SUPERMACHINE_WRITE_FUZZ_SEEDS=1 cargo test -p supermachine-codec --test fuzz_seeds`).
#
# Exits non-zero on a build failure or any crash, leak, timeout or OOM; the crashing input is
# left in fuzz/artifacts/<target>/ (minimise it with `cargo +nightly fuzz tmin <target> <file>`
# and keep it under regressions/<target>/ once the bug is fixed). Called by .ci/ci.sh.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true

cache="${XDG_CACHE_HOME:-$HOME/.cache}/supermachine"
export PATH="$cache/cargo-tools/bin:$PATH"
command -v cargo-fuzz >/dev/null || {
  echo "cargo-fuzz missing: cargo install --locked cargo-fuzz --root $cache/cargo-tools" >&2
  exit 1
}

# -a: keep debug assertions and overflow checks, so arithmetic overflow is a crash too.
build_flags=(--debug-assertions)
cargo +nightly fuzz build "${build_flags[@]}"

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
for target in "${targets[@]}"; do
  echo "--- fuzz $target for ${seconds}s"
  mkdir -p "$work/$target"
  inputs=("$work/$target" "corpus/$target")
  [ -d "regressions/$target" ] && inputs+=("regressions/$target")
  status=0
  cargo +nightly fuzz run "${build_flags[@]}" "$target" "${inputs[@]}" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$work/$target.log" 2>&1 || status=$?
  # The last status line (runs, coverage, features, corpus) and libFuzzer's final stats.
  grep -E '^#[0-9]+' "$work/$target.log" | tail -1 || true
  grep -E 'stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' \
    "$work/$target.log" || true
  echo "corpus: $(ls "$work/$target" | wc -l) new inputs (discarded)"
  if [ "$status" -ne 0 ]; then
    tail -60 "$work/$target.log" >&2
    echo "FAIL: fuzz target $target (exit $status); reproducer in fuzz/artifacts/$target/" >&2
    failed=1
  fi
done
exit "$failed"
