#!/usr/bin/env bash
# Builds ktgt-agent (release) and serves the embedded default configuration
# (deploy/examples/standalone.yaml) on 127.0.0.1:3260. Extra arguments go to
# `ktgt-agent standalone`, e.g. --config FILE --listen 127.0.0.1:3261.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "run-standalone.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if ! command -v cc >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc </dev/null
fi
cargo build --release -p ktgt-agent
mkdir -p /var/tmp/ktgt
exec target/release/ktgt-agent standalone "$@"
