#!/usr/bin/env bash
# Builds the upstream Kubernetes CSI test components from the Go module proxy only (no download
# sites), as tests/kube/build.sh builds the control plane: csi-sanity (kubernetes-csi/csi-test) and
# the controller sidecars csi-provisioner, csi-attacher and csi-resizer. Each is pinned by its own
# module under tests/kube/csi-tools/<bin>/ (only a `tool` line and upstream's replace directives,
# no Go code): their k8s.io pins clash (the provisioner imports k8s.io/kubernetes and replaces the
# staging modules to v0.36.1, the attacher to v0.37.0, the resizer asks v0.37.1), so they cannot
# share one build list. Binaries are cached under target/kube/csi-tools/<key>/, keyed by a hash of
# every go.mod and go.sum there and the recipe version below, so a changed pin rebuilds and an
# unchanged one is instant; Go's module and build caches are kept between runs.
# node-driver-registrar and livenessprobe are not built: the module proxy serves neither
# (github.com/kubernetes-csi/{node-driver-registrar,livenessprobe}[/v2]: 403 "This module version is
# not available"), and the controller-side tests need neither.
# Usage: tests/kube/build-csi-tools.sh     prints the bin directory on its last line
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mods=$here/csi-tools
# A Go of at least 1.26 (the sidecars' go.mod says go 1.26.0). Without one, Debian's golang-go
# (1.19 on bookworm) fetches the Go toolchain module from the module proxy, as `GOTOOLCHAIN`
# would on a newer Go.
go_ok() { "$1" version 2>/dev/null | awk '{ split(substr($3, 3), v, "."); exit !(v[1] > 1 || (v[1] == 1 && v[2] >= 26)) }'; }
toolchain=v0.0.1-go1.26.8.linux-amd64
if command -v go >/dev/null && go_ok go; then
  GO=go
else
  if ! command -v go >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "kube/build-csi-tools.sh: no Go toolchain; install golang-go" >&2; exit 1; }
    echo "[csi-tools] no Go: apt-get install golang-go" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go </dev/null >&2 ||
      { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go </dev/null >&2; } ||
      { echo "kube/build-csi-tools.sh: apt-get install golang-go failed" >&2; exit 1; }
  fi
  GO=$(go env GOMODCACHE)/golang.org/toolchain@$toolchain/bin/go
  if ! go_ok "$GO"; then
    echo "[csi-tools] $(go version) is older than 1.26: fetching golang.org/toolchain@$toolchain" >&2
    (cd /tmp && GOFLAGS=-mod=mod go mod download "golang.org/toolchain@$toolchain") ||
      { echo "kube/build-csi-tools.sh: could not fetch the Go toolchain module" >&2; exit 1; }
  fi
  go_ok "$GO" || { echo "kube/build-csi-tools.sh: $GO is not a Go >= 1.26" >&2; exit 1; }
fi
# bin  module (its version is read from csi-tools/<bin>/go.mod)  package  version variable
# (the variable upstream's Makefiles set: release-tools' `-X main.version=$(REV)`; csi-sanity's
# own Makefile sets VERSION).
tools=(
  "csi-sanity github.com/kubernetes-csi/csi-test/v5 cmd/csi-sanity main.VERSION"
  "csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 cmd/csi-provisioner main.version"
  "csi-attacher github.com/kubernetes-csi/external-attacher/v4 cmd/csi-attacher main.version"
  "csi-resizer github.com/kubernetes-csi/external-resizer/v2 cmd/csi-resizer main.version"
)
# The key: the pins, and the build recipe's version (bump it when the flags below change).
recipe=1
key=$( (for t in "${tools[@]}"; do set -- $t; cat "$mods/$1/go.mod" "$mods/$1/go.sum"; done
        echo "recipe $recipe") | sha256sum | cut -c1-12)
bin=${KUBE_CSI_BIN_DIR:-$root/target/kube/csi-tools/$key}
ok=1
for t in "${tools[@]}"; do set -- $t; [ -x "$bin/$1" ] || ok=0; done
if ((ok)); then echo "$bin"; exit 0; fi
rm -rf "$bin.tmp"; mkdir -p "$bin.tmp"
t0=$(date +%s)
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"
echo "[csi-tools] building ${#tools[@]} CSI test components into $bin" >&2
for t in "${tools[@]}"; do
  set -- $t
  name=$1 mod=$2 pkg=$3 var=$4
  ver=$(awk -v m="$mod" '{ for (i = 1; i < NF; i++) if ($i == m && $(i + 1) ~ /^v/) { print $(i + 1); exit } }' "$mods/$name/go.mod")
  [ -n "$ver" ] || { echo "kube/build-csi-tools.sh: csi-tools/$name/go.mod pins no $mod" >&2; exit 1; }
  (cd "$mods/$name" && "$GO" build -ldflags "-s -w -X $var=$ver" -o "$bin.tmp/$name" "$mod/$pkg")
  echo "[csi-tools] $name $ver done at +$(( $(date +%s) - t0 ))s" >&2
done
rm -rf "$bin"; mv "$bin.tmp" "$bin"
echo "[csi-tools] built in $(( $(date +%s) - t0 ))s" >&2
echo "$bin"
