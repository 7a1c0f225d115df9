#!/usr/bin/env bash
# Fails when deploy/crds/ differs from what `crdgen` generates from operator/src/api.rs.
# Run from anywhere; prints a diff and how to fix it. Exit 0: in sync; 1: drift; 2: crdgen failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if ! cargo run --quiet --package ktgt-operator --bin crdgen -- "$out"; then
    echo "check-drift: crdgen failed" >&2
    exit 2
fi
# Every generated file must match, and deploy/crds must hold no stale CRD.
if diff -ru "$out" deploy/crds; then
    echo "check-drift: deploy/crds is in sync with the API types"
else
    echo "check-drift: deploy/crds is stale; regenerate with:" >&2
    echo "  cargo run -p ktgt-operator --bin crdgen -- deploy/crds" >&2
    exit 1
fi
