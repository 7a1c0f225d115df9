#!/usr/bin/env bash
# Usage: tests/tools/capture-goldens.sh [OUTDIR]     (root; needs tests/setup.sh --tgt --capture)
# Captures golden iSCSI byte streams from real clients (libiscsi tools, qemu-img's libiscsi,
# open-iscsi in the initiator VM) talking to tgtd on 127.0.0.1, with tcpdump on lo, and splits
# every TCP connection into OUTDIR/<client>/<scenario>-c<N>.{initiator,target}.bin plus
# OUTDIR/index.tsv (default OUTDIR: iscsi-proto/testdata). Rerunning replaces the files
# (the bytes differ every run: ISIDs, CHAP challenges, random data). Env: MAX_BYTES (cut each
# stream at a PDU boundary at or below this, default 24576; 65536 for the write scenarios), ONLY=pattern (scenarios to run), MUTUAL=1 (also the
# mutual CHAP scenario).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$repo/iscsi-proto/testdata}
max=${MAX_BYTES:-24576}
only=${ONLY:-}
for t in tgtd tgtadm tcpdump iscsi-ls iscsi-inq iscsi-test-cu python3; do
  command -v $t >/dev/null || { echo "missing $t: run tests/setup.sh --tgt --capture" >&2; exit 1; }
done

# Two tgtds on loopback: P1 plain target, accepts CRC32C digests (tgtd then picks CRC32C
# whenever the initiator offers it, as libiscsi does: "HeaderDigest=None,CRC32C"), and
# P2 CHAP target with tgtd's default digests (None only).
P1=3261 C1=11 P2=3263 C2=12
PLAIN=iqn.2026-11.lab.golden:plain CHAPT=iqn.2026-11.lab.golden:chap
CHAP_USER=goldenuser CHAP_SECRET=goldensecret12
CHAP_USER_IN=goldentarget CHAP_SECRET_IN=goldentgtsecret34   # mutual CHAP: the target's account
INIT=iqn.2026-11.lab.golden:initiator    # libiscsi tools' initiator name
work=$(mktemp -d)
pids=()
cleanup() {
  set +e
  for c in $C1 $C2; do
    tgtadm -C $c --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1
    tgtadm -C $c --op delete --mode system >/dev/null 2>&1
  done
  sleep 0.5
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

start_tgtd() { # port ctrl iqn [chap]
  local port=$1 c=$2 iqn=$3 chap=${4:-}
  # nop_interval: tgtd sends a NOP-In ping after 2 s idle (replies are NOP-Outs)
  tgtd -f -C "$c" --iscsi "portal=127.0.0.1:$port,nop_interval=2,nop_count=5" >"$work/tgtd-$port.log" 2>&1 &
  pids+=($!)
  local a="tgtadm -C $c --lld iscsi"
  for _ in $(seq 50); do $a --op show --mode sys >/dev/null 2>&1 && break; sleep 0.1; done
  truncate -s 64M "$work/disk-$port.img"
  $a --op new --mode target --tid 1 -T "$iqn"
  $a --op new --mode logicalunit --tid 1 --lun 1 -b "$work/disk-$port.img"
  $a --op bind --mode target --tid 1 -I ALL
  if [ -z "$chap" ]; then
    $a --op update --mode target --tid 1 -n HeaderDigest -v None,CRC32C
    $a --op update --mode target --tid 1 -n DataDigest -v None,CRC32C
    # small bursts: a 32 KiB write needs immediate data, R2Ts, Data-Outs
    $a --op update --mode target --tid 1 -n FirstBurstLength -v 8192
    $a --op update --mode target --tid 1 -n MaxBurstLength -v 16384
  else
    $a --op new --mode account --user "${chap%%:*}" --password "${chap#*:}"
    $a --op bind --mode account --tid 1 --user "${chap%%:*}"
    # the target's own account, for initiators that ask for mutual CHAP
    $a --op new --mode account --user "$CHAP_USER_IN" --password "$CHAP_SECRET_IN"
    $a --op bind --mode account --tid 1 --user "$CHAP_USER_IN" --outgoing
  fi
}
start_tgtd $P1 $C1 $PLAIN
start_tgtd $P2 $C2 $CHAPT "$CHAP_USER:$CHAP_SECRET"

rm -f "$out/index.new"
mkdir -p "$out"
# capture CLIENT SCENARIO PORT CMD...: tcpdump around CMD, then split the connections
capture() {
  local client=$1 scen=$2 port=$3; shift 3
  [ -z "$only" ] || [[ "$client/$scen" == *$only* ]] || return 0
  rm -f "$out/$client/$scen"-c*.bin
  tcpdump -i lo -s 0 -B 131072 -U --immediate-mode -n -w "$work/$scen.pcap" "tcp port $port" 2>"$work/tcpdump.err" &
  local tpid=$!
  for _ in $(seq 50); do grep -q listening "$work/tcpdump.err" && break; sleep 0.1; done
  sleep 1   # "listening" comes a little before the filter sees packets
  echo "== $client/$scen: $*"
  set +e; timeout 300 "$@" >"$work/$scen.out" 2>&1; local rc=$?; set -e
  echo "   exit $rc; $(tail -n 1 "$work/$scen.out")"
  sleep 1; kill -INT $tpid; wait $tpid || true
  grep -E 'dropped by kernel' "$work/tcpdump.err" | grep -v '^0 ' && { echo "tcpdump dropped packets" >&2; exit 1; }
  python3 "$here/pcap-split.py" "$work/$scen.pcap" "$port" "$out/$client" "$scen" --max-bytes "${MAXB:-$max}" --index "$out/index.new" | sed 's/^/   /'
}

U1="iscsi://127.0.0.1:$P1" U2="iscsi://$CHAP_USER%$CHAP_SECRET@127.0.0.1:$P2"
head -c 32768 /dev/urandom >"$work/32k.raw"
# libiscsi
capture libiscsi ls-discovery $P1 iscsi-ls -i "$INIT" -s "$U1"
capture libiscsi inq-standard $P1 iscsi-inq -i "$INIT" "$U1/$PLAIN/1"
capture libiscsi inq-vpd83 $P1 iscsi-inq -i "$INIT" -e 1 -c 131 "$U1/$PLAIN/1"
capture libiscsi readcapacity16 $P1 iscsi-readcapacity16 -i "$INIT" "$U1/$PLAIN/1"
capture libiscsi read10-simple $P1 iscsi-test-cu -i "$INIT" -t ALL.Read10.Simple "$U1/$PLAIN/1"
MAXB=65536 capture libiscsi qemu-write-32k $P1 "$here/peer/qemu-img.sh" convert -n -f raw -O raw "$work/32k.raw" "$U1/$PLAIN/1"
capture libiscsi ls-chap $P2 iscsi-ls -i "$INIT" -s "$U2"
capture libiscsi inq-chap-bad-secret $P2 iscsi-inq -i "$INIT" "iscsi://$CHAP_USER%wrongsecret99@127.0.0.1:$P2/$CHAPT/1"

# open-iscsi (kernel iscsi_tcp) in the initiator VM; c1 is SendTargets discovery
vm=$here/initiator-vm/run.sh
digests=(--set 'node.conn[0].iscsi.HeaderDigest=CRC32C' --set 'node.conn[0].iscsi.DataDigest=CRC32C')
capture open-iscsi login $P1 "$vm" --portal 127.0.0.1:$P1 --iqn $PLAIN --lun 1 --workload login
capture open-iscsi login-chap $P2 "$vm" --portal 127.0.0.1:$P2 --iqn $CHAPT --lun 1 --workload login \
  --chap-user $CHAP_USER --chap-secret $CHAP_SECRET
# mutual CHAP: opt-in (MUTUAL=1) until iscsi-proto's replay test (login.rs,
# replay_captured_initiator_logins) knows the target account goldentarget/goldentgtsecret34
[ "${MUTUAL:-0}" = 1 ] && capture open-iscsi login-chap-mutual $P2 "$vm" --portal 127.0.0.1:$P2 --iqn $CHAPT --lun 1 --workload login \
  --chap-user $CHAP_USER --chap-secret $CHAP_SECRET --chap-user-in $CHAP_USER_IN --chap-secret-in $CHAP_SECRET_IN
capture open-iscsi loginfail-chap $P2 "$vm" --portal 127.0.0.1:$P2 --iqn $CHAPT --lun 1 --workload loginfail \
  --chap-user $CHAP_USER --chap-secret wrongsecret99
capture open-iscsi login-digests $P1 "$vm" --portal 127.0.0.1:$P1 --iqn $PLAIN --lun 1 --workload login "${digests[@]}"
# small: one 32 KiB O_DIRECT write (immediate data, R2T + Data-Out with the target's 8 KiB
# FirstBurstLength), read back, 3 s idle with NOP-Out every 1 s and tgtd's NOP-In pings, logout
small=(--workload small --io-kb 32 --idle 3 --set 'node.conn[0].timeo.noop_out_interval=1')
export MAXB=65536
capture open-iscsi small-write $P1 "$vm" --portal 127.0.0.1:$P1 --iqn $PLAIN --lun 1 "${small[@]}"
capture open-iscsi small-write-digests $P1 "$vm" --portal 127.0.0.1:$P1 --iqn $PLAIN --lun 1 "${small[@]}" "${digests[@]}"

# index: keep the lines of scenarios not rerun, then sort
touch "$out/index.tsv" "$out/index.new"
{ printf 'file\tbytes\tpdus\tfirst_ffp_pdu\tdigests\tstream\tpdu_summary\n'
  awk -F'\t' 'function key(f) { sub(/-c[0-9]+\.[a-z]+\.bin$/, "", f); return f }
              FILENAME ~ /index.new$/ { seen[key($1)] = 1; next }
              $1 != "file" && !(key($1) in seen)' "$out/index.new" "$out/index.tsv" |
    while IFS= read -r l; do [ -e "$out/${l%%$'\t'*}" ] && printf '%s\n' "$l"; done |
    cat - "$out/index.new" | sort -t$'\t' -k1,1 -s; } >"$out/index.tmp"
mv "$out/index.tmp" "$out/index.tsv"; rm -f "$out/index.new"
echo "wrote $(ls "$out"/*/*.bin | wc -l) files, $(du -sh "$out" | cut -f1) in $out"
