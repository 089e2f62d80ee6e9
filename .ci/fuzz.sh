#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every decoder of peer
# input: tests/fuzz has one target per decoder. Run by .ci/run after the
# tests. Each target runs for a bounded time and the script prints how many
# inputs it ran and how large its corpus grew; any crash fails the script and
# leaves the input under tests/fuzz/artifacts/TARGET/.
#
#   CI=true: a dev-profile build (faster to compile) and 15 s per target.
#   otherwise: a release build and FUZZ_SECONDS per target (default 120).
#   FUZZ_TARGET_DIR: where the instrumented build goes (a cache outside the
#   clone by default, so repeated CI runs on one machine reuse it).
set -euo pipefail
cd "$(dirname "$0")/../tests/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# cargo-fuzz passes nightly-only flags; the stable compiler accepts them
# with RUSTC_BOOTSTRAP. ASan needs a nightly std, hence --sanitizer none.
export RUSTC_BOOTSTRAP=1
if [ "${CI:-}" = true ]; then
  seconds=${FUZZ_SECONDS:-15}
  profile=(--dev)
else
  seconds=${FUZZ_SECONDS:-120}
  profile=()
fi
target_dir=${FUZZ_TARGET_DIR:-${HOME}/.cache/fedcart/fuzz-target}
opts=(--sanitizer none --target-dir "$target_dir" "${profile[@]}")

start=$(date +%s)
cargo fuzz build "${opts[@]}"
echo "fuzz build: $(($(date +%s) - start)) s"

total=0
for target in $(cargo fuzz list); do
  log=$(mktemp)
  if ! cargo fuzz run "$target" "${opts[@]}" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target FAILED (input saved under tests/fuzz/artifacts/$target/)"
    exit 1
  fi
  runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 | awk '{print $2}')
  corpus=$(find "corpus/$target" -type f | wc -l)
  printf 'fuzz %-15s %10s inputs run in %3s s, corpus %4s inputs\n' \
    "$target" "${runs:-?}" "$seconds" "$corpus"
  total=$((total + ${runs:-0}))
  rm -f "$log"
done
echo "fuzz: $total inputs run over all targets, no crash, $(($(date +%s) - start)) s in all"
