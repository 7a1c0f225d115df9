#!/usr/bin/env bash
# Cases: vm-fs, vm-raw, vm-discovery, vm-loginfail, vm-fs-chap, vm-fs-digests, vm-paths, and
# against ktgt vm-discovery-chap and vm-discovery-chap-refused: the agent restarted with
# --discovery-chap-secret default/t2-chap; open-iscsi's SendTargets with that account lists
# t1, with a wrong secret it is refused.
# The Linux initiator (open-iscsi iscsiadm/iscsid + kernel iscsi_tcp) in the initiator VM
# (tests/tools/initiator-vm; build it with tests/setup.sh). Workloads: see its README.
# t1: plain target, LUN 1 of 256 MiB; t2: CHAP target, LUN 1 of 128 MiB.
# vm-paths (last) restarts the agent with a second portal group: --listen 127.0.0.1:PORT
# (TPGT 1) --listen 127.0.0.2:PORT2,2; the guest logs in through both and runs dm-multipath
# over the two paths (the paths workload), and must see ALUA (TPGS, VPD 0x83, RTPG) with
# TPGTs 1 and 2. Against tgtd a second portal (TPGT 1, no ALUA) is added with tgtadm.
. "$(dirname "$0")/lib.sh"
DCHAP_CASES=()
[ "$E2E_TARGET" = ktgt ] && DCHAP_CASES=(vm-discovery-chap vm-discovery-chap-refused)
e2e_cases vm-fs vm-raw vm-discovery vm-loginfail vm-fs-chap vm-fs-digests "${DCHAP_CASES[@]}" vm-paths || exit 0
VM=$TOOLS/initiator-vm
[ -s "$VM/out/vmlinuz" ] && [ -s "$VM/out/initramfs.cpio.gz" ] || { fail_all "initiator VM not built (tests/setup.sh)"; exit 0; }
CHAP_USER=e2evmuser CHAP_SECRET=e2evmsecret12
cfg_target t1 iqn.2026-11.io.ktgt.e2e:vm
cfg_lun t1 1 256Mi
cfg_target t2 iqn.2026-11.io.ktgt.e2e:vmchap
cfg_lun t2 1 128Mi
cfg_chap t2 $CHAP_USER $CHAP_SECRET
target_start || exit 0

# vm NAME TARGET SECONDS ARGS...: one run.sh workload; PASS if the guest reports PASS within
# SECONDS (against tgtd on 2 cores with TCG: fs 17 s, the others 5-8 s)
vm() {
  local name=$1 t=$2 secs=$3; shift 3
  e2e_want "$name" || return 0
  local out=$WORK/$name.out
  run $((secs + 30)) "$VM/run.sh" --portal "127.0.0.1:$PORT" --iqn "${CFG_IQN[$t]}" --lun 1 --timeout "$secs" \
    --log "$WORK/$name.console" "$@" >"$out" 2>&1
  local rc=$? secs; secs=$(sed -n 's/.* in \([0-9.]*\)s .*/\1/p' "$out" | tail -n 1)
  if [ $rc = 0 ] && [ -n "${EXPECT:-}" ] && ! grep -aq "$EXPECT" "$WORK/$name.console"; then
    fail "$name" "guest passed, but its console lacks '$EXPECT'" "$out"
  elif [ $rc = 0 ]; then pass "$name"; echo "# $name: ${secs}s" >&2
  else
    local why; why=$(grep -a -m1 '^ITEST FAIL' "$out" | sed 's/^ITEST FAIL //')
    fail "$name" "run.sh exit $rc${why:+: $why}" "$out"
  fi
  target_alive || { fail "$name" "the target died" "$LOG"; }
}
CHAPOK=(--chap-user $CHAP_USER --chap-secret $CHAP_SECRET)
DIGESTS=(--set 'node.conn[0].iscsi.HeaderDigest=CRC32C' --set 'node.conn[0].iscsi.DataDigest=CRC32C')
vm vm-discovery t1 60 --workload discovery
vm vm-raw t1 90 --workload raw
vm vm-fs t1 150 --workload fs
vm vm-loginfail t2 60 --workload loginfail --chap-user $CHAP_USER --chap-secret wrongsecret99
vm vm-fs-chap t2 150 --workload fs "${CHAPOK[@]}"
# the negotiated parameters the guest prints must show both digests
EXPECT='DataDigest: CRC32C' vm vm-fs-digests t1 150 --workload fs "${DIGESTS[@]}"

# Discovery CHAP (ktgt): the agent again, now requiring CHAP on discovery sessions with t2's
# account; SendTargets with it lists t1, with a wrong secret the discovery step fails.
if ((${#DCHAP_CASES[@]})) && { e2e_want vm-discovery-chap || e2e_want vm-discovery-chap-refused; }; then
  target_stop
  echo "# vm-discovery-chap: agent --discovery-chap-secret default/t2-chap" >>"$LOG"
  RUST_LOG=${RUST_LOG:-info} setsid "$KTGT_AGENT" standalone --config "$WORK/config.yaml" \
    --listen "127.0.0.1:$PORT" --discovery-chap-secret default/t2-chap </dev/null >>"$LOG" 2>&1 &
  TARGET_PID=$!
  if ! wait_listen "$PORT" "$TARGET_PID" 20; then
    fail vm-discovery-chap "ktgt did not start with --discovery-chap-secret" "$LOG"
  else
    vm vm-discovery-chap t1 60 --workload discovery "${CHAPOK[@]}" --discovery-chap
    if e2e_want vm-discovery-chap-refused; then
      out=$WORK/vm-discovery-chap-refused.out
      run 90 "$VM/run.sh" --portal "127.0.0.1:$PORT" --iqn "${CFG_IQN[t1]}" --lun 1 --timeout 60 \
        --log "$WORK/vm-discovery-chap-refused.console" --workload discovery \
        --chap-user $CHAP_USER --chap-secret wrongsecret99 --discovery-chap >"$out" 2>&1
      rc=$?
      if [ $rc = 0 ]; then fail vm-discovery-chap-refused "discovery with a wrong secret succeeded" "$out"
      elif ! grep -aq '^ITEST FAIL discovery' "$out"; then
        fail vm-discovery-chap-refused "run.sh exit $rc, but not at the discovery step" "$out"
      else pass vm-discovery-chap-refused; fi
    fi
  fi
fi

# paths_target PORT2: the target also serves t1 on 127.0.0.2:PORT2 (ktgt: portal group 2,
# by restarting the agent with both portals; tgtd: one more portal of its TPG 1)
paths_target() {
  local p2=$1
  case $E2E_TARGET in
    ktgt)
      target_stop
      echo "# vm-paths: agent --listen 127.0.0.1:$PORT --listen 127.0.0.2:$p2,2" >>"$LOG"
      RUST_LOG=${RUST_LOG:-info} setsid "$KTGT_AGENT" standalone --config "$WORK/config.yaml" \
        --listen "127.0.0.1:$PORT" --listen "127.0.0.2:$p2,2" </dev/null >>"$LOG" 2>&1 &
      TARGET_PID=$!
      wait_listen "$PORT" "$TARGET_PID" 20 && wait_listen "$p2" "$TARGET_PID" 20 ;;
    tgtd)
      tgtadm -C "$TGTD_CTRL" --lld iscsi --op new --mode portal --param "portal=127.0.0.2:$p2" >>"$LOG" 2>&1 &&
      wait_listen "$p2" "$TARGET_PID" 5 ;;
  esac
}
# 2 cores, TCG: 19-24 s, up to about 48 s while the machine builds (the guest writes
# 16 MiB and reads 48 MiB back)
if e2e_want vm-paths; then
  if ! PORT2=$(free_port); then fail vm-paths "no free port"
  elif ! paths_target "$PORT2"; then
    fail vm-paths "$E2E_TARGET did not listen on 127.0.0.1:$PORT and 127.0.0.2:$PORT2 (portal group 2)" "$LOG"
  else
    [ "$E2E_TARGET" = ktgt ] && paths_expect='paths: tpgt=1,2 alua=yes' || paths_expect=
    EXPECT=$paths_expect vm vm-paths t1 150 --workload paths --portal2 "127.0.0.2:$PORT2"
  fi
fi
exit 0
