#!/usr/bin/env bash
# The whole test suite: installs what it needs (tests/setup.sh), checks formatting and lints,
# runs the Rust unit and integration tests, then the end-to-end tests with real initiators
# (libiscsi tools, iscsi-test-cu, qemu-img, the Linux kernel initiator in a VM).
# Prints one closing line: "N passed, M failed".
# Env: SKIP_E2E=1 leaves out the end-to-end tests with real initiators; E2E_ONLY=pattern selects end-to-end cases;
#      SKIP_KUBE=1 leaves out the real-control-plane tests (tests/kube/run.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log_dir=${TEST_LOG_DIR:-$root/target/test-logs}
mkdir -p "$log_dir"
passed=0 failed=0
step() { printf '\n=== %s\n' "$*"; }
record() { # name rc
  if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "PASS $1"; else failed=$((failed + 1)); echo "FAIL $1"; fi
}

step "setup"
bash tests/setup.sh
record setup $?
export PATH="$HOME/.cargo/bin:$PATH"

step "cargo fmt --check"
cargo fmt --all -- --check >"$log_dir/fmt.log" 2>&1
rc=$?; [ $rc -eq 0 ] || tail -40 "$log_dir/fmt.log"; record fmt $rc

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings >"$log_dir/clippy.log" 2>&1
rc=$?; [ $rc -eq 0 ] || tail -60 "$log_dir/clippy.log"; record clippy $rc

step "cargo test"
# ktgt-kube-tests needs a control plane and the ktgt binaries: tests/kube/run.sh runs it below.
cargo test --workspace --exclude ktgt-kube-tests 2>&1 | tee "$log_dir/cargo-test.log" | grep -E '^(test result|running|error|failures:|    [a-z_:]+$)' 
rc=${PIPESTATUS[0]}
# Count individual Rust tests from cargo's result lines.
read -r tp tf < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } } END { print p+0, f+0 }' "$log_dir/cargo-test.log")
passed=$((passed + tp)); failed=$((failed + tf))
if [ $rc -ne 0 ] && [ "$tf" -eq 0 ]; then failed=$((failed + 1)); echo "FAIL cargo test (build or harness error, see $log_dir/cargo-test.log)"; fi

step "CRDs match the API types (deploy/check-drift.sh)"
bash deploy/check-drift.sh >"$log_dir/drift.log" 2>&1
rc=$?; [ $rc -eq 0 ] || tail -30 "$log_dir/drift.log"; record crd-drift $rc

step "fuzz smoke (seed and regression replay through every fuzz hook)"
bash fuzz/smoke.sh >"$log_dir/fuzz-smoke.log" 2>&1
rc=$?; [ $rc -eq 0 ] || tail -30 "$log_dir/fuzz-smoke.log"; record fuzz-smoke $rc

if [ -d benches ] && [ -f benches/Cargo.toml ]; then
  step "benches build"
  cargo bench --no-run --manifest-path benches/Cargo.toml >"$log_dir/bench-build.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || tail -30 "$log_dir/bench-build.log"; record bench-build $rc
fi

if [ "${SKIP_KUBE:-0}" != 1 ]; then
  step "real Kubernetes control plane (tests/kube/run.sh)"
  bash tests/kube/run.sh 2>&1 | tee "$log_dir/kube.log"
  read -r kp kf < <(awk '/^[0-9]+ passed, [0-9]+ failed/ { p = $1; f = $3 } END { print p+0, f+0 }' "$log_dir/kube.log")
  if ! grep -qE '^[0-9]+ passed, [0-9]+ failed' "$log_dir/kube.log"; then kf=$((kf + 1)); echo "FAIL kube runner printed no summary"; fi
  passed=$((passed + kp)); failed=$((failed + kf))
fi

if [ "${SKIP_E2E:-0}" != 1 ] && [ -x tests/e2e/run.sh ]; then
  step "end-to-end (real initiators)"
  cargo build --release -p ktgt-agent >"$log_dir/release-build.log" 2>&1
  rc=$?; record release-build $rc
  if [ $rc -eq 0 ]; then
    KTGT_AGENT=$root/target/release/ktgt-agent bash tests/e2e/run.sh 2>&1 | tee "$log_dir/e2e.log"
    read -r ep ef < <(awk '/^[0-9]+ passed, [0-9]+ failed/ { p = $1; f = $3 } END { print p+0, f+0 }' "$log_dir/e2e.log")
    if ! grep -qE '^[0-9]+ passed, [0-9]+ failed' "$log_dir/e2e.log"; then ef=$((ef + 1)); echo "FAIL e2e runner printed no summary"; fi
    passed=$((passed + ep)); failed=$((failed + ef))
  fi
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
