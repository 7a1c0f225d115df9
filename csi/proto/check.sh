#!/usr/bin/env bash
# Checks that csi/proto/csi.proto is the CSI spec module's own file (see README.md here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=v1.12.0
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
go mod init check >/dev/null 2>&1
dir=$(GOFLAGS=-mod=mod go mod download -json "github.com/container-storage-interface/spec@$version" |
  awk -F'"' '$2 == "Dir" { print $4 }')
[ -n "$dir" ] || { echo "csi/proto/check.sh: could not fetch the CSI spec module $version" >&2; exit 1; }
if cmp -s "$dir/csi.proto" "$here/csi.proto"; then
  echo "csi/proto/csi.proto is the CSI spec $version file"
else
  echo "csi/proto/csi.proto differs from the CSI spec $version file ($dir/csi.proto)" >&2
  exit 1
fi
