#!/usr/bin/env bash
# Scale benchmark on a real control plane (not part of the test run): 500 Targets x 2 LUNs on
# one node, 200 Nodes, 20 groups and bindings; see tests/kube/src/bin/kube-scale.rs for what
# it measures. Release builds of the agent and operator. Sizes: KTGT_SCALE_TARGETS,
# KTGT_SCALE_NODES, KTGT_SCALE_GROUPS. Results: docs/kubernetes.md, "Scale".
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
KUBE_BIN=$(bash tests/kube/build.sh | tail -1); export KUBE_BIN
cargo build --release -q -p ktgt-agent -p ktgt-operator -p ktgt-kube-tests --bin ktgt-agent --bin ktgt-operator --bin kube-scale
export KTGT_AGENT=$PWD/target/release/ktgt-agent KTGT_OPERATOR=$PWD/target/release/ktgt-operator
# The API server's default etcd compaction (5 min), as in a real cluster.
export KUBE_ETCD_COMPACTION_INTERVAL=${KUBE_ETCD_COMPACTION_INTERVAL:-5m}
exec target/release/kube-scale
