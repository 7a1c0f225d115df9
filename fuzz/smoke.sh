#!/usr/bin/env bash
# Bounded CI smoke for the fuzz targets.
#
# Default (CI): replays every target's hook over its seeds (made from iscsi-proto/testdata),
# fuzz/regressions/<target>/ and any local corpus/artifacts, with the plain test harness:
# `cargo test --no-default-features` in fuzz/, no sanitizer, no libFuzzer. It shares the main
# workspace's target directory, so after the workspace's own `cargo test` only ktgt-fuzz is
# compiled. Why not libFuzzer in CI: the cold sanitizer build of the targets takes about
# 4 minutes on the 2-core machine, over the 2-minute budget (fuzz/README.md).
#
# SMOKE_FUZZ_SECONDS=N (opt-in, needs cargo-fuzz): additionally runs each target under
# libFuzzer for N seconds, two at a time, and fails on any crash.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
start=$(date +%s)

CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target}" \
  cargo test --manifest-path "$here/Cargo.toml" --no-default-features --test replay

if [ -n "${SMOKE_FUZZ_SECONDS:-}" ]; then
  secs="$SMOKE_FUZZ_SECONDS"
  export FUZZ_RESULTS=results/smoke
  "$here/run.sh" build >/dev/null 2>&1 || "$here/run.sh" build
  status=0
  run_pair() {
    local pids=()
    for t in "$@"; do
      "$here/run.sh" "$t" "$secs" -max_len=16384 >/dev/null 2>&1 &
      pids+=($!)
    done
    for i in "${!pids[@]}"; do
      if ! wait "${pids[$i]}"; then
        echo "fuzz smoke: $(echo "$@" | cut -d' ' -f$((i + 1))) failed, see fuzz/results/smoke/" >&2
        status=1
      fi
    done
  }
  run_pair pdu_decode text_ltds
  run_pair login cdb
  for t in pdu_decode text_ltds login cdb; do
    echo "$t: $(grep -E '^stat::number_of_executed_units' "$here/results/smoke/$t.log" | awk '{print $2}') execs in ${secs}s"
  done
  [ "$status" = 0 ] || exit 1
fi
echo "fuzz smoke: $(($(date +%s) - start)) s"
