#!/usr/bin/env bash
# Usage: tests/setup.sh [--tgt] [--capture] [--perf] [--no-vm] [--no-kube]   (root; idempotent)
# Installs what the end-to-end tests (tests/e2e/run.sh) need on a fresh Debian bookworm machine:
#   libiscsi-bin   iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-test-cu, iscsi-perf; iproute2 (ss)
#   qemu-img       one that opens iscsi:// URLs: the system one if it can, else a private
#                  qemu-utils + qemu-block-extra 7.2 unpacked under tests/tools/peer/.qemu/
#   qemu-system-x86 socat cpio kmod   for the initiator VM, then builds it
#                  (tests/tools/initiator-vm/build.sh: kernel + initramfs in its out/)
#   openssl curl   for the Kubernetes control plane of tests/kube/, which it then builds from
#                  the Go module proxy (tests/kube/build.sh: kube-apiserver, kube-controller-
#                  manager, kubectl, etcd; cached under target/kube/bin/) and the CSI test
#                  components (tests/kube/build-csi-tools.sh: csi-sanity, csi-provisioner,
#                  csi-attacher, csi-resizer; cached under target/kube/csi-tools/)
# Options: --tgt      also tgt (tgtd, tgtadm): the reference target (E2E_TARGET=tgtd, goldens)
#          --capture  also tcpdump (tests/tools/capture-goldens.sh)
#          --perf     also iperf3 and time (tests/tools/peer/perf.sh, tests/perf/compare.sh)
#          --no-vm    skip the initiator VM
#          --no-kube  skip the Kubernetes control plane
# Non-interactive (CI=true, no stdin is fine). Never leaves a service listening on a
# non-loopback address: Debian's tgt package would start tgt.service on 0.0.0.0:3260 where
# systemd runs, so service starts are blocked during the install and tgt.service is disabled.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s.%N)
with_tgt=0 with_capture=0 with_perf=0 with_vm=1 with_kube=1
for a in "$@"; do
  case $a in --tgt) with_tgt=1;; --capture) with_capture=1;; --perf) with_perf=1;; --no-vm) with_vm=0;; --no-kube) with_kube=0;;
             *) sed -n 2p "$0"; exit 2;; esac
done
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (apt-get)" >&2; exit 1; }
log() { printf '[setup] %s\n' "$*"; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

# --- apt packages -------------------------------------------------------------------------
want=(libiscsi-bin libiscsi7 iproute2)   # iproute2: ss, used to find free ports
((with_vm)) && want+=(qemu-system-x86 socat cpio kmod gzip)
((with_kube)) && want+=(openssl curl python3 xfsprogs)   # xfsprogs: the CSI tests' reflink pool (mkfs.xfs)
((with_tgt)) && want+=(tgt)
((with_capture)) && want+=(tcpdump)
((with_perf)) && want+=(iperf3 time)   # time: /usr/bin/time for client CPU (tests/perf)
need=()
for p in "${want[@]}"; do installed "$p" || need+=("$p"); done
command -v qemu-img >/dev/null || need+=(qemu-utils)
updated=0
apt_update() { ((updated)) || { log "apt-get update"; apt-get update -qq || true; updated=1; }; }
if ((${#need[@]})); then
  apt_update
  # Block service starts during the install (policy-rc.d, exit 101 = action forbidden):
  # tgt's postinst would otherwise start tgtd on the wildcard address.
  guard=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; guard=1
  fi
  rc=0
  apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${need[@]}" </dev/null || rc=$?
  ((guard)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || { echo "setup.sh: apt-get install ${need[*]} failed ($rc)" >&2; exit 1; }
  log "installed: ${need[*]}"
else
  log "apt packages already installed: ${want[*]}"
fi
# Installing bookworm's qemu-system-x86 removes a backported qemu-utils that conflicts with it
# (seen on machines that came with qemu-utils 10 from bookworm-backports): put back the
# matching bookworm pair, whose qemu-img has the iscsi driver.
if ! command -v qemu-img >/dev/null; then
  apt_update
  apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 qemu-utils qemu-block-extra </dev/null ||
    { echo "setup.sh: apt-get install qemu-utils qemu-block-extra failed" >&2; exit 1; }
  log "installed: qemu-utils qemu-block-extra ($(qemu-img --version | head -1))"
fi

# --- nothing may listen on a non-loopback address -------------------------------------------
if installed tgt; then
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    if systemctl is-enabled --quiet tgt 2>/dev/null || systemctl is-active --quiet tgt 2>/dev/null; then
      systemctl disable --now tgt >/dev/null 2>&1 || true
      log "stopped and disabled tgt.service (it listens on 0.0.0.0:3260)"
    fi
  fi
  update-rc.d tgt disable >/dev/null 2>&1 || true   # sysvinit, harmless elsewhere
fi
if command -v ss >/dev/null; then
  wild=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E '^(0\.0\.0\.0|\*|\[::\]):3260$' || true)
  if [ -n "$wild" ]; then
    echo "setup.sh: something listens on $wild (a packaged tgtd?); stop it: systemctl disable --now tgt" >&2
    exit 1
  fi
fi

# --- qemu-img with the iscsi:// driver ------------------------------------------------------
# Debian's qemu-block-extra must match qemu-utils exactly; where qemu-utils is a backport
# without a matching block-extra, unpack bookworm's 7.2 pair privately (never installed).
q=$here/tools/peer/.qemu
probe=$(qemu-img info --image-opts driver=iscsi 2>&1 || true)
if [[ $probe == *"Unknown driver"* ]] || [[ $probe == *"not whitelisted"* ]]; then
  if [ ! -x "$q/usr/bin/qemu-img" ] || [ ! -e "$q/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so" ]; then
    apt_update
    ver=$(apt-cache madison qemu-block-extra | awk -F'|' '/bookworm(-security|-updates)?\/main/ {gsub(/ /,"",$2); print $2; exit}')
    [ -n "$ver" ] || { echo "setup.sh: no qemu-block-extra in bookworm" >&2; exit 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "qemu-utils=$ver" "qemu-block-extra=$ver" </dev/null)
    rm -rf "$q"; for d in "$tmp"/*.deb; do dpkg -x "$d" "$q"; done
    rm -rf "$tmp"
    log "unpacked private qemu-img $ver into $q"
  fi
  log "qemu-img with iscsi: tests/tools/peer/qemu-img.sh ($("$here/tools/peer/qemu-img.sh" --version | head -1))"
else
  log "qemu-img with iscsi: system qemu-img ($(qemu-img --version | head -1))"
fi
"$here/tools/peer/qemu-img.sh" info --image-opts driver=iscsi 2>&1 | grep -q "Unknown driver" &&
  { echo "setup.sh: qemu-img.sh still lacks the iscsi driver" >&2; exit 1; }

# --- initiator VM -----------------------------------------------------------------------------
if ((with_vm)); then
  vm=$here/tools/initiator-vm out=${INITIATOR_VM_OUT:-$here/tools/initiator-vm/out}
  if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] &&
     [ "$out/initramfs.cpio.gz" -nt "$vm/build.sh" ] && [ "$out/initramfs.cpio.gz" -nt "$vm/guest/init" ]; then
    log "initiator VM up to date: $out (kernel $(cat "$out/kernel.version" 2>/dev/null))"
  else
    "$vm/build.sh"
  fi
fi

# --- Kubernetes control plane (tests/kube) -----------------------------------------------------
if ((with_kube)); then
  kt0=$(date +%s)
  kbin=$(bash "$here/kube/build.sh" | tail -1) || { echo "setup.sh: tests/kube/build.sh failed" >&2; exit 1; }
  log "Kubernetes control plane: $kbin ($(( $(date +%s) - kt0 )) s)"
  kt0=$(date +%s)
  cbin=$(bash "$here/kube/build-csi-tools.sh" | tail -1) || { echo "setup.sh: tests/kube/build-csi-tools.sh failed" >&2; exit 1; }
  log "CSI test components (csi-sanity, sidecars): $cbin ($(( $(date +%s) - kt0 )) s)"
fi

log "tools: $(command -v iscsi-ls iscsi-inq iscsi-readcapacity16 iscsi-test-cu tgtd tcpdump qemu-system-x86_64 socat 2>/dev/null | tr '\n' ' ')"
log "done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
