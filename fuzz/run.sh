#!/usr/bin/env bash
# cargo-fuzz on stable Rust: cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...),
# which stable rustc accepts with RUSTC_BOOTSTRAP=1. Everything runs under `nice -n 10`: the
# machine is shared.
#
#   fuzz/run.sh build                      sanitizer build of every target
#   fuzz/run.sh TARGET [SECONDS] [ARGS..]  fuzz TARGET (default 600 s) from fuzz/corpus/TARGET
#                                          (seeded by fuzz/seed.sh if empty); log and final
#                                          stats in fuzz/results/TARGET.log ($FUZZ_RESULTS
#                                          names another directory)
#   fuzz/run.sh cargo-fuzz ARGS..          any other cargo-fuzz command (cmin, tmin, coverage)
#
# Limits per STYLE §10 / fuzz/README.md: -rss_limit_mb=2048 -timeout=10.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
  echo "cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2
  exit 2
fi
cmd="${1:?usage: run.sh build | TARGET [SECONDS] [ARGS..] | cargo-fuzz ARGS..}"
shift
case "$cmd" in
  build)
    exec nice -n 10 cargo fuzz build "$@"
    ;;
  cargo-fuzz)
    exec nice -n 10 cargo fuzz "$@"
    ;;
  pdu_decode | text_ltds | login | cdb)
    secs="${1:-600}"
    shift || true
    if [ -z "$(ls -A "corpus/$cmd" 2>/dev/null)" ]; then
      ./seed.sh >/dev/null
    fi
    results="${FUZZ_RESULTS:-results}"
    mkdir -p "$results"
    nice -n 10 cargo fuzz run "$cmd" "corpus/$cmd" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "$@" \
      2>&1 | tee "$results/$cmd.log" | grep -E '^(#[0-9]+ +(INITED|DONE|pulse))|ERROR|panicked|^stat::|SUMMARY' || true
    # cargo fuzz exits non-zero on a crash; report from the log.
    if grep -qE '^==[0-9]+==ERROR|panicked at|Test unit written' "$results/$cmd.log"; then
      echo "$cmd: CRASH, see fuzz/$results/$cmd.log and fuzz/artifacts/$cmd/" >&2
      exit 1
    fi
    ;;
  *)
    echo "unknown target or command: $cmd" >&2
    exit 2
    ;;
esac
