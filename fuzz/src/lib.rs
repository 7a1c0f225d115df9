//! Seeds for ktgt's fuzz targets, made from the captured streams in
//! `iscsi-proto/testdata/` (STYLE §10: seeds from `testdata/`), and the list of targets with
//! their library hooks.
//!
//! The fuzz targets themselves are one-line calls into library hooks
//! (`iscsi_proto::internal`, `target_core::scsi::internal`); this crate only feeds them.
//! `examples/seed.rs` writes the seeds as files for libFuzzer (`fuzz/seed.sh`);
//! `tests/replay.rs` runs every seed, and any corpus or crash files on disk, through the hooks
//! with the plain test harness (`fuzz/smoke.sh`).

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use iscsi_proto::pdu::{Header, Stage};
use iscsi_proto::text::{self, TextAssembler};
use iscsi_proto::{Codec, Pdu};

/// A fuzz hook: bytes in, panics only when an invariant breaks.
pub type Hook = fn(&[u8]);

/// The fuzz targets and the hook each one calls.
pub const TARGETS: [(&str, Hook); 4] = [
    ("pdu_decode", iscsi_proto::internal::fuzz_pdu_decode),
    ("text_ltds", iscsi_proto::internal::fuzz_text),
    ("login", iscsi_proto::internal::fuzz_login),
    ("cdb", target_core::scsi::internal::fuzz_cdb),
];

/// One seed: the target it is for, a file name, the bytes.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub data: Vec<u8>,
}

/// `iscsi-proto/testdata`.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../iscsi-proto/testdata")
}

/// One PDU as captured, with the digest settings it was framed with.
struct Framed {
    raw: Vec<u8>,
    pdu: Pdu,
    header_digest: bool,
    data_digest: bool,
}

/// Splits a stream into PDUs: the first `login_pdus` without digests, the rest with the
/// given ones (testdata/README.md). Stops at the first incomplete or undecodable PDU.
fn split(stream: &[u8], login_pdus: usize, digests: (bool, bool)) -> Vec<Framed> {
    let mut buf = BytesMut::from(stream);
    let mut out = Vec::new();
    loop {
        let (hd, dd) = if out.len() < login_pdus {
            (false, false)
        } else {
            digests
        };
        let mut codec = Codec {
            header_digest: hd,
            data_digest: dd,
            ..Codec::default()
        };
        let start = stream.len() - buf.len();
        let Ok(Some(pdu)) = codec.decode(&mut buf) else {
            return out;
        };
        let end = stream.len() - buf.len();
        out.push(Framed {
            raw: stream[start..end].to_vec(),
            pdu,
            header_digest: hd,
            data_digest: dd,
        });
    }
}

/// Login PDU count and full-feature digests of a connection, from the target's Login
/// Responses (text joined across the C bit).
fn login_outcome(target_stream: &[u8]) -> (usize, (bool, bool)) {
    let mut n = 0;
    let mut digests = (false, false);
    let mut assembler = TextAssembler::default();
    for f in split(target_stream, usize::MAX, (false, false)) {
        let Header::LoginResponse(rsp) = &f.pdu.header else {
            break;
        };
        n += 1;
        if let Ok(Some(ltds)) = assembler.handle_segment(&f.pdu.data, rsp.continue_) {
            for (key, value) in text::parse(&ltds).unwrap_or_default() {
                match key {
                    "HeaderDigest" => digests.0 = value == "CRC32C",
                    "DataDigest" => digests.1 = value == "CRC32C",
                    _ => {}
                }
            }
        }
        let ok = rsp.status_class == 0 && rsp.status_detail == 0;
        if rsp.transit && rsp.nsg == Stage::FullFeature && ok {
            return (n, digests);
        }
        if !ok {
            break;
        }
    }
    (n, (false, false))
}

/// Captured connections: name, initiator PDUs, target PDUs.
fn captures() -> Vec<(String, Vec<Framed>, Vec<Framed>)> {
    let mut out = Vec::new();
    for client in ["libiscsi", "open-iscsi"] {
        let dir = testdata().join(client);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".initiator.bin").map(str::to_owned))
            .collect();
        names.sort();
        for name in names {
            let (Ok(ini), Ok(tgt)) = (
                std::fs::read(dir.join(format!("{name}.initiator.bin"))),
                std::fs::read(dir.join(format!("{name}.target.bin"))),
            ) else {
                continue;
            };
            let (login_pdus, digests) = login_outcome(&tgt);
            out.push((
                format!("{client}-{name}"),
                split(&ini, login_pdus, digests),
                split(&tgt, login_pdus, digests),
            ));
        }
    }
    out
}

/// CDB length by operation code group (SPC-4 §4.2.5.1).
fn cdb_len(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// Text as `fuzz_text` frames it: control byte (C bit, length up to 127) and bytes.
fn text_seed(sel: u8, ltds: &[u8]) -> Vec<u8> {
    let mut out = vec![sel];
    let chunks: Vec<&[u8]> = ltds.chunks(127).collect();
    if chunks.is_empty() {
        out.push(0);
    }
    for (i, c) in chunks.iter().enumerate() {
        let more = if i + 1 < chunks.len() { 0x80 } else { 0 };
        out.push(more | c.len() as u8);
        out.extend_from_slice(c);
    }
    out
}

/// Every seed for every target. Duplicates are removed; the per-PDU seeds keep a few PDUs of
/// each kind per stream, which is what coverage needs.
pub fn seeds() -> Vec<Seed> {
    let mut out: Vec<Seed> = Vec::new();
    let mut push = |target: &'static str, name: String, data: Vec<u8>| {
        if !out.iter().any(|s| s.target == target && s.data == data) {
            out.push(Seed { target, name, data });
        }
    };
    for (name, ini, tgt) in captures() {
        for (side, pdus) in [("i", &ini), ("t", &tgt)] {
            let mut per_kind: Vec<(u8, usize)> = Vec::new();
            for (i, f) in pdus.iter().enumerate() {
                // pdu_decode: selector (digests as captured, the largest segment limit, a
                // chunk size that varies), then the framed PDU.
                let kind = match &f.pdu.header {
                    Header::ScsiCommand(c) => c.cdb[0],
                    other => other.opcode() | 0x80,
                };
                let seen = match per_kind.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, n)) => {
                        *n += 1;
                        *n
                    }
                    None => {
                        per_kind.push((kind, 1));
                        1
                    }
                };
                if seen <= 3 {
                    let sel = u8::from(f.header_digest)
                        | u8::from(f.data_digest) << 1
                        | 3 << 2
                        | ((i % 16) as u8) << 4;
                    let mut data = vec![sel];
                    data.extend_from_slice(&f.raw);
                    push("pdu_decode", format!("{name}-{side}{i:03}"), data);
                }
                // text_ltds: login and text data segments.
                let is_text = matches!(
                    f.pdu.header,
                    Header::LoginRequest(_)
                        | Header::LoginResponse(_)
                        | Header::TextRequest(_)
                        | Header::TextResponse(_)
                );
                if is_text {
                    let sel = ((i % 16) as u8) << 2;
                    push(
                        "text_ltds",
                        format!("{name}-{side}{i:03}"),
                        text_seed(sel, &f.pdu.data),
                    );
                }
                // cdb: selector for the CDB length, the CDB, immediate data as Data-Out.
                if let (Header::ScsiCommand(c), true) = (&f.pdu.header, seen <= 3) {
                    let len = cdb_len(c.cdb[0]);
                    let mut data = vec![(len - 6) as u8];
                    data.extend_from_slice(&c.cdb[..len]);
                    data.extend_from_slice(&f.pdu.data[..f.pdu.data.len().min(4096)]);
                    push("cdb", format!("{name}-{i:03}"), data);
                }
            }
            // A whole login exchange (both directions) as one stream.
            let login: Vec<u8> = pdus
                .iter()
                .take_while(|f| {
                    matches!(
                        f.pdu.header,
                        Header::LoginRequest(_) | Header::LoginResponse(_)
                    )
                })
                .flat_map(|f| f.raw.iter().copied())
                .collect();
            if side == "i" && !login.is_empty() {
                // login: the initiator's Login Requests, as the state machine receives them.
                push("login", name.clone(), login.clone());
                let mut data = vec![3 << 2];
                data.extend_from_slice(&login);
                push("pdu_decode", format!("{name}-login"), data);
            }
        }
    }
    out
}
