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
