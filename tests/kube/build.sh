#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests run against, from the Go module proxy
# only (no download sites): kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes,
# the release pinned in tests/kube/go.mod) and etcd (go.etcd.io/etcd/server/v3, the version that
# release's go.mod requires). Binaries are cached under target/kube/bin/<key>/, keyed by a hash of
# go.mod, go.sum and this script, so a changed pin rebuilds and an unchanged one is instant; Go's
# module and build caches (GOMODCACHE, GOCACHE) are kept between runs, so a fresh clone on a
# machine that built once only links.
# Usage: tests/kube/build.sh            prints the bin directory on its last line
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# A Go of at least 1.24 (what k8s.io/kubernetes v1.34 needs). Without one, Debian's golang-go
# (1.19 on bookworm) fetches the Go toolchain module from the module proxy, as `GOTOOLCHAIN`
# would on a newer Go.
go_ok() { "$1" version 2>/dev/null | awk '{ split(substr($3, 3), v, "."); exit !(v[1] > 1 || (v[1] == 1 && v[2] >= 24)) }'; }
toolchain=v0.0.1-go1.26.8.linux-amd64
if command -v go >/dev/null && go_ok go; then
  GO=go
else
  if ! command -v go >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "kube/build.sh: no Go toolchain; install golang-go" >&2; exit 1; }
    echo "[kube-build] no Go: apt-get install golang-go" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go </dev/null >&2 ||
      { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go </dev/null >&2; } ||
      { echo "kube/build.sh: apt-get install golang-go failed" >&2; exit 1; }
  fi
  GO=$(go env GOMODCACHE)/golang.org/toolchain@$toolchain/bin/go
  if ! go_ok "$GO"; then
    echo "[kube-build] $(go version) is older than 1.24: fetching golang.org/toolchain@$toolchain" >&2
    (cd /tmp && GOFLAGS=-mod=mod go mod download "golang.org/toolchain@$toolchain") ||
      { echo "kube/build.sh: could not fetch the Go toolchain module" >&2; exit 1; }
  fi
  go_ok "$GO" || { echo "kube/build.sh: $GO is not a Go >= 1.24" >&2; exit 1; }
fi
k8s_ver=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")
etcd_ver=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")
[ -n "$k8s_ver" ] && [ -n "$etcd_ver" ] || { echo "kube/build.sh: go.mod pins no k8s.io/kubernetes or etcd" >&2; exit 1; }
# The key: the pins, and the build recipe's version (bump it when the flags below change).
recipe=1
key=$( (cat "$here/go.mod" "$here/go.sum"; echo "recipe $recipe") | sha256sum | cut -c1-12)
bin=${KUBE_BIN_DIR:-$root/target/kube/bin/$k8s_ver-$key}
tools=(kube-apiserver kube-controller-manager kubectl etcd)
ok=1
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || ok=0; done
if ((ok)); then echo "$bin"; exit 0; fi
mkdir -p "$bin.tmp"
t0=$(date +%s)
minor=${k8s_ver#v1.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_ver -X k8s.io/component-base/version.gitMajor=1
 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s_ver -X k8s.io/client-go/pkg/version.gitMajor=1
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
cd "$here"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"
echo "[kube-build] building Kubernetes $k8s_ver and etcd $etcd_ver into $bin" >&2
for t in kube-apiserver kube-controller-manager kubectl; do
  "$GO" build -ldflags "$ldflags" -o "$bin.tmp/$t" "k8s.io/kubernetes/cmd/$t"
  echo "[kube-build] $t done at +$(( $(date +%s) - t0 ))s" >&2
done
"$GO" build -ldflags "-s -w" -o "$bin.tmp/etcd" go.etcd.io/etcd/server/v3
echo "[kube-build] etcd done at +$(( $(date +%s) - t0 ))s" >&2
rm -rf "$bin"; mv "$bin.tmp" "$bin"
echo "[kube-build] built in $(( $(date +%s) - t0 ))s" >&2
echo "$bin"
