//! Hooks for fuzz targets (`fuzz/`). Not a stable interface.
//!
//! Each hook takes the fuzzer's bytes, never panics on any input unless an invariant it
//! asserts is broken, and is also called from unit tests and the seed-replay smoke run, so
//! the targets in `fuzz/fuzz_targets/` are one line each (STYLE §10, after rustls's
//! `internal` module).

use bytes::BytesMut;

use crate::codec::{Codec, ConnectionAction, PRE_NEGOTIATION_MAX_DATA};
use crate::text::{self, TextAssembler, TextBuilder, TextError};

pub use crate::login::fuzz_login;

/// MaxRecvDataSegmentLength values the decode hook picks from: the RFC 7143 §13.12 minimum,
/// the default, a large value, and the pre-negotiation limit.
const MAX_RECV: [u32; 4] = [512, 8192, 262_144, PRE_NEGOTIATION_MAX_DATA];

/// PDU framing. The first byte picks the codec settings (bit 0 header digest, bit 1 data
/// digest, bits 2–3 MaxRecvDataSegmentLength, bits 4–7 a chunk size for incremental
/// feeding); the rest is a byte stream.
///
/// # Invariants
/// - Every PDU that decodes re-encodes to as many bytes as it consumed, and those bytes
///   decode to the same PDU (and re-encode to themselves).
/// - Feeding the stream in chunks gives the same PDUs and errors as feeding it whole.
/// - A PDU decoded without digests survives encode/decode with the selected digests (so the
///   digest paths run with valid digests, which the fuzzer rarely forges).
/// - A `Reject` error consumed exactly one PDU; decoding stops at `Drop` or `Ok(None)`.
pub fn fuzz_pdu_decode(data: &[u8]) {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let codec = Codec {
        header_digest: sel & 1 != 0,
        data_digest: sel & 2 != 0,
        max_recv_data_segment_length: MAX_RECV[usize::from((sel >> 2) & 3)],
    };
    let whole = decode_all(&codec, stream, stream.len().max(1));
    let chunk = 1 + usize::from(sel >> 4) * 7;
    let chunked = decode_all(&codec, stream, chunk);
    // Errors compare by what they require of the connection: which of two fatal checks (a
    // header digest, or a length over the limit) fires first may depend on how much of the
    // header has arrived.
    let actions = |v: &[Outcome]| -> Vec<Result<crate::Pdu, ConnectionAction>> {
        v.iter()
            .map(|o| o.clone().map_err(|e| e.action()))
            .collect()
    };
    assert_eq!(
        actions(&whole),
        actions(&chunked),
        "chunked feeding (chunk {chunk}) changed the result"
    );

    for outcome in &whole {
        let Ok(pdu) = outcome else { continue };
        let wire = codec.encode_to_bytes(pdu);
        let mut again = BytesMut::from(&wire[..]);
        let back = codec.clone().decode(&mut again);
        assert_eq!(
            back.as_ref(),
            Ok(&Some(pdu.clone())),
            "re-encoded PDU decodes differently"
        );
        assert!(again.is_empty(), "re-encoded PDU left bytes over");
        assert_eq!(
            codec.encode_to_bytes(pdu),
            wire,
            "encoding is deterministic"
        );
    }

    let plain = Codec {
        header_digest: false,
        data_digest: false,
        ..codec.clone()
    };
    for outcome in decode_all(&plain, stream, stream.len().max(1)) {
        let Ok(pdu) = outcome else { continue };
        let wire = codec.encode_to_bytes(&pdu);
        let mut again = BytesMut::from(&wire[..]);
        let back = codec.clone().decode(&mut again);
        assert_eq!(
            back,
            Ok(Some(pdu)),
            "PDU does not survive the digest round trip"
        );
        assert!(again.is_empty());
    }
}

/// One decode result per PDU: the PDU, or the error that ended it.
type Outcome = Result<crate::Pdu, crate::DecodeError>;

/// Decodes `stream` fed `chunk` bytes at a time, as a connection would, until the stream is
/// exhausted or an error requires the connection to close.
fn decode_all(codec: &Codec, stream: &[u8], chunk: usize) -> Vec<Outcome> {
    let mut codec = codec.clone();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut out = Vec::new();
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(pdu)) => {
                let consumed = before - buf.len();
                let wire = codec.encode_to_bytes(&pdu);
                assert_eq!(consumed, wire.len(), "re-encoding changes the frame length");
                out.push(Ok(pdu));
            }
            Ok(None) => {
                if fed == stream.len() {
                    return out;
                }
                let end = (fed + chunk).min(stream.len());
                buf.extend_from_slice(&stream[fed..end]);
                fed = end;
            }
            Err(e) => {
                let drop = e.action() == ConnectionAction::Drop;
                out.push(Err(e));
                if drop || out.len() > 4096 {
                    return out;
                }
            }
        }
    }
}

/// LTDS caps the text hook picks from (bytes, PDUs), including the defaults.
const CAPS: [(usize, u32); 4] = [
    (text::DEFAULT_MAX_LTDS_BYTES, text::DEFAULT_MAX_LTDS_PDUS),
    (8192, 4),
    (300, 2),
    (0, 1),
];

/// Text across PDUs with the C bit. The first byte picks the caps ([`CAPS`]) and a split size;
/// then each segment is a control byte (bit 7 the C bit, bits 0–6 the length) and that many
/// bytes.
///
/// # Invariants
/// - [`TextAssembler`] behaves like a model: a complete LTDS is exactly the segments since
///   the last completion or error, within both caps; an error means a cap was exceeded.
/// - [`text::parse`] never panics; what it accepts obeys the key and value rules and
///   survives [`TextBuilder`] and parse again.
/// - Value decoders never panic, and binary values round-trip through hex and base64.
/// - [`text::split_text`] pieces rejoin to the LTDS.
pub fn fuzz_text(data: &[u8]) {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let (max_bytes, max_pdus) = CAPS[usize::from(sel & 3)];
    let mut assembler = TextAssembler::new(max_bytes, max_pdus);
    let mut model: Vec<u8> = Vec::new();
    let mut model_pdus = 0u32;
    while let Some((&ctl, tail)) = rest.split_first() {
        let len = usize::from(ctl & 0x7f).min(tail.len());
        let (seg, tail) = tail.split_at(len);
        rest = tail;
        let continue_ = ctl & 0x80 != 0;
        model_pdus += 1;
        match assembler.handle_segment(seg, continue_) {
            Ok(None) => {
                assert!(continue_, "a final segment must complete the LTDS");
                model.extend_from_slice(seg);
                assert!(model.len() <= max_bytes && model_pdus <= max_pdus);
                assert!(assembler.is_partial());
            }
            Ok(Some(ltds)) => {
                assert!(!continue_, "a C-bit segment must not complete the LTDS");
                model.extend_from_slice(seg);
                assert_eq!(&ltds[..], &model[..], "LTDS differs from its segments");
                assert!(
                    ltds.len() <= max_bytes && model_pdus <= max_pdus,
                    "caps ignored"
                );
                assert!(!assembler.is_partial());
                check_ltds(&ltds, usize::from(sel >> 2) * 5 + 1);
                model.clear();
                model_pdus = 0;
            }
            Err(TextError::TooManyPdus { max }) => {
                assert_eq!(max, max_pdus);
                assert!(model_pdus > max_pdus, "PDU cap reported early");
                assert!(!assembler.is_partial(), "buffered text kept after an error");
                model.clear();
                model_pdus = 0;
            }
            Err(TextError::TooManyBytes { max }) => {
                assert_eq!(max, max_bytes);
                assert!(
                    model.len() + seg.len() > max_bytes,
                    "byte cap reported early"
                );
                assert!(!assembler.is_partial(), "buffered text kept after an error");
                model.clear();
                model_pdus = 0;
            }
            Err(e) => panic!("assembler returned a parse error: {e}"),
        }
    }
    // The whole input as one LTDS too, so that parse sees long text without caps.
    check_ltds(&data[1..], 64);
}

fn check_ltds(ltds: &[u8], split: usize) {
    let pieces = text::split_text(bytes::Bytes::copy_from_slice(ltds), split);
    assert!(pieces.iter().all(|p| p.len() <= split));
    assert_eq!(pieces.concat(), ltds, "split_text lost bytes");

    let Ok(pairs) = text::parse(ltds) else {
        return;
    };
    let mut builder = TextBuilder::new();
    for (i, &(key, value)) in pairs.iter().enumerate() {
        assert!(
            !key.is_empty() && key.len() <= text::MAX_KEY_LEN,
            "key length"
        );
        assert!(
            key.as_bytes()[0].is_ascii_alphabetic(),
            "key starts with a letter"
        );
        assert!(!key.contains('=') && !key.contains('\0'));
        assert!(value.len() <= text::MAX_RAW_VALUE_LEN, "value length");
        assert!(
            pairs[..i].iter().all(|(k, _)| *k != key),
            "duplicate key accepted"
        );
        builder.push(key, value);
        check_value(value);
    }
    let rebuilt = builder.finish();
    assert_eq!(
        text::parse(&rebuilt).as_deref(),
        Ok(&pairs[..]),
        "rebuilt text differs"
    );
}

fn check_value(value: &str) {
    if let Ok(n) = text::parse_number(value) {
        assert_eq!(text::parse_number(&n.to_string()), Ok(n));
        assert_eq!(text::parse_number(&format!("0x{n:x}")), Ok(n));
    }
    let _ = text::parse_number_in(value, 512, 16_777_215);
    if let Ok(b) = text::parse_bool(value) {
        assert_eq!(text::encode_bool(b), value);
    }
    for item in text::parse_list(value) {
        assert!(!item.is_empty() && !item.contains(','));
        let _ = text::is_reserved_answer(item);
    }
    if let Ok(bin) = text::decode_binary(value, 1024) {
        assert!(bin.len() <= 1024, "binary cap ignored");
        assert_eq!(
            text::decode_binary(&text::encode_hex(&bin), 1024).as_ref(),
            Ok(&bin)
        );
        assert_eq!(
            text::decode_binary(&text::encode_base64(&bin), 1024).as_ref(),
            Ok(&bin)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hooks accept the trivial inputs and a few structured ones (the fuzz crate's seed
    /// replay covers the captured streams).
    #[test]
    fn hooks_smoke() {
        for sel in 0..=255u8 {
            fuzz_pdu_decode(&[sel]);
            fuzz_text(&[sel]);
        }
        fuzz_pdu_decode(&[]);
        fuzz_text(&[]);
        let mut nop = vec![0u8];
        nop.extend_from_slice(&[0x40, 0x80, 0, 0, 0, 0, 0, 5]);
        nop.extend_from_slice(&[0; 40]);
        nop.extend_from_slice(b"hello\0\0\0");
        fuzz_pdu_decode(&nop);
        nop[0] = 0xf3;
        fuzz_pdu_decode(&nop);
        fuzz_text(b"\x00\x85Key=v\x07\0A=0x1\0");
        fuzz_text(b"\x02\x85Key=v\x07\0A=0x1\0\x81\0\x81\0\x81\0");
    }

    /// fuzz/text_ltds found `0b` (empty base64) accepted as an empty binary value while `0x`
    /// was refused; RFC 7143 §6.1 wants at least one digit in both (fixed in text.rs
    /// `base64_decode`). Minimized from fuzz/regressions/text_ltds/empty-base64-value.
    #[test]
    fn regression_empty_base64_value() {
        fuzz_text(b"\x00\x05A=0b\0");
        fuzz_text(b"\x00\x07A=0B==\0");
        for v in ["0b", "0B", "0b=", "0b==", "0x", "0X"] {
            assert_eq!(
                text::decode_binary(v, 1024),
                Err(text::ValueError::BadBinary),
                "{v}"
            );
        }
        assert_eq!(text::decode_binary("0bAA==", 1024), Ok(vec![0]));
    }
}
