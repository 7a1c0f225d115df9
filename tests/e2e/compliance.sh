#!/usr/bin/env bash
# Case: compliance. libiscsi's iscsi-test-cu, whole suite (tests/tools/peer/compliance.sh:
# both of its default initiator names log in, ACL ALL; LUN 1 of 1 GiB in 512-byte blocks),
# compared with the checked-in expectation:
#   ktgt: every test that does not pass must be listed in compliance-skip.tsv
#         (test<TAB>reason); compliance-expected.tsv holds the last accepted results
#         (test<TAB>result<TAB>message). A test that fails or is skipped without a line
#         in the skip list fails the case; listed tests that now pass are reported as notes.
#   tgtd: every test that passed in compliance-tgtd.tsv (tgtd 1.0.85) must pass.
# E2E_COMPLIANCE_UPDATE=1 rewrites the expectation file of the target under test from this run
# (ktgt: compliance-expected.tsv, plus skip-list lines "TODO: <message>" for new non-passes,
# to be replaced by a reason; tgtd: compliance-tgtd.tsv). The full log is kept with E2E_KEEP=1.
. "$(dirname "$0")/lib.sh"
e2e_cases compliance || exit 0
IQN=iqn.2026-11.io.ktgt.e2e:compliance
cfg_target t1 $IQN
cfg_lun t1 1 1Gi 512
target_start || exit 0
LOGF=$WORK/iscsi-test-cu.log
TIMEOUT=${E2E_COMPLIANCE_TIMEOUT:-600} "$TOOLS/peer/compliance.sh" "127.0.0.1:$PORT" "$IQN" 1 "$LOGF" >"$WORK/summary" 2>&1
res=$LOGF.tsv
summary=$(tail -n 1 "$WORK/summary")
[ -s "$res" ] || { fail compliance "no results ($summary)" "$WORK/summary"; exit 0; }
echo "# $E2E_TARGET: $summary" >&2

if [ "$E2E_TARGET" = tgtd ]; then
  expect=$E2E_DIR/compliance-tgtd.tsv
  allowed() { awk -F'\t' '$2 != "passed" { print $1 }' "$expect"; }
else
  expect=$E2E_DIR/compliance-expected.tsv skip=$E2E_DIR/compliance-skip.tsv
  allowed() { [ -f "$skip" ] && awk -F'\t' '!/^#/ && NF { print $1 }' "$skip"; }
fi
# unexplained: not passed and not allowed; improved: allowed but passed now
allowed >"$WORK/allowed"   # (FILENAME, not NR == FNR: the list may be empty)
unexplained=$(awk -F'\t' 'FILENAME == ARGV[1] { ok[$1] = 1; next } $2 != "passed" && !($1 in ok) { print $1 " (" $2 ": " $3 ")" }' "$WORK/allowed" "$res")
improved=$(awk -F'\t' 'FILENAME == ARGV[1] { ok[$1] = 1; next } $2 == "passed" && ($1 in ok) { print $1 }' "$WORK/allowed" "$res")
[ -z "$improved" ] || echo "# compliance: now passing, remove from the expectation: $(echo $improved)" >&2
if [ -f "$expect" ]; then
  changed=$(awk -F'\t' 'FILENAME == ARGV[1] { e[$1] = $2; next } ($1 in e) && e[$1] != $2 { print $1 ": " e[$1] " -> " $2 }' "$expect" "$res")
  [ -z "$changed" ] || { echo "# compliance: results that differ from $(basename "$expect"):"; echo "$changed" | sed 's/^/#   /'; } >&2
fi

if [ "${E2E_COMPLIANCE_UPDATE:-0}" = 1 ]; then
  if [ "$E2E_TARGET" = tgtd ]; then cp "$res" "$expect"
  else
    cp "$res" "$expect"
    [ -f "$skip" ] || printf '# iscsi-test-cu tests ktgt does not pass, each with the reason (test<TAB>reason).\n' >"$skip"
    awk -F'\t' 'FILENAME == ARGV[1] { if (!/^#/) have[$1] = 1; next } $2 != "passed" && !($1 in have) { print $1 "\tTODO: " $2 ": " $3 }' "$skip" "$res" >>"$skip"
  fi
  echo "# compliance: updated $(basename "$expect")" >&2
fi

# every test of the expectation must have run (a crash or the time limit cuts the suite short)
missing=
if [ -f "$expect" ]; then
  missing=$(awk -F'\t' 'FILENAME == ARGV[1] { ran[$1] = 1; next } !/^#/ && NF && !($1 in ran) { print $1 }' "$res" "$expect")
fi
if [ -n "$missing" ]; then
  fail compliance "$summary; $(echo "$missing" | wc -l) tests did not run ($(head -n 1 "$WORK/summary")), first: $(echo "$missing" | head -n 1)" "$LOGF"
elif [ -n "$unexplained" ]; then
  n=$(echo "$unexplained" | wc -l)
  fail compliance "$summary; $n not passed and not in the expectation: $(echo "$unexplained" | head -n 5 | tr '\n' ';')$( ((n > 5)) && echo " ...")"
  echo "$unexplained" | sed 's/^/    | /' >&2
elif ! target_alive; then fail compliance "the target died during the suite" "$LOG"
else pass compliance; fi
[ "${E2E_KEEP:-0}" = 1 ] && echo "# iscsi-test-cu log: $LOGF" >&2
exit 0
