#!/usr/bin/env bash
# Writes the fuzz seeds made from iscsi-proto/testdata (per-PDU files, login sequences, text
# segments, CDBs; see src/lib.rs) into fuzz/corpus/<target>/, where `cargo fuzz run` and
# fuzz/run.sh look. Usage: fuzz/seed.sh [DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/corpus}"
# Plain build, no libFuzzer: share the main workspace's target directory so the
# dependencies are not compiled again.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target}" \
  cargo run --quiet --manifest-path "$here/Cargo.toml" --no-default-features --example seed -- "$out"
