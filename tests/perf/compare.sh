#!/usr/bin/env bash
# Usage: tests/perf/compare.sh [--modes buffered,direct] [--reps N] [--secs S] [--size 1G] [--out FILE]
#
# ktgt and tgtd side by side on this machine, in one run: both serve the same backing file
# with the same caching mode (buffered, then O_DIRECT for both: tgtd -b rdwr --bsoflags
# direct, ktgt `direct: true`) on loopback ports, and the same real clients run against each
# in turn, every repetition ktgt then tgtd (the matrix of tests/tools/peer/perf.sh):
#   qemu-img bench   64 KiB sequential writes QD8, 4 KiB strided writes QD32 (also from two
#                    client sessions at once)
#   iscsi-perf       4 KiB random read QD32 and QD1, 128 KiB and 1 MiB sequential read QD8,
#                    and 4 KiB random read QD32 from two client sessions at once (where one
#                    libiscsi client is the bottleneck)
# plus iperf3 over loopback as the ceiling. Every case runs REPS times (median). For each it
# reports the ktgt/tgtd ratio, ktgt's share of loopback bandwidth, and the CPU seconds per GiB
# moved of the target process (all its threads, io_uring workers included) and of the
# clients. One markdown table per mode goes to stdout and to --out (default
# target/perf/compare-<date>.md). Needs root for apt (tests/setup.sh --tgt --perf --no-vm),
# DESTRUCTIVE only for its own backing file under target/perf/. Takes about 15 minutes.
# Env: KTGT_AGENT=path uses that agent binary instead of building one; KTGT_ARGS adds agent
# flags (for A/B runs; the table's header records them).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
modes=buffered,direct reps=3 secs=5 size=1G out=
while [ $# -gt 0 ]; do
  case $1 in
    --modes) modes=$2; shift 2;; --reps) reps=$2; shift 2;; --secs) secs=$2; shift 2;;
    --size) size=$2; shift 2;; --out) out=$2; shift 2;;
    *) sed -n 2p "$0"; exit 2;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
work=$root/target/perf
mkdir -p "$work"
out=${out:-$work/compare-$(date +%Y%m%d-%H%M).md}
log() { printf '[compare] %s\n' "$*" >&2; }

bash tests/setup.sh --tgt --perf --no-vm >"$work/setup.log" 2>&1 || { tail -20 "$work/setup.log"; exit 1; }
if [ -n "${KTGT_AGENT:-}" ]; then
  agent=$KTGT_AGENT
else
  log "building ktgt-agent (release)"
  cargo build --release -p ktgt-agent >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
  agent=$root/target/release/ktgt-agent
fi
QEMU_IMG=$root/tests/tools/peer/qemu-img.sh
PEER=$root/tests/tools/peer
IQN=iqn.2026-12.io.ktgt.perf:disk
disk=$work/disk.img
rm -f "$disk"
truncate -s "$size" "$disk"
bytes=$(stat -c %s "$disk")
hz=$(getconf CLK_TCK)

free_port() { local p; for _ in $(seq 100); do p=$((20000 + RANDOM % 30000)); [ -z "$(ss -Hltn "sport = :$p")" ] && { echo $p; return; }; done; return 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
median() { sort -g | awk '{v[NR]=$1} END {print (NR ? v[int((NR+1)/2)] : "nan")}'; }

TPID= PORT=
declare -A T_PID T_PORT   # per target, while both run
start_target() { # NAME MODE  (sets T_PID[NAME], T_PORT[NAME])
  PORT=$(free_port) || { log "no free port"; return 1; }
  case $1 in
    ktgt)
      local direct=false; [ "$2" = direct ] && direct=true
      cat >"$work/ktgt.yaml" <<EOF
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: Target
metadata: {name: perf}
spec:
  iqn: $IQN
  luns:
    - {lun: 1, backingStore: $disk, blockSize: 512, direct: $direct}
---
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroup
metadata: {name: perf-all}
spec: {addresses: ["ALL"]}
---
apiVersion: tgtd.unstable.cloud/v1alpha1
kind: InitiatorGroupBinding
metadata: {name: perf}
spec: {targetRef: {name: perf}, initiatorGroupRef: {name: perf-all}}
EOF
      # shellcheck disable=SC2086  # KTGT_ARGS are words
      RUST_LOG=warn setsid "$agent" standalone --config "$work/ktgt.yaml" --listen "127.0.0.1:$PORT" ${KTGT_ARGS:-} \
        </dev/null >"$work/ktgt.log" 2>&1 &
      TPID=$! ;;
    tgtd)
      local o=(); [ "$2" = direct ] && o=(-O direct)
      PEER_STATE=$work/peer "$PEER/tgtd-up.sh" -p "$PORT" -n "$IQN" -f "$disk" -b rdwr "${o[@]}" -C $((PORT % 1000 + 100)) \
        >"$work/tgtd-up.log" 2>&1 || { cat "$work/tgtd-up.log" >&2; return 1; }
      TPID=$(cat "$work/peer/tgtd-$PORT/pid") ;;
  esac
  for _ in $(seq 100); do
    iscsi-readcapacity16 "iscsi://127.0.0.1:$PORT/$IQN/1" >/dev/null 2>&1 && { T_PID[$1]=$TPID T_PORT[$1]=$PORT; return 0; }
    sleep 0.1
  done
  log "$1 did not come up on 127.0.0.1:$PORT"; return 1
}
stop_target() { # NAME
  TPID=${T_PID[$1]} PORT=${T_PORT[$1]}
  case $1 in
    ktgt) kill -TERM "$TPID" 2>/dev/null; for _ in $(seq 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
          kill -KILL "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null ;;
    tgtd) PEER_STATE=$work/peer "$PEER/tgtd-down.sh" "$PORT" >/dev/null 2>&1 ;;
  esac
  TPID= T_PID[$1]=
}
trap 'for p in "${T_PID[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done' EXIT

# One run of a case: prints "OPS BYTES SECONDS TARGET_CPU_S CLIENT_CPU_S".
#   iperf QD BLOCKS [-r] [SESSIONS]      iscsi-perf for $secs seconds, SESSIONS in parallel
#   qbench QD SIZE STEP COUNT [SESSIONS] qemu-img bench -w (writes), COUNT per session
run_case() {
  local kind=$1; shift
  local url="iscsi://127.0.0.1:$PORT/$IQN/1" t0 t1 res
  sync
  # Buffered reads start from a warm page cache, the same for both targets (this machine's
  # proactive reclaim, DAMON pageout, evicts idle page cache between runs otherwise). Not
  # before writes: a sequential read fills the cache with large folios, and on this kernel
  # (6.18, ext4 with large folios) a 4 KiB buffered write into one walks all its buffer
  # heads, which made 4 KiB writes cost twice the CPU for both targets.
  [ "$CUR_MODE" = buffered ] && [ "$kind" = iperf ] && cat "$disk" >/dev/null
  t0=$(cpu_ticks "$TPID")
  case $kind in
    iperf)
      local qd=$1 blocks=$2 rnd=${3:-} n=${4:-1} i
      for i in $(seq "$n"); do
        ( /usr/bin/time -f 'CPU %U %S' timeout $((secs + 30)) iscsi-perf -m "$qd" -b "$blocks" -t "$secs" $rnd \
            -i "iqn.2026-12.io.ktgt.perf:client$i" "$url" 2>&1 | tr '\r' '\n' ) >"$work/client.$i" &
      done
      wait
      t1=$(cpu_ticks "$TPID")
      res=$(cat "$work"/client.* | awk -v b=$((blocks * 512)) -v s="$secs" '
        /^iops average/ { ops += $3 * s } /^CPU / { cpu += $2 + $3 }
        END { printf "%.0f %.0f %s %s", ops, ops * b, s, cpu + 0 }')
      rm -f "$work"/client.* ;;
    qbench)
      local qd=$1 sz=$2 step=$3 count=$4 n=${5:-1} i
      for i in $(seq "$n"); do
        # Each session its own initiator name (one name + ISID twice would be a reinstatement)
        # and its own starting offset.
        /usr/bin/time -f 'CPU %U %S' timeout 300 "$QEMU_IMG" bench -t none -w -d "$qd" -s "$sz" -S "$step" \
          -c "$count" -o $(((i - 1) * 8192)) --image-opts \
          "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=127.0.0.1:$PORT,file.target=$IQN,file.lun=1,file.initiator-name=iqn.2026-12.io.ktgt.perf:qemu$i" \
          >"$work/client.$i" 2>&1 &
      done
      wait
      t1=$(cpu_ticks "$TPID")
      if [ "$(cat "$work"/client.* | grep -c 'Run completed')" = "$n" ]; then
        # Aggregate rate: all sessions' operations over the slowest session's time.
        res=$(cat "$work"/client.* | awk -v c="$count" -v s="$sz" '
          /Run completed in/ { if ($4 > t) t = $4; ops += c } /^CPU / { cpu += $2 + $3 }
          END { printf "%d %d %s %s", ops, ops * s, t, cpu + 0 }')
      else res="0 0 1 0"; fi
      rm -f "$work"/client.* ;;
  esac
  read -r ops moved took ccpu <<<"$res"
  echo "$ops $moved $took $(awk -v t=$((t1 - t0)) -v hz="$hz" 'BEGIN { printf "%.2f", t / hz }') $ccpu"
}

# CASES: name | run_case arguments. The 4 KiB writes stride by 1 MiB + 4 KiB (qemu-img wraps
# at the end of the image), as tests/tools/peer/perf.sh does.
cases=(
  "seq write 64 KiB QD8 (qemu-img)|qbench 8 65536 65536 $((bytes / 65536))"
  "write 4 KiB QD32 (qemu-img)|qbench 32 4096 1052672 200000"
  "write 4 KiB QD32, 2 sessions|qbench 32 4096 1052672 100000 2"
  "rand read 4 KiB QD32 (iscsi-perf)|iperf 32 8 -r"
  "rand read 4 KiB QD32, 2 sessions|iperf 32 8 -r 2"
  "rand read 4 KiB QD1 (iscsi-perf)|iperf 1 8 -r"
  "seq read 128 KiB QD8 (iscsi-perf)|iperf 8 256"
  "seq read 1 MiB QD8 (iscsi-perf)|iperf 8 2048"
)

# Results: R[target|mode|case] = "iops MiB/s target_cpu_s_per_GiB client_cpu_s_per_GiB"
declare -A R
# Both targets serve the file at once (only one is driven at a time) and every repetition of a
# case runs against ktgt, then tgtd: each ratio compares runs taken seconds apart, whatever the
# machine's load does over the quarter of an hour.
measure() { # MODE
  local c name args ops moved took tcpu ccpu rate t r
  for c in "${cases[@]}"; do
    name=${c%%|*} args=${c#*|}
    declare -A L=()
    for r in $(seq "$reps"); do
      for t in ktgt tgtd; do
        TPID=${T_PID[$t]} PORT=${T_PORT[$t]}
        # shellcheck disable=SC2086  # args are words
        read -r ops moved took tcpu ccpu <<<"$(run_case $args)"
        rate=$(awk -v o="$ops" -v t="$took" 'BEGIN { printf "%.0f", (t > 0 ? o / t : 0) }')
        L[$t|iops]+="$rate "
        L[$t|mibs]+="$(awk -v r="$rate" -v o="$ops" -v m="$moved" 'BEGIN { printf "%.1f", (o ? r * m / o : 0) / 1048576 }') "
        L[$t|tcg]+="$(awk -v c="$tcpu" -v m="$moved" 'BEGIN { printf "%.3f", (m ? c / (m / 1073741824) : 0) }') "
        L[$t|ccg]+="$(awk -v c="$ccpu" -v m="$moved" 'BEGIN { printf "%.3f", (m ? c / (m / 1073741824) : 0) }') "
        echo "$t $1 | $name | run $r: $rate ops/s, target ${tcpu}s, client ${ccpu}s CPU" >>"$work/raw.log"
      done
    done
    for t in ktgt tgtd; do
      R[$t|$1|$name]="$(tr ' ' '\n' <<<"${L[$t|iops]}" | awk NF | median) $(tr ' ' '\n' <<<"${L[$t|mibs]}" | awk NF | median) $(tr ' ' '\n' <<<"${L[$t|tcg]}" | awk NF | median) $(tr ' ' '\n' <<<"${L[$t|ccg]}" | awk NF | median)"
      log "$t $1: $name: ${R[$t|$1|$name]}"
    done
    unset L
  done
}

iperf_ceiling() {
  local p pid v vals=()
  for _ in $(seq "$reps"); do
    p=$(free_port); iperf3 -s -1 -B 127.0.0.1 -p "$p" >/dev/null 2>&1 & pid=$!; sleep 0.5
    # "-f M": MBytes/sec (2^20 bytes), read off the receiver's summary line.
    v=$(timeout 30 iperf3 -c 127.0.0.1 -p "$p" -t 5 -f M 2>/dev/null |
        awk '/receiver/ { for (i = 2; i <= NF; i++) if ($i == "MBytes/sec") print $(i - 1) }')
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    vals+=("$v")
  done
  printf '%s\n' "${vals[@]}" | median
}

: >"$work/raw.log"
log "loopback TCP ceiling (iperf3, $reps runs)"
tcp=$(iperf_ceiling)
IFS=, read -ra mode_list <<<"$modes"
for mode in "${mode_list[@]}"; do
  CUR_MODE=$mode
  log "$mode: ktgt and tgtd on the same file"
  start_target ktgt "$mode" || exit 1
  start_target tgtd "$mode" || exit 1
  measure "$mode"
  stop_target ktgt
  stop_target tgtd
done

{
  echo "# ktgt vs tgtd, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r);"
  echo "tgtd $(tgtd --version 2>/dev/null | head -1 || echo '?'), ktgt $(git rev-parse --short HEAD 2>/dev/null)${KTGT_ARGS:+ with \`$KTGT_ARGS\`};"
  echo "backing file $size on $(df -T "$work" | awk 'NR == 2 {print $2}'), 512-byte blocks; median of $reps runs, iscsi-perf runs of $secs s."
  printf 'Loopback TCP, one stream (iperf3): **%.0f MiB/s**.\n' "$tcp"
  echo
  echo "CPU s/GiB: CPU seconds (user + system) per GiB moved; target = the whole target process"
  echo "(all threads, io_uring workers included), client = the client processes."
  for mode in "${mode_list[@]}"; do
    echo
    echo "## $mode"
    echo
    echo "| case | ktgt IOPS | tgtd IOPS | ktgt/tgtd | ktgt MiB/s | ktgt % of loopback | target CPU s/GiB ktgt / tgtd | client CPU s/GiB with ktgt / tgtd |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for c in "${cases[@]}"; do
      name=${c%%|*}
      read -r ki km kt kc <<<"${R[ktgt|$mode|$name]}"
      read -r ti tm tt tc <<<"${R[tgtd|$mode|$name]}"
      awk -v n="$name" -v ki="$ki" -v km="$km" -v kt="$kt" -v kc="$kc" -v ti="$ti" -v tt="$tt" -v tc="$tc" -v tcp="$tcp" 'BEGIN {
        printf "| %s | %d | %d | %.2f× | %.0f | %.0f%% | %.2f / %.2f | %.2f / %.2f |\n",
          n, ki, ti, (ti ? ki / ti : 0), km, 100 * km / tcp, kt, tt, kc, tc }'
    done
  done
} | tee "$out"
log "table: $out; every run: $work/raw.log"
