# shellcheck shell=bash
# Common code of the end-to-end test scripts (sourced, not run).
#
# A test script declares its cases, describes a target, starts it, runs clients with a time
# limit and reports one line per case: "PASS <name>" or "FAIL <name>: <reason>".
#
#   . "$(dirname "$0")/lib.sh"
#   e2e_cases libiscsi-discovery libiscsi-inq || exit 0    # none selected by E2E_ONLY
#   cfg_target t1 iqn.2026-11.io.ktgt.e2e:t1
#   cfg_lun t1 1 1Gi                  # LUN 1, 1 GiB sparse file, 512-byte blocks
#   target_start || exit 0            # reports FAIL for every declared case if it cannot
#   if e2e_want libiscsi-inq; then out=$(run 20 iscsi-inq "$(url t1 1)") && pass ... || fail ...; fi
#
# Env: E2E_TARGET   ktgt (default) or tgtd: which target the scripts test
#      KTGT_AGENT   agent binary (default <repo>/target/release/ktgt-agent)
#      E2E_ONLY     extended regexp: run only the cases whose name matches
#      E2E_KEEP=1   keep the temp dirs (agent log, configs, client output)
#      E2E_VERBOSE=1  print client output of failed cases in full
set -uo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
TOOLS=$REPO/tests/tools
E2E_TARGET=${E2E_TARGET:-ktgt}
KTGT_AGENT=${KTGT_AGENT:-$REPO/target/release/ktgt-agent}
QEMU_IMG=$TOOLS/peer/qemu-img.sh
# libiscsi tools' initiator name unless a case says otherwise (-i)
E2E_INITIATOR=iqn.2026-11.io.ktgt.e2e:client

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ktgt-e2e.XXXXXX")
E2E_CASES=()
TARGET_PID= TGTD_CTRL= PORT=

e2e_cleanup() {
  target_stop
  if [ "${E2E_KEEP:-0}" = 1 ]; then echo "# kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap e2e_cleanup EXIT
trap 'exit 130' INT TERM

# --- reporting ----------------------------------------------------------------------------
# e2e_cases NAME...: declare the script's cases; false if E2E_ONLY selects none of them
e2e_cases() {
  local c; E2E_CASES=()
  for c in "$@"; do e2e_want "$c" && E2E_CASES+=("$c"); done
  ((${#E2E_CASES[@]}))
}
e2e_want() { [ -z "${E2E_ONLY:-}" ] || [[ $1 =~ $E2E_ONLY ]]; }
pass() { echo "PASS $1"; }
# fail NAME REASON [FILE]: one FAIL line; the file's tail (client output) goes to stderr
fail() {
  echo "FAIL $1: $2"
  if [ -n "${3:-}" ] && [ -s "$3" ]; then
    if [ "${E2E_VERBOSE:-0}" = 1 ]; then sed 's/^/    | /' "$3"; else tail -n 15 "$3" | sed 's/^/    | /'; fi >&2
  fi
}
fail_all() { local c; for c in "${E2E_CASES[@]}"; do fail "$c" "$1" "${2:-}"; done; }

# run SECONDS CMD...: the command with a time limit (SIGKILL 5 s after SIGTERM); exit 124 on timeout
run() { local s=$1; shift; timeout -k 5 "$s" "$@"; }

# --- target description ---------------------------------------------------------------------
# Kept as plain variables so the ktgt (YAML) and tgtd (tgtadm) back ends can both render it.
CFG_TARGETS=()                     # names, in order
declare -A CFG_IQN CFG_LUNS CFG_CHAP CFG_INITIATORS
cfg_target() { CFG_TARGETS+=("$1"); CFG_IQN[$1]=$2; CFG_LUNS[$1]=; CFG_CHAP[$1]=; CFG_INITIATORS[$1]=; }
# cfg_lun TARGET LUN SIZE [BLOCKSIZE]   (SIZE as in the CRD: 1Gi, 256Mi)
cfg_lun() { CFG_LUNS[$1]="${CFG_LUNS[$1]} $2:$3:${4:-512}"; }
cfg_unlun() { local t=$1 l=$2 out= x; for x in ${CFG_LUNS[$t]}; do [ "${x%%:*}" = "$l" ] || out+=" $x"; done; CFG_LUNS[$t]=$out; }
cfg_chap() { CFG_CHAP[$1]="$2:$3"; }                  # TARGET USER SECRET (one-way CHAP)
cfg_initiators() { local t=$1; shift; CFG_INITIATORS[$t]="$*"; }   # ACL by name; none = ALL
bytes() { # 1Gi -> 1073741824
  case $1 in *Gi) echo $((${1%Gi} << 30));; *Mi) echo $((${1%Mi} << 20));; *Ki) echo $((${1%Ki} << 10));; *) echo "$1";; esac
}
url() { # url TARGET LUN [user%secret@]
  echo "iscsi://${3:-}127.0.0.1:$PORT/${CFG_IQN[$1]}/$2"
}
chap_url() { local c=${CFG_CHAP[$1]}; url "$1" "$2" "${c%%:*}%${c#*:}@"; }

render_yaml() {
  local t x lun size bs i
  for t in "${CFG_TARGETS[@]}"; do
    printf -- '---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata:\n  name: %s\nspec:\n  iqn: %s\n  luns:\n' "$t" "${CFG_IQN[$t]}"
    for x in ${CFG_LUNS[$t]}; do
      IFS=: read -r lun size bs <<<"$x"
      printf '    - lun: %s\n      backingStore: %s\n      size: %s\n      blockSize: %s\n' "$lun" "$WORK/$t-lun$lun.img" "$size" "$bs"
    done
    [ -n "${CFG_LUNS[$t]}" ] || echo "    []"
    if [ -n "${CFG_CHAP[$t]}" ]; then
      printf '  chap:\n    secretRef:\n      name: %s-chap\n      namespace: default\n' "$t"
      printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s-chap\n  namespace: default\ntype: Opaque\nstringData:\n  username: "%s"\n  password: "%s"\n' \
        "$t" "${CFG_CHAP[$t]%%:*}" "${CFG_CHAP[$t]#*:}"
    fi
    printf -- '---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroup\nmetadata:\n  name: %s-group\nspec:\n  addresses: ["ALL"]\n' "$t"
    if [ -n "${CFG_INITIATORS[$t]}" ]; then
      echo "  initiators:"; for i in ${CFG_INITIATORS[$t]}; do echo "    - $i"; done
    fi
    printf -- '---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroupBinding\nmetadata:\n  name: %s-binding\nspec:\n  targetRef:\n    name: %s\n  initiatorGroupRef:\n    name: %s-group\n' "$t" "$t" "$t"
  done
}

# --- target back ends ---------------------------------------------------------------------------
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 30000))
    [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return; }
  done
  return 1
}
wait_listen() { # PORT PID SECONDS
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
LOG=$WORK/target.log   # the target's log (agent stderr/stdout, or tgtd's)

# target_start: start the configured target on a free loopback port. On failure reports FAIL for
# every declared case and returns 1.
target_start() {
  PORT=$(free_port) || { fail_all "no free port"; return 1; }
  case $E2E_TARGET in
    ktgt)
      [ -x "$KTGT_AGENT" ] || { fail_all "agent binary $KTGT_AGENT missing (cargo build --release -p ktgt-agent)"; return 1; }
      render_yaml >"$WORK/config.yaml"
      RUST_LOG=${RUST_LOG:-info} setsid "$KTGT_AGENT" standalone --config "$WORK/config.yaml" --listen "127.0.0.1:$PORT" \
        </dev/null >>"$LOG" 2>&1 &
      TARGET_PID=$! ;;
    tgtd)
      command -v tgtd >/dev/null || { fail_all "tgtd missing (tests/setup.sh --tgt)"; return 1; }
      TGTD_CTRL=$((PORT % 1000 + 100))   # tgtd's management channel id (an abstract unix socket)
      setsid tgtd -f -C "$TGTD_CTRL" --iscsi "portal=127.0.0.1:$PORT" </dev/null >>"$LOG" 2>&1 &
      TARGET_PID=$! ;;
    *) fail_all "E2E_TARGET must be ktgt or tgtd"; return 1 ;;
  esac
  if ! wait_listen "$PORT" "$TARGET_PID" 20; then
    fail_all "$E2E_TARGET did not listen on 127.0.0.1:$PORT" "$LOG"; target_stop; return 1
  fi
  if [ "$E2E_TARGET" = tgtd ]; then tgtd_apply || { fail_all "tgtadm failed" "$LOG"; return 1; }; fi
  return 0
}

# target_reload: apply the changed description live (ktgt: rewrite the file, SIGHUP)
target_reload() {
  case $E2E_TARGET in
    ktgt) render_yaml >"$WORK/config.yaml.new" && mv "$WORK/config.yaml.new" "$WORK/config.yaml" &&
          kill -HUP "$TARGET_PID" && sleep "${E2E_RELOAD_WAIT:-0.5}" ;;
    tgtd) tgtd_apply ;;
  esac
}
target_alive() { [ -n "$TARGET_PID" ] && kill -0 "$TARGET_PID" 2>/dev/null; }

target_stop() {
  [ -n "$TARGET_PID" ] || return 0
  if [ "$E2E_TARGET" = tgtd ]; then   # tgtd ignores SIGTERM while it has targets
    local tid
    for tid in $(seq ${#CFG_TARGETS[@]}); do tgtadm -C "$TGTD_CTRL" --lld iscsi --op delete --mode target --tid "$tid" --force >/dev/null 2>&1; done
    tgtadm -C "$TGTD_CTRL" --op delete --mode system >/dev/null 2>&1
  else
    kill -TERM "$TARGET_PID" 2>/dev/null
  fi
  local i
  for ((i = 0; i < 50; i++)); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$TARGET_PID" 2>/dev/null && { echo "# target pid $TARGET_PID ignored SIGTERM for 5 s; killed" >&2; kill -KILL "$TARGET_PID"; }
  wait "$TARGET_PID" 2>/dev/null
  TARGET_PID=
}

# tgtd: make the running tgtd match the description (targets, LUNs, ACLs, CHAP); LUNs are
# added and removed one by one, so the same call serves target_start and target_reload.
declare -A TGTD_HAVE   # "tid:lun" -> 1
tgtd_apply() {
  local a="tgtadm -C $TGTD_CTRL --lld iscsi" tid=0 t x lun size bs i want
  for t in "${CFG_TARGETS[@]}"; do
    tid=$((tid + 1))
    if ! $a --op show --mode target 2>/dev/null | grep -q "^Target $tid: "; then
      $a --op new --mode target --tid $tid -T "${CFG_IQN[$t]}" || return 1
      $a --op update --mode target --tid $tid -n HeaderDigest -v None,CRC32C
      $a --op update --mode target --tid $tid -n DataDigest -v None,CRC32C
      if [ -n "${CFG_INITIATORS[$t]}" ]; then
        for i in ${CFG_INITIATORS[$t]}; do $a --op bind --mode target --tid $tid -Q "$i" || return 1; done
      else
        $a --op bind --mode target --tid $tid -I ALL || return 1
      fi
      if [ -n "${CFG_CHAP[$t]}" ]; then
        $a --op new --mode account --user "${CFG_CHAP[$t]%%:*}" --password "${CFG_CHAP[$t]#*:}" || return 1
        $a --op bind --mode account --tid $tid --user "${CFG_CHAP[$t]%%:*}" || return 1
      fi
    fi
    want=" "
    for x in ${CFG_LUNS[$t]}; do
      IFS=: read -r lun size bs <<<"$x"; want+="$lun "
      [ -n "${TGTD_HAVE[$tid:$lun]:-}" ] && continue
      [ -e "$WORK/$t-lun$lun.img" ] || truncate -s "$(bytes "$size")" "$WORK/$t-lun$lun.img"
      $a --op new --mode logicalunit --tid $tid --lun "$lun" -b "$WORK/$t-lun$lun.img" --blocksize "$bs" || return 1
      TGTD_HAVE[$tid:$lun]=1
    done
    for x in "${!TGTD_HAVE[@]}"; do
      [ "${x%%:*}" = $tid ] || continue
      [[ $want == *" ${x#*:} "* ]] && continue
      $a --op delete --mode logicalunit --tid $tid --lun "${x#*:}" || return 1
      unset "TGTD_HAVE[$x]"
    done
  done
}
