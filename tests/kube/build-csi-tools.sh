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
# bin  module directory under csi-tools/  module (its version is read from that go.mod)  package
# version variable (the variable upstream's Makefiles set: release-tools' `-X main.version=$(REV)`;
# csi-sanity's own Makefile sets VERSION).
tools=(
  "csi-sanity csi-sanity github.com/kubernetes-csi/csi-test/v5 cmd/csi-sanity main.VERSION"
  "csi-provisioner csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 cmd/csi-provisioner main.version"
  "csi-attacher csi-attacher github.com/kubernetes-csi/external-attacher/v4 cmd/csi-attacher main.version"
  "csi-resizer csi-resizer github.com/kubernetes-csi/external-resizer/v2 cmd/csi-resizer main.version"
  "csi-snapshotter csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 cmd/csi-snapshotter main.version"
  "snapshot-controller csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 cmd/snapshot-controller main.version"
)
# Each binary is cached on its own, keyed by its module's pins and the build recipe's version (bump
# it when the flags below change): adding a tool or moving one pin rebuilds only what it changes.
recipe=1
cache=${KUBE_CSI_CACHE_DIR:-$root/target/kube/csi-tools}
bin=$cache/bin
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"
t0=$(date +%s) built=0
for t in "${tools[@]}"; do
  set -- $t
  name=$1 dir=$mods/$2 mod=$3 pkg=$4 var=$5
  key=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "$name $pkg recipe $recipe") | sha256sum | cut -c1-12)
  out=$cache/$name-$key
  if [ ! -x "$out/$name" ]; then
    ver=$(awk -v m="$mod" '{ for (i = 1; i < NF; i++) if ($i == m && $(i + 1) ~ /^v/) { print $(i + 1); exit } }' "$dir/go.mod")
    [ -n "$ver" ] || { echo "kube/build-csi-tools.sh: $dir/go.mod pins no $mod" >&2; exit 1; }
    echo "[csi-tools] building $name $ver into $out" >&2
    rm -rf "$out.tmp"; mkdir -p "$out.tmp"
    (cd "$dir" && "$GO" build -ldflags "-s -w -X $var=$ver" -o "$out.tmp/$name" "$mod/$pkg")
    rm -rf "$out"; mv "$out.tmp" "$out"
    built=$((built + 1))
    echo "[csi-tools] $name $ver done at +$(( $(date +%s) - t0 ))s" >&2
  fi
  ln -sfn "$out/$name" "$bin/$name"
done
# The snapshot CRDs (snapshot.storage.k8s.io) ship in the client/v8 module the snapshotter pins.
crds=$(cd "$mods/csi-snapshotter" && "$GO" list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8 2>/dev/null || true)
if [ -z "$crds" ] || [ ! -d "$crds/config/crd" ]; then
  (cd "$mods/csi-snapshotter" && "$GO" mod download github.com/kubernetes-csi/external-snapshotter/client/v8) >&2
  crds=$(cd "$mods/csi-snapshotter" && "$GO" list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)
fi
[ -d "$crds/config/crd" ] || { echo "kube/build-csi-tools.sh: no config/crd in $crds" >&2; exit 1; }
rm -rf "$bin/snapshot-crds"; mkdir -p "$bin/snapshot-crds"
cp "$crds"/config/crd/snapshot.storage.k8s.io_*.yaml "$bin/snapshot-crds/"
((built == 0)) || echo "[csi-tools] built $built in $(( $(date +%s) - t0 ))s" >&2
echo "$bin"
