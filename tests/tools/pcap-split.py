#!/usr/bin/env python3
"""Usage: pcap-split.py PCAP PORT OUTDIR SCENARIO [--max-bytes N] [--index FILE]

Splits the iSCSI TCP connections to PORT in a classic pcap (tcpdump -w, on lo) into byte
streams, one pair of files per connection, numbered in the order the connections opened:
  OUTDIR/SCENARIO-c<N>.initiator.bin   bytes initiator -> target, in order
  OUTDIR/SCENARIO-c<N>.target.bin      bytes target -> initiator, in order
Each stream is framed into PDUs (BHS, AHS, padded data segment, and the CRC32C digests once
the login phase is over if HeaderDigest/DataDigest=CRC32C was negotiated); every digest is
checked. With --max-bytes a stream is cut at the last PDU boundary at or below N bytes.
Appends one line per stream to the index (TSV: file, bytes, pdus, first_digest_pdu,
digests, truncated, pdu summary). Needs only the Python standard library.
"""
import os
import struct
import sys

INIT_OPS = {0x00: "NopOut", 0x01: "ScsiCmd", 0x02: "TaskMgmt", 0x03: "LoginReq", 0x04: "TextReq",
            0x05: "DataOut", 0x06: "LogoutReq", 0x10: "Snack"}
TGT_OPS = {0x20: "NopIn", 0x21: "ScsiRsp", 0x22: "TaskMgmtRsp", 0x23: "LoginRsp", 0x24: "TextRsp",
           0x25: "DataIn", 0x26: "LogoutRsp", 0x31: "R2T", 0x32: "Async", 0x3f: "Reject"}


def crc32c(data, crc=0xFFFFFFFF):
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def read_pcap(path):
    """Yields (linktype, packet bytes) from a classic pcap file."""
    with open(path, "rb") as f:
        hdr = f.read(24)
        magic = struct.unpack("<I", hdr[:4])[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            e = "<"
        elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
            e = ">"
        else:
            sys.exit("not a classic pcap file: " + path)
        linktype = struct.unpack(e + "I", hdr[20:24])[0] & 0x0FFFFFFF
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            _, _, incl, orig = struct.unpack(e + "IIII", rec)
            data = f.read(incl)
            if incl != orig:
                sys.exit("packet truncated by the snap length: capture with -s 0")
            yield linktype, data


def tcp_segments(path, port):
    """Yields (conn_key, from_initiator, seq, flags, payload) for TCP to/from PORT."""
    for linktype, p in read_pcap(path):
        if linktype == 1:        # Ethernet (lo)
            eth, off = struct.unpack("!H", p[12:14])[0], 14
        elif linktype == 113:    # Linux cooked
            eth, off = struct.unpack("!H", p[14:16])[0], 16
        elif linktype == 276:    # Linux cooked v2
            eth, off = struct.unpack("!H", p[0:2])[0], 20
        else:
            sys.exit("unsupported link type %d" % linktype)
        if eth == 0x0800:
            ihl = (p[off] & 0x0F) * 4
            if p[off + 9] != 6:
                continue
            total = struct.unpack("!H", p[off + 2:off + 4])[0]
            src, dst = p[off + 12:off + 16], p[off + 16:off + 20]
            t, end = off + ihl, off + total
        elif eth == 0x86DD:
            if p[off + 6] != 6:   # no extension headers on loopback
                continue
            plen = struct.unpack("!H", p[off + 4:off + 6])[0]
            src, dst = p[off + 8:off + 24], p[off + 24:off + 40]
            t, end = off + 40, off + 40 + plen
        else:
            continue
        sport, dport, seq = struct.unpack("!HHI", p[t:t + 8])
        doff = (p[t + 12] >> 4) * 4
        flags = p[t + 13]
        payload = p[t + doff:end]
        if dport == port:
            yield (src, sport, dst, dport), True, seq, flags, payload
        elif sport == port:
            yield (dst, dport, src, sport), False, seq, flags, payload


class Stream:
    def __init__(self):
        self.isn = None
        self.segs = {}

    def add(self, seq, flags, payload):
        if flags & 0x02:  # SYN
            self.isn = seq
        if payload:
            self.segs.setdefault(seq, payload)

    def bytes(self):
        if self.isn is None:
            sys.exit("connection without SYN in the capture: start the capture first")
        out = bytearray()
        nxt = (self.isn + 1) & 0xFFFFFFFF
        segs = dict(self.segs)
        while segs:
            # the segment covering nxt (retransmissions may overlap)
            cand = [s for s in segs if ((nxt - s) & 0xFFFFFFFF) < len(segs[s])]
            if not cand:
                sys.exit("hole in the TCP stream at seq %d (packets dropped?)" % nxt)
            s = cand[0]
            d = segs.pop(s)
            skip = (nxt - s) & 0xFFFFFFFF
            out += d[skip:]
            nxt = (nxt + len(d) - skip) & 0xFFFFFFFF
            for s2 in [s2 for s2 in segs if ((nxt - s2) & 0xFFFFFFFF) < 0x80000000
                       and ((nxt - s2) & 0xFFFFFFFF) >= len(segs[s2])]:
                del segs[s2]   # wholly before nxt: a retransmission
        return bytes(out)


def text_keys(data):
    return dict(kv.split("=", 1) for kv in data.decode("latin-1").split("\0") if "=" in kv)


def frame(buf, initiator, digests):
    """Splits a stream into PDUs. digests: (header, data) booleans negotiated for full feature
    phase, or None to learn them from the target's login responses (target stream).
    Returns (list of (offset, length, name), first_ffp_pdu_index, (hd, dd), end of the last
    whole PDU)."""
    pdus, off, ffp, hd, dd, learned = [], 0, None, False, False, {}
    while off < len(buf):
        if len(buf) - off < 48:
            return pdus, ffp, (hd, dd), off   # the capture ends inside a PDU
        bhs = buf[off:off + 48]
        op = bhs[0] & 0x3F
        names = INIT_OPS if initiator else TGT_OPS
        if op not in names:
            sys.exit("unexpected opcode 0x%02x at offset %d (%s stream)" % (op, off, "initiator" if initiator else "target"))
        if ffp is None and initiator and op != 0x03:
            ffp = len(pdus)
        in_ffp = ffp is not None and len(pdus) >= ffp
        use_hd, use_dd = (hd, dd) if in_ffp else (False, False)
        ahs = bhs[4] * 4
        dlen = int.from_bytes(bhs[5:8], "big")
        n = 48 + ahs
        if use_hd and off + n + 4 <= len(buf):
            want = struct.unpack("<I", buf[off + n:off + n + 4])[0]
            if crc32c(buf[off:off + n]) != want:
                sys.exit("header digest mismatch at offset %d" % off)
            n += 4
        data = buf[off + n:off + n + dlen]
        padded = (dlen + 3) & ~3
        if use_dd and dlen and off + n + padded + 4 <= len(buf):
            want = struct.unpack("<I", buf[off + n + padded:off + n + padded + 4])[0]
            if crc32c(buf[off + n:off + n + padded]) != want:
                sys.exit("data digest mismatch at offset %d" % off)
        n += padded + (4 if use_dd and dlen else 0)
        if off + n > len(buf):
            return pdus, ffp, (hd, dd), off
        name = names[op]
        if op == 0x01:
            name += "(%02x)" % bhs[32]
        pdus.append((off, n, name))
        if op == 0x23:   # Login Response: learn digests; the final one ends the login phase
            learned.update(text_keys(data))
            transit, nsg, status = bhs[1] & 0x80, bhs[1] & 0x03, bhs[36]
            if transit and nsg == 3 and status == 0 and ffp is None:
                ffp = len(pdus)
        if digests is None:
            hd = learned.get("HeaderDigest") == "CRC32C"
            dd = learned.get("DataDigest") == "CRC32C"
        else:
            hd, dd = digests
        off += n
    return pdus, ffp, (hd, dd), off


def summary(names):
    out, prev, k = [], None, 0
    for nm in names + [None]:
        if nm == prev:
            k += 1
            continue
        if prev is not None:
            out.append(prev + ("*%d" % k if k > 1 else ""))
        prev, k = nm, 1
    return " ".join(out)


def main():
    args = sys.argv[1:]
    opts = {}
    while len(args) > 4:
        opts[args[-2]] = args[-1]
        args = args[:-2]
    if len(args) != 4:
        sys.exit(__doc__)
    pcap, port, outdir, scen = args[0], int(args[1]), args[2], args[3]
    limit = int(opts.get("--max-bytes", 0))
    index = opts.get("--index")
    conns = {}
    for key, from_init, seq, flags, payload in tcp_segments(pcap, port):
        c = conns.setdefault(key, (Stream(), Stream()))
        c[0 if from_init else 1].add(seq, flags, payload)
    os.makedirs(outdir, exist_ok=True)
    lines = []
    for i, (init, tgt) in enumerate(conns.values(), 1):
        ib, tb = init.bytes(), tgt.bytes()
        tp, tffp, dig, tend = frame(tb, False, None)
        ip, iffp, _, iend = frame(ib, True, dig)
        for side, buf, pdus, ffp, whole in (("initiator", ib, ip, iffp, iend), ("target", tb, tp, tffp, tend)):
            keep, trunc = pdus, False
            if whole < len(buf) and not (limit and whole > limit):
                sys.exit("connection %d: %s stream ends inside a PDU at %d of %d (capture lost its tail?)"
                         % (i, side, whole, len(buf)))
            if limit and len(buf) > limit:
                keep = [p for p in pdus if p[0] + p[1] <= limit]
                trunc = True
            end = keep[-1][0] + keep[-1][1] if keep else 0
            fn = "%s-c%d.%s.bin" % (scen, i, side)
            with open(os.path.join(outdir, fn), "wb") as f:
                f.write(buf[:end])
            dg = ("header" if dig[0] else "") + ("+" if all(dig) else "") + ("data" if dig[1] else "")
            note = "truncated from %d bytes/%d PDUs" % (len(buf), len(pdus)) if trunc else "complete"
            lines.append("\t".join([os.path.join(os.path.basename(outdir), fn), str(end), str(len(keep)),
                                    "-" if ffp is None else str(ffp), dg or "none", note,
                                    summary([p[2] for p in keep])]))
            print("%-48s %7d bytes %4d PDUs digests=%s %s" % (fn, end, len(keep), dg or "none", note))
    if index:
        with open(index, "a") as f:
            f.write("".join(l + "\n" for l in lines))


if __name__ == "__main__":
    main()
