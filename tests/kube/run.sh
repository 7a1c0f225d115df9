#!/usr/bin/env bash
# Every test against a real Kubernetes control plane (kube-apiserver, etcd, and
# kube-controller-manager where a test asks for it; built by tests/kube/build.sh from the Go
# module proxy). Each test binary of tests/kube/tests/ starts its own control plane on loopback.
# The last line is "N passed, M failed".
# Env: KUBE_TESTS=filter passes a name filter to cargo test; TEST_LOG_DIR as in run-all.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
log_dir=${TEST_LOG_DIR:-$root/target/test-logs}
mkdir -p "$log_dir"
export PATH="$HOME/.cargo/bin:$PATH"
passed=0 failed=0
record() { if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "PASS $1"; else failed=$((failed + 1)); echo "FAIL $1"; fi; }

t0=$(date +%s)
bin=$(bash tests/kube/build.sh 2>"$log_dir/kube-build.log" | tail -1)
rc=$?
[ $rc -eq 0 ] && [ -x "$bin/kube-apiserver" ] || { rc=1; tail -30 "$log_dir/kube-build.log"; }
record "kube control plane build ($(( $(date +%s) - t0 )) s)" $rc
if [ $rc -ne 0 ]; then echo; echo "$passed passed, $failed failed"; exit 1; fi
export KUBE_BIN=$bin

t0=$(date +%s)
csi_bin=$(bash tests/kube/build-csi-tools.sh 2>"$log_dir/csi-tools-build.log" | tail -1)
rc=$?
[ $rc -eq 0 ] && [ -x "$csi_bin/csi-sanity" ] || { rc=1; tail -30 "$log_dir/csi-tools-build.log"; }
record "CSI test components build: csi-sanity, csi-provisioner, csi-attacher, csi-resizer, csi-snapshotter, snapshot-controller ($(( $(date +%s) - t0 )) s)" $rc
if [ $rc -eq 0 ]; then
  export KTGT_CSI_SANITY=$csi_bin/csi-sanity KTGT_CSI_PROVISIONER=$csi_bin/csi-provisioner
  export KTGT_CSI_ATTACHER=$csi_bin/csi-attacher KTGT_CSI_RESIZER=$csi_bin/csi-resizer
  export KTGT_CSI_SNAPSHOTTER=$csi_bin/csi-snapshotter KTGT_SNAPSHOT_CONTROLLER=$csi_bin/snapshot-controller
  export KTGT_SNAPSHOT_CRDS=$csi_bin/snapshot-crds
fi

bash csi/proto/check.sh >"$log_dir/csi-proto.log" 2>&1
rc=$?; [ $rc -eq 0 ] || cat "$log_dir/csi-proto.log"; record "csi/proto/csi.proto is the CSI spec's" $rc

cargo build -p ktgt-agent -p ktgt-operator -p ktgt-csi >"$log_dir/kube-ktgt-build.log" 2>&1
rc=$?; [ $rc -eq 0 ] || tail -30 "$log_dir/kube-ktgt-build.log"; record "ktgt binaries build" $rc
export KTGT_AGENT=$root/target/debug/ktgt-agent KTGT_OPERATOR=$root/target/debug/ktgt-operator KTGT_CSI=$root/target/debug/ktgt-csi
# A test whose tools are missing fails here instead of skipping (tests/setup.sh installs them).
export KTGT_REQUIRE_TOOLS=1

# One test at a time: each starts agents and initiators, and this machine has 2 cores.
cargo test -p ktgt-kube-tests --no-fail-fast -- --test-threads=1 ${KUBE_TESTS:-} 2>&1 | tee "$log_dir/kube-tests.log" |
  grep -E '^(test |test result|running|error|failures:)'
rc=${PIPESTATUS[0]}
read -r tp tf < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } } END { print p+0, f+0 }' "$log_dir/kube-tests.log")
passed=$((passed + tp)); failed=$((failed + tf))
if [ $rc -ne 0 ] && [ "$tf" -eq 0 ]; then failed=$((failed + 1)); echo "FAIL kube tests (build or harness error, see $log_dir/kube-tests.log)"; fi
[ "$tf" -eq 0 ] || grep -A40 -E '^---- ' "$log_dir/kube-tests.log" | head -200

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
