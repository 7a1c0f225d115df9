#!/usr/bin/env bash
# Usage: tests/e2e/run.sh        (root: the initiator VM and tgtd need it; see tests/setup.sh)
# Runs every end-to-end case against the target E2E_TARGET (ktgt: the agent KTGT_AGENT,
# default target/release/ktgt-agent; or tgtd, for comparison) and ends with one line
# "N passed, M failed" (exit 1 if M > 0).
#   E2E_ONLY=regexp   run only the matching cases (e.g. E2E_ONLY='^vm-' or 'chap|acl')
#   E2E_KEEP=1        keep each script's temp dir (agent log, configs, client output)
#   E2E_VERBOSE=1     print failing clients' whole output, not the last 15 lines
# Each case prints "PASS <name>" or "FAIL <name>: <reason>"; lines starting with "#" and
# indented client output are information.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export E2E_TARGET=${E2E_TARGET:-ktgt}
export KTGT_AGENT=${KTGT_AGENT:-$(cd "$here/../.." && pwd)/target/release/ktgt-agent}
scripts=(libiscsi chap-acl reload compliance vm)
t0=$(date +%s)
echo "# target: $E2E_TARGET$([ "$E2E_TARGET" = ktgt ] && echo " ($KTGT_AGENT)")" >&2
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for s in "${scripts[@]}"; do
  s0=$(date +%s)
  "$here/$s.sh" | tee -a "$results"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "FAIL $s.sh: script exited $rc" | tee -a "$results"
  echo "# $s.sh: $(($(date +%s) - s0))s" >&2
done
n=$(grep -c '^PASS ' "$results") m=$(grep -c '^FAIL ' "$results")
echo "# total $(($(date +%s) - t0))s" >&2
echo "$n passed, $m failed"
[ "$m" = 0 ]
