#!/usr/bin/env bash
# Usage: setup.sh    (root; idempotent) -- installs the peer lab's tools from Debian:
#   tgt (tgtd, tgtadm), libiscsi-bin (iscsi-test-cu, iscsi-perf, iscsi-ls, ...), iperf3,
#   and a qemu-img that opens iscsi:// URLs (a private qemu-img 7.2 + libiscsi block module
#   under .qemu/ where the system one cannot). The work is done by tests/setup.sh, which
#   also keeps tgt.service from listening on the wildcard address.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../setup.sh" --tgt --perf --no-vm
