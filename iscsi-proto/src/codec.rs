//! Framing: PDUs from and into byte buffers, with padding, digests and length limits.
//!
//! Decoding follows tokio-util's contract: incomplete input is `Ok(None)` and the buffer is
//! reserved for the rest of the PDU once its length has been checked against the limits.

use bytes::{BufMut, Bytes, BytesMut};

use crate::pdu::{
    bhs_data_segment_len, bhs_opcode, bhs_total_ahs_len, Bhs, Header, Pdu, RejectReason, BHS_LEN,
};

/// Largest data segment accepted before MaxRecvDataSegmentLength is negotiated. RFC 7143
/// §13.12 defaults MaxRecvDataSegmentLength to 8192; during login we allow what the key's range
/// allows, so a peer that declares a larger value before we answer is not cut off. Text and
/// login payloads are additionally capped by [`crate::text`].
pub const PRE_NEGOTIATION_MAX_DATA: u32 = 16_777_215;

/// Largest data segment a target accepts in the Login Phase. RFC 7143 §13.12:
/// MaxRecvDataSegmentLength "Default is 8192 bytes", and operational keys such as this one take
/// effect only when the Login Phase completes (§6.2), so every Login Request is bounded by the
/// default whatever either side declares. Checked before anything is buffered: an
/// unauthenticated peer can make us hold at most this much per connection.
pub const LOGIN_MAX_DATA: u32 = 8192;

/// Length of a CRC32C digest (RFC 7143 §11.2.4).
pub const DIGEST_LEN: usize = 4;

/// What a decode error requires of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionAction {
    /// The byte stream can no longer be trusted: close the connection (RFC 7143 §7.8, header
    /// digest errors and framing errors at ErrorRecoveryLevel 0).
    Drop,
    /// The PDU was consumed whole: answer with a Reject carrying this reason and the header,
    /// then go on.
    Reject(RejectReason),
}

/// Decode failures. Small, `Copy`, and each knows its consequence ([`DecodeError::action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// RFC 7143 §7.8: "When a target receives any iSCSI PDU with a header digest error, it MUST
    /// either discard the header and all data up to the beginning of a later PDU or close the
    /// connection." The lengths in a corrupt header cannot be trusted, so we close.
    #[error("header digest mismatch (expected {expected:#010x}, received {received:#010x})")]
    HeaderDigest { expected: u32, received: u32 },
    /// RFC 7143 §7.8.1: "When a target or an initiator receives any iSCSI PDU with a payload
    /// digest error, it MUST answer with a Reject PDU with a reason code of Data-Digest-Error and
    /// discard the PDU."
    #[error("data digest mismatch on opcode {opcode:#04x}")]
    DataDigest { opcode: u8, header: [u8; BHS_LEN] },
    /// RFC 7143 §13.12: a PDU's data segment must not exceed the receiver's declared
    /// MaxRecvDataSegmentLength; exceeding it is a protocol error. We refuse to buffer it.
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
}

impl DecodeError {
    /// What the connection must do.
    pub fn action(&self) -> ConnectionAction {
        match self {
            DecodeError::HeaderDigest { .. } | DecodeError::DataSegmentTooLong { .. } => {
                ConnectionAction::Drop
            }
            DecodeError::DataDigest { .. } => {
                ConnectionAction::Reject(RejectReason::DATA_DIGEST_ERROR)
            }
        }
    }
}

/// Framing state of one connection direction pair.
#[derive(Debug, Clone)]
pub struct Codec {
    /// CRC32C header digest in effect (RFC 7143 §13.1).
    pub header_digest: bool,
    /// CRC32C data digest in effect.
    pub data_digest: bool,
    /// Largest data segment this side accepts (our MaxRecvDataSegmentLength).
    pub max_recv_data_segment_length: u32,
}

/// No digests and the largest data segment the key's range allows: what a decoder of a
/// negotiated peer's PDUs starts from before it knows the limit. A target reading Login
/// Requests uses [`Codec::login`] instead.
impl Default for Codec {
    fn default() -> Self {
        Codec {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: PRE_NEGOTIATION_MAX_DATA,
        }
    }
}

/// CRC32C as iSCSI uses it (RFC 7143 §13.1, Castagnoli polynomial), sent little-endian
/// ("the digest is sent least significant byte first", as all implementations do).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

impl Codec {
    /// The codec of a connection in the Login Phase: no digests (they start after login,
    /// RFC 7143 §13.1) and data segments of at most [`LOGIN_MAX_DATA`] bytes.
    pub fn login() -> Codec {
        Codec {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: LOGIN_MAX_DATA,
        }
    }

    /// Total on-wire length of the PDU whose BHS is `bhs`, after validating its lengths.
    fn frame_len(&self, bhs: &Bhs) -> Result<usize, DecodeError> {
        let dlen = bhs_data_segment_len(bhs);
        if dlen > self.max_recv_data_segment_length as usize {
            return Err(DecodeError::DataSegmentTooLong {
                len: dlen as u32,
                max: self.max_recv_data_segment_length,
            });
        }
        let mut total = BHS_LEN + bhs_total_ahs_len(bhs);
        if self.header_digest {
            total += DIGEST_LEN;
        }
        if dlen > 0 {
            total += dlen + padding(dlen);
            if self.data_digest {
                total += DIGEST_LEN;
            }
        }
        Ok(total)
    }

    /// Decodes one PDU from the front of `src`. `Ok(None)`: more bytes are needed (and `src`
    /// has been reserved for them). On `Err`, `src` may hold a partial PDU and the connection
    /// must act as [`DecodeError::action`] says; a `Reject` action has consumed the PDU.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Pdu>, DecodeError> {
        if src.len() < BHS_LEN {
            src.reserve(BHS_LEN - src.len());
            return Ok(None);
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&src[..BHS_LEN]);
        let ahs_len = bhs_total_ahs_len(&bhs);
        if self.header_digest && src.len() >= BHS_LEN + ahs_len + DIGEST_LEN {
            // Check the header before trusting its lengths for buffering.
            self.check_header_digest(&src[..BHS_LEN + ahs_len + DIGEST_LEN])?;
        }
        let total = self.frame_len(&bhs)?;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let frame = src.split_to(total).freeze();
        let mut pos = BHS_LEN;
        let ahs = frame.slice(pos..pos + ahs_len);
        pos += ahs_len;
        if self.header_digest {
            pos += DIGEST_LEN;
        }
        let dlen = bhs_data_segment_len(&bhs);
        let data = frame.slice(pos..pos + dlen);
        if dlen > 0 && self.data_digest {
            let padded = dlen + padding(dlen);
            let expected = crc32c(&frame[pos..pos + padded]);
            let d = &frame[pos + padded..pos + padded + DIGEST_LEN];
            let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            if expected != received {
                return Err(DecodeError::DataDigest {
                    opcode: bhs_opcode(&bhs),
                    header: bhs,
                });
            }
        }
        Ok(Some(Pdu {
            header: Header::parse(&bhs),
            ahs,
            data,
        }))
    }

    fn check_header_digest(&self, hdr: &[u8]) -> Result<(), DecodeError> {
        let (body, d) = hdr.split_at(hdr.len() - DIGEST_LEN);
        let expected = crc32c(body);
        let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        if expected != received {
            return Err(DecodeError::HeaderDigest { expected, received });
        }
        Ok(())
    }

    /// Encodes `pdu` into `dst`: BHS, AHS, header digest, data, padding, data digest.
    pub fn encode(&self, pdu: &Pdu, dst: &mut BytesMut) {
        self.encode_head(pdu, dst);
        dst.extend_from_slice(&pdu.data);
        self.encode_tail(pdu, dst);
    }

    /// Encodes what precedes the data segment (BHS, AHS, header digest). With
    /// [`Codec::encode_tail`] this lets a writer send the data segment from its own buffer
    /// (vectored write) without copying it.
    pub fn encode_head(&self, pdu: &Pdu, dst: &mut BytesMut) {
        let bhs = pdu.header.write(pdu.ahs.len(), pdu.data.len());
        let start = dst.len();
        dst.reserve(BHS_LEN + pdu.ahs.len() + DIGEST_LEN);
        dst.extend_from_slice(&bhs);
        dst.extend_from_slice(&pdu.ahs);
        if self.header_digest {
            let d = crc32c(&dst[start..]);
            dst.put_u32_le(d);
        }
    }

    /// Encodes what follows the data segment (padding and data digest).
    pub fn encode_tail(&self, pdu: &Pdu, dst: &mut BytesMut) {
        let pad = padding(pdu.data.len());
        dst.extend_from_slice(&[0u8; 3][..pad]);
        if self.data_digest && !pdu.data.is_empty() {
            let mut d = crc32c::crc32c(&pdu.data);
            d = crc32c::crc32c_append(d, &[0u8; 3][..pad]);
            dst.put_u32_le(d);
        }
    }

    /// Encodes `pdu` as one contiguous `Bytes` (convenience for tests and small PDUs).
    pub fn encode_to_bytes(&self, pdu: &Pdu) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(pdu, &mut b);
        b.freeze()
    }
}

#[cfg(feature = "codec")]
mod tokio_codec {
    use super::*;

    impl tokio_util::codec::Decoder for Codec {
        type Item = Pdu;
        type Error = CodecError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Pdu>, CodecError> {
            Codec::decode(self, src).map_err(CodecError::Decode)
        }
    }

    impl tokio_util::codec::Encoder<&Pdu> for Codec {
        type Error = CodecError;

        fn encode(&mut self, pdu: &Pdu, dst: &mut BytesMut) -> Result<(), CodecError> {
            Codec::encode(self, pdu, dst);
            Ok(())
        }
    }

    /// tokio-util's codec traits need an error that an I/O error converts into.
    #[derive(Debug, thiserror::Error)]
    pub enum CodecError {
        #[error(transparent)]
        Decode(DecodeError),
        #[error(transparent)]
        Io(#[from] std::io::Error),
    }
}

#[cfg(feature = "codec")]
pub use tokio_codec::CodecError;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{opcode, NopOut, Reject, ScsiCommand, TaskAttr};
    use crate::types::{Itt, Lun, Sn, Ttt};
    use proptest::prelude::*;

    const ALL_OPCODES: [u8; 18] = [
        opcode::NOP_OUT,
        opcode::SCSI_COMMAND,
        opcode::TASK_MGMT_REQUEST,
        opcode::LOGIN_REQUEST,
        opcode::TEXT_REQUEST,
        opcode::DATA_OUT,
        opcode::LOGOUT_REQUEST,
        opcode::SNACK_REQUEST,
        opcode::NOP_IN,
        opcode::SCSI_RESPONSE,
        opcode::TASK_MGMT_RESPONSE,
        opcode::LOGIN_RESPONSE,
        opcode::TEXT_RESPONSE,
        opcode::DATA_IN,
        opcode::LOGOUT_RESPONSE,
        opcode::R2T,
        opcode::ASYNC_MESSAGE,
        opcode::REJECT,
    ];

    fn nop(data: &'static [u8]) -> Pdu {
        Pdu::new(
            Header::NopOut(NopOut {
                immediate: true,
                lun: Lun::from_number(1).unwrap(),
                itt: Itt(7),
                ttt: Ttt::RESERVED,
                cmd_sn: Sn(10),
                exp_stat_sn: Sn(20),
            }),
            Bytes::from_static(data),
        )
    }

    #[test]
    fn golden_nop_out_bytes() {
        // NOP-Out, immediate, LUN 1, ITT 7, TTT ffffffff, CmdSN 10, ExpStatSN 20, 5 data bytes
        // padded to 8 (RFC 7143 §11.18, §11.2.3).
        let b = Codec::default().encode_to_bytes(&nop(b"hello"));
        let expected = hex::decode(concat!(
            "40800000",
            "00000005",
            "0001000000000000",
            "00000007",
            "ffffffff",
            "0000000a",
            "00000014",
            "00000000000000000000000000000000",
            "68656c6c6f000000"
        ))
        .unwrap();
        assert_eq!(&b[..], &expected[..]);
    }

    #[test]
    fn incomplete_is_none_at_every_split() {
        let codec = Codec {
            header_digest: true,
            data_digest: true,
            ..Codec::default()
        };
        let wire = codec.encode_to_bytes(&nop(b"ping data!"));
        for cut in 0..wire.len() {
            let mut c = codec.clone();
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(c.decode(&mut buf), Ok(None), "cut at {cut}");
            buf.extend_from_slice(&wire[cut..]);
            let pdu = c.decode(&mut buf).unwrap().unwrap();
            assert_eq!(pdu, nop(b"ping data!"));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn header_digest_mismatch_drops_connection() {
        let mut codec = Codec {
            header_digest: true,
            ..Codec::default()
        };
        let mut wire = BytesMut::from(&codec.encode_to_bytes(&nop(b""))[..]);
        wire[20] ^= 1;
        let err = codec.decode(&mut wire).unwrap_err();
        assert!(matches!(err, DecodeError::HeaderDigest { .. }));
        assert_eq!(err.action(), ConnectionAction::Drop);
    }

    #[test]
    fn data_digest_mismatch_rejects_and_consumes() {
        let mut codec = Codec {
            data_digest: true,
            ..Codec::default()
        };
        let one = codec.encode_to_bytes(&nop(b"abc"));
        let mut wire = BytesMut::from(&one[..]);
        wire.extend_from_slice(&one);
        wire[BHS_LEN] ^= 0x20; // corrupt the first PDU's data
        let err = codec.decode(&mut wire).unwrap_err();
        assert_eq!(
            err.action(),
            ConnectionAction::Reject(RejectReason::DATA_DIGEST_ERROR)
        );
        // The bad PDU was consumed; the next one decodes.
        assert_eq!(codec.decode(&mut wire).unwrap().unwrap(), nop(b"abc"));
    }

    #[test]
    fn oversized_segment_refused_before_buffering() {
        let mut codec = Codec {
            max_recv_data_segment_length: 8192,
            ..Codec::default()
        };
        let mut bhs = Header::NopOut(match nop(b"").header {
            Header::NopOut(n) => n,
            _ => unreachable!(),
        })
        .write(0, 8193);
        bhs[0] |= 0x40;
        let mut buf = BytesMut::from(&bhs[..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            DecodeError::DataSegmentTooLong {
                len: 8193,
                max: 8192
            }
        );
        assert!(
            buf.capacity() < 8192,
            "nothing reserved for the refused segment"
        );
    }

    #[test]
    fn login_codec_refuses_a_login_segment_over_8192_before_buffering() {
        // A Login Request header (opcode 0x03, immediate) announcing 16 MiB - 1 of data.
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x43;
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        let mut buf = BytesMut::from(&bhs[..]);
        let err = Codec::login().decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            DecodeError::DataSegmentTooLong {
                len: 0xff_ffff,
                max: LOGIN_MAX_DATA
            }
        );
        assert_eq!(err.action(), ConnectionAction::Drop);
        assert!(buf.capacity() < 8192, "nothing reserved for the segment");
        // 8192 itself is within the limit: the codec waits for the rest.
        bhs[5..8].copy_from_slice(&[0x00, 0x20, 0x00]);
        let mut buf = BytesMut::from(&bhs[..]);
        assert!(Codec::login().decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn unknown_opcode_decodes_for_reject() {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x1c;
        let mut buf = BytesMut::from(&bhs[..]);
        let pdu = Codec::default().decode(&mut buf).unwrap().unwrap();
        assert!(matches!(pdu.header, Header::Unknown(_)));
        assert_eq!(pdu.opcode(), 0x1c);
    }

    #[test]
    fn extended_cdb_and_bidi_ahs() {
        // Extended CDB AHS: AHSLength 17 (reserved byte + 16 CDB bytes), type 1; then a
        // bidirectional read length AHS: AHSLength 5, type 2 (RFC 7143 §11.3.4, §11.3.5).
        let mut ahs = vec![0x00, 0x11, 0x01, 0x00];
        ahs.extend(0x10u8..0x20);
        ahs.extend([0x00, 0x05, 0x02, 0x00, 0x00, 0x00, 0x10, 0x00]);
        let pdu = Pdu {
            header: Header::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: true,
                write: false,
                attr: TaskAttr::SIMPLE,
                lun: Lun::default(),
                itt: Itt(1),
                expected_data_transfer_length: 512,
                cmd_sn: Sn(1),
                exp_stat_sn: Sn(1),
                cdb: [0x7f; 16],
            }),
            ahs: Bytes::from(ahs),
            data: Bytes::new(),
        };
        let codec = Codec::default();
        let mut buf = BytesMut::from(&codec.encode_to_bytes(&pdu)[..]);
        let back = codec.clone().decode(&mut buf).unwrap().unwrap();
        assert_eq!(back, pdu);
        assert_eq!(
            &back.extended_cdb().unwrap()[..],
            &(0x10u8..0x20).collect::<Vec<_>>()[..]
        );
        assert_eq!(back.bidi_read_length(), Some(0x1000));
    }

    #[test]
    fn reject_carries_header() {
        let rejected = [0xabu8; BHS_LEN];
        let pdu = Pdu::new(
            Header::Reject(Reject {
                reason: RejectReason::PROTOCOL_ERROR,
                stat_sn: Sn(1),
                exp_cmd_sn: Sn(2),
                max_cmd_sn: Sn(3),
                data_sn: Sn(0),
            }),
            Bytes::copy_from_slice(&rejected),
        );
        let wire = Codec::default().encode_to_bytes(&pdu);
        assert_eq!(wire[0], opcode::REJECT);
        assert_eq!(
            &wire[16..20],
            &[0xff; 4],
            "Reject ITT is reserved 0xffffffff"
        );
        let back = Codec::default()
            .decode(&mut BytesMut::from(&wire[..]))
            .unwrap()
            .unwrap();
        assert_eq!(back, pdu);
    }

    proptest! {
        /// parse -> write -> parse is the identity on typed headers, for every opcode.
        #[test]
        fn bhs_round_trip(raw in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform16(any::<u8>()), op in 0usize..ALL_OPCODES.len(), imm in any::<bool>()) {
            let mut bhs = [0u8; BHS_LEN];
            bhs[..32].copy_from_slice(&raw);
            bhs[32..].copy_from_slice(&tail);
            bhs[0] = ALL_OPCODES[op] | if imm { 0x40 } else { 0 };
            let h1 = Header::parse(&bhs);
            let b2 = h1.write(0, 0);
            let h2 = Header::parse(&b2);
            prop_assert_eq!(&h1, &h2);
            prop_assert_eq!(h2.write(0, 0), b2);
        }

        /// Whole PDUs survive encode/decode with any digest setting and any data length,
        /// including when fed byte by byte in random chunks.
        #[test]
        fn pdu_round_trip(data in proptest::collection::vec(any::<u8>(), 0..3000), hd in any::<bool>(), dd in any::<bool>(), chunk in 1usize..700, itt in any::<u32>()) {
            let codec = Codec { header_digest: hd, data_digest: dd, ..Codec::default() };
            let mut pdu = nop(b"");
            if let Header::NopOut(n) = &mut pdu.header { n.itt = Itt(itt); }
            pdu.data = Bytes::from(data);
            let wire = codec.encode_to_bytes(&pdu);
            prop_assert_eq!(wire.len() % 4, 0);
            let mut c = codec.clone();
            let mut buf = BytesMut::new();
            let mut out = None;
            for piece in wire.chunks(chunk) {
                prop_assert!(out.is_none());
                buf.extend_from_slice(piece);
                out = c.decode(&mut buf).unwrap();
            }
            prop_assert_eq!(out, Some(pdu));
        }

        /// Arbitrary bytes never panic the decoder, and every error says what to do.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), hd in any::<bool>(), dd in any::<bool>()) {
            let mut c = Codec { header_digest: hd, data_digest: dd, max_recv_data_segment_length: 512 };
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..16 {
                match c.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => { let _ = e.action(); break; }
                }
            }
        }
    }
}
