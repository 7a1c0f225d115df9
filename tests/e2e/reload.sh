#!/usr/bin/env bash
# Cases: reload-lun-add, reload-lun-remove.
# A LUN is added and then removed by editing the config and sending SIGHUP (tgtd: tgtadm),
# while a client keeps reading LUN 1 in one session (iscsi-perf); REPORT LUNS (iscsi-ls -s,
# new sessions) must show the new LUN, then no longer show it, and the reading session must
# survive both reloads.
. "$(dirname "$0")/lib.sh"
e2e_cases reload-lun-add reload-lun-remove || exit 0
IQN=iqn.2026-11.io.ktgt.e2e:reload
cfg_target t1 $IQN
cfg_lun t1 1 64Mi
target_start || exit 0
O=$WORK/out
has() { [[ " $1 " == *" $2 "* ]]; }   # has "LUN LIST" N
luns() { run 20 iscsi-ls -i $E2E_INITIATOR -s "iscsi://127.0.0.1:$PORT" >"$O" 2>&1 && sed -n 's/^Lun:\([0-9]*\) .*/\1/p' "$O" | tr '\n' ' '; }

before=$(luns) || { fail_all "iscsi-ls -s failed before the reload" "$O"; exit 0; }
case " $before " in *" 1 "*) ;; *) fail_all "LUN 1 missing before the reload: '$before'" "$O"; exit 0;; esac
# one long session on LUN 1 during both reloads
# (no reconnects: -x 0; it runs until stopped, and exits early if its session fails)
iscsi-perf -i $E2E_INITIATOR-perf -x 0 -m 2 -b 8 "$(url t1 1)" >"$WORK/perf.out" 2>&1 &
perf=$!
stop_perf() { kill -INT $perf 2>/dev/null; for _ in $(seq 50); do kill -0 $perf 2>/dev/null || break; sleep 0.1; done
              kill -KILL $perf 2>/dev/null; wait $perf 2>/dev/null; }
sleep 1

# poll_luns CONDITION: REPORT LUNS until CONDITION (on $l) holds, at most 10 s after the reload
poll_luns() { local i; for i in $(seq 20); do l=$(luns); eval "$1" && break; sleep 0.5; done; echo "$l"; }
cfg_lun t1 2 32Mi
target_reload
after_add=$(poll_luns 'has "$l" 2')
if has "$after_add" 1 && has "$after_add" 2; then pass reload-lun-add
else cp "$O" "$O.add"; fail reload-lun-add "LUNs after adding 2: '$after_add' (before: '$before')" "$O.add"; fi

if e2e_want reload-lun-remove; then
  cfg_unlun t1 2
  target_reload
  after_rm=$(poll_luns '! has "$l" 2')
  if has "$after_rm" 2 || ! has "$after_rm" 1; then
    fail reload-lun-remove "LUNs after removing 2: '$after_rm'" "$O"
  elif ! kill -0 $perf 2>/dev/null; then
    wait $perf; fail reload-lun-remove "the session reading LUN 1 during the reloads ended (iscsi-perf exit $?)" "$WORK/perf.out"
  elif ! target_alive; then fail reload-lun-remove "the target died" "$LOG"
  else pass reload-lun-remove; fi
fi
stop_perf
exit 0
