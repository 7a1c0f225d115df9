//! Every captured stream decodes into whole PDUs and re-encodes byte for byte (STYLE §8,
//! golden bytes). A difference names the stream, the PDU and the first differing byte, so a
//! field the codec drops shows up as a BHS offset.

use crate::capture::{self, Connection, Decoded, Digests, IndexRow};
use iscsi_proto::Codec;

/// Every `.bin` file under `testdata/` is listed in `index.tsv`, and the other way round.
#[test]
fn index_lists_every_capture() {
    let mut on_disk = Vec::new();
    for client in ["libiscsi", "open-iscsi"] {
        let dir = capture::testdata().join(client);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let name = entry.expect("dir entry").file_name();
            let name = name.to_str().expect("UTF-8 file name");
            if name.ends_with(".bin") {
                on_disk.push(format!("{client}/{name}"));
            }
        }
    }
    on_disk.sort();
    let mut listed: Vec<String> = capture::index().into_iter().map(|r| r.file).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    assert!(on_disk.len() >= 40, "goldens present ({})", on_disk.len());
}

fn check_direction(
    row: &IndexRow,
    bytes: &[u8],
    decoded: &Decoded,
    conn: &Connection,
    failures: &mut Vec<String>,
) {
    let file = &row.file;
    if bytes.len() != row.bytes {
        failures.push(format!(
            "{file}: {} bytes, index says {}",
            bytes.len(),
            row.bytes
        ));
    }
    if decoded.pdus.len() != row.pdus {
        failures.push(format!(
            "{file}: decoded {} PDUs, index says {}",
            decoded.pdus.len(),
            row.pdus
        ));
    }
    // Whole PDUs only, unless the capture was cut; then the remainder must be a prefix of a
    // PDU (the decoder asked for more bytes instead of failing).
    if !decoded.rest.is_empty() {
        if row.truncated {
            let last = decoded
                .pdus
                .last()
                .map_or(Digests::default(), |f| f.digests);
            let mut codec = Codec {
                header_digest: last.header,
                data_digest: last.data,
                ..Codec::default()
            };
            let mut rest = decoded.rest.clone();
            if !matches!(codec.decode(&mut rest), Ok(None)) {
                failures.push(format!("{file}: remainder is not an incomplete PDU"));
            }
        } else {
            failures.push(format!(
                "{file}: {} bytes left after the last PDU",
                decoded.rest.len()
            ));
        }
    }
    let expected_ffp = conn.login.completed.then_some(conn.login.login_pdus);
    if row.first_ffp_pdu != expected_ffp {
        failures.push(format!(
            "{file}: first full-feature PDU {expected_ffp:?} from the login, index says {:?}",
            row.first_ffp_pdu
        ));
    }
    if row.digests != conn.login.digests.column() {
        failures.push(format!(
            "{file}: login negotiated digests {}, index says {}",
            conn.login.digests.column(),
            row.digests
        ));
    }
    // Re-encode PDU by PDU to report the first difference precisely.
    let mut whole = Vec::with_capacity(bytes.len());
    for (i, framed) in decoded.pdus.iter().enumerate() {
        let wire = capture::encode(framed);
        let original = &bytes[framed.offset..framed.offset + framed.len];
        if &wire[..] != original {
            let at = wire
                .iter()
                .zip(original)
                .position(|(a, b)| a != b)
                .unwrap_or(wire.len().min(original.len()));
            failures.push(format!(
                "{file}: PDU {i} (opcode {:#04x}, offset {}) re-encodes differently at byte {at} \
                 of the PDU: {:02x?} vs captured {:02x?} (lengths {} vs {})",
                framed.pdu.opcode(),
                framed.offset,
                wire.get(at),
                original.get(at),
                wire.len(),
                original.len(),
            ));
        }
        whole.extend_from_slice(&wire);
    }
    let consumed = bytes.len() - decoded.rest.len();
    if whole[..] != bytes[..consumed] {
        failures.push(format!(
            "{file}: re-encoded stream differs from the capture"
        ));
    }
}

/// Decode every stream, re-encode every PDU with the same codec settings, compare.
#[test]
fn every_stream_round_trips() {
    let conns = capture::connections();
    let mut failures = Vec::new();
    let mut streams = 0;
    for conn in &conns {
        check_direction(
            &conn.initiator_row,
            &conn.initiator_bytes,
            &conn.initiator,
            conn,
            &mut failures,
        );
        check_direction(
            &conn.target_row,
            &conn.target_bytes,
            &conn.target,
            conn,
            &mut failures,
        );
        streams += 2;
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(streams, capture::index().len());
    eprintln!("{streams} golden streams round-trip");
}

/// The digest-negotiating captures really carry digests: decoding them without digests
/// must fail or misframe, so the test above is not vacuous.
#[test]
fn digest_streams_need_digests() {
    let conns = capture::connections();
    let with_digests: Vec<_> = conns.iter().filter(|c| c.login.digests.header).collect();
    assert!(!with_digests.is_empty());
    assert!(conns.iter().any(|c| c.login.digests.data));
    for conn in with_digests {
        let plain = capture::decode_stream(
            &conn.name,
            &conn.initiator_bytes,
            usize::MAX,
            Digests::default(),
        );
        assert!(
            plain.pdus.len() != conn.initiator.pdus.len() || !plain.rest.is_empty(),
            "{}: decodes the same without digests",
            conn.name
        );
    }
}
