#!/usr/bin/env bash
# Cases: libiscsi-discovery, libiscsi-inquiry, libiscsi-readcapacity16, qemu-img-roundtrip.
# libiscsi's command line tools and QEMU's libiscsi driver against one target, LUN 1 of 1 GiB.
. "$(dirname "$0")/lib.sh"
e2e_cases libiscsi-discovery libiscsi-inquiry libiscsi-readcapacity16 qemu-img-roundtrip || exit 0
IQN=iqn.2026-11.io.ktgt.e2e:libiscsi
cfg_target t1 $IQN
cfg_lun t1 1 1Gi
target_start || exit 0
U=$(url t1 1) O=$WORK/out

if e2e_want libiscsi-discovery; then   # SendTargets answers with the portal the connection arrived on
  if ! run 20 iscsi-ls -i $E2E_INITIATOR "iscsi://127.0.0.1:$PORT" >"$O" 2>&1; then fail libiscsi-discovery "iscsi-ls exit $?" "$O"
  elif ! grep -qx "Target:$IQN Portal:127.0.0.1:$PORT,1" "$O"; then fail libiscsi-discovery "no 'Target:$IQN Portal:127.0.0.1:$PORT,1'" "$O"
  elif ! run 20 iscsi-ls -i $E2E_INITIATOR -s "iscsi://127.0.0.1:$PORT" >"$O" 2>&1; then fail libiscsi-discovery "iscsi-ls -s exit $?" "$O"
  elif ! grep -qE '^Lun:1 +Type:DIRECT_ACCESS' "$O"; then fail libiscsi-discovery "iscsi-ls -s does not list Lun:1 DIRECT_ACCESS" "$O"
  else pass libiscsi-discovery; fi
fi

if e2e_want libiscsi-inquiry; then     # standard INQUIRY, VPD 0x80 (serial), 0x83 (identification)
  r=
  if ! run 20 iscsi-inq -i $E2E_INITIATOR "$U" >"$O" 2>&1; then r="standard INQUIRY: exit $?"
  elif ! grep -q '^Peripheral Device Type:DIRECT_ACCESS' "$O"; then r="standard INQUIRY: not DIRECT_ACCESS"
  elif ! grep -qE '^Vendor:.+' "$O" || ! grep -qE '^Product:.+' "$O"; then r="standard INQUIRY: no Vendor/Product"
  elif ! run 20 iscsi-inq -i $E2E_INITIATOR -e 1 -c 0 "$U" >"$O" 2>&1; then r="VPD 0x00: exit $?"
  elif ! grep -q '^Page:0x80' "$O" || ! grep -q '^Page:0x83' "$O"; then r="VPD 0x00 does not list 0x80 and 0x83"
  elif ! run 20 iscsi-inq -i $E2E_INITIATOR -e 1 -c 128 "$U" >"$O" 2>&1; then r="VPD 0x80: exit $?"
  elif ! grep -qE '^Unit Serial Number:\[ *[^] ]+\]' "$O"; then r="VPD 0x80: no serial number"
  elif ! run 20 iscsi-inq -i $E2E_INITIATOR -e 1 -c 131 "$U" >"$O" 2>&1; then r="VPD 0x83: exit $?"
  elif ! grep -q '^Page Code:(0x83) DEVICE_IDENTIFICATION' "$O" || ! grep -q '^DEVICE DESIGNATOR #0' "$O"; then r="VPD 0x83: no designator"
  fi
  if [ -z "$r" ]; then pass libiscsi-inquiry; else fail libiscsi-inquiry "$r" "$O"; fi
fi

if e2e_want libiscsi-readcapacity16; then
  if ! run 20 iscsi-readcapacity16 -i $E2E_INITIATOR "$U" >"$O" 2>&1; then fail libiscsi-readcapacity16 "exit $?" "$O"
  elif ! grep -qx 'Total size:1073741824' "$O" || ! grep -qx 'LOGICAL BLOCK LENGTH IN BYTES:512' "$O" ||
       ! grep -qx 'RETURNED LOGICAL BLOCK ADDRESS:2097151' "$O"; then
    fail libiscsi-readcapacity16 "expected 1 GiB in 512-byte blocks (last LBA 2097151)" "$O"
  else pass libiscsi-readcapacity16; fi
fi

if e2e_want qemu-img-roundtrip; then   # 8 MiB of random data written through QEMU, read back, compared
  head -c 8388608 /dev/urandom >"$WORK/rand.raw"
  if ! run 60 "$QEMU_IMG" convert -n -f raw -O raw "$WORK/rand.raw" "$U" >"$O" 2>&1; then fail qemu-img-roundtrip "write: qemu-img convert exit $?" "$O"
  elif ! run 60 "$QEMU_IMG" dd -f raw -O raw bs=1M count=8 if="$U" of="$WORK/back.raw" >"$O" 2>&1; then fail qemu-img-roundtrip "read: qemu-img dd exit $?" "$O"
  else
    a=$(sha256sum <"$WORK/rand.raw" | cut -c1-64) b=$(sha256sum <"$WORK/back.raw" | cut -c1-64)
    if [ "$a" = "$b" ]; then pass qemu-img-roundtrip; else fail qemu-img-roundtrip "sha256 differs: wrote $a, read $b"; fi
  fi
fi
exit 0
