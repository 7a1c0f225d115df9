//! Text key=value data (RFC 7143 §6.1): parsing, building, multi-PDU assembly and splitting,
//! and value encodings (numbers, booleans, lists, binary).
//!
//! Parsing borrows from the data segment: [`parse`] returns `(key, value)` string slices in
//! wire order. [`TextAssembler`] joins a logical-text-data-segment (LTDS) spread over several
//! PDUs with the C bit, with caps on bytes and PDU count. [`split_text`] cuts outgoing text to
//! the peer's MaxRecvDataSegmentLength.

use bytes::{Bytes, BytesMut};

/// Key names: RFC 7143 §6.1, standard-label: "... A standard-label MUST begin with a capital
/// letter and must not exceed 63 characters." (`iSCSIProtocolLevel`, §13.24, begins with a
/// lower-case letter, so we accept any letter first.)
pub const MAX_KEY_LEN: usize = 63;

/// RFC 7143 §6.1: "The maximum length of an individual value (not its encoded representation)
/// is 255 bytes, not including the delimiter (comma or zero byte)." Applies to simple values
/// and to each element of a list; binary values are checked on their decoded length.
pub const MAX_VALUE_LEN: usize = 255;

/// Cap on one raw value as it appears on the wire. The longest legitimate one is a CHAP binary
/// value of 1024 bytes (RFC 7143 §12.1.3) in hex: `0x` plus 2048 digits. Lists of short values
/// also fit.
pub const MAX_RAW_VALUE_LEN: usize = 2 + 2 * 1024;

/// Default cap on the bytes of one LTDS. RFC 7143 §6.1 requires receiving "at least 8192
/// bytes of key=value data in a negotiation sequence" (64 KiB when an authentication method
/// needs long items); we accept 64 KiB.
pub const DEFAULT_MAX_LTDS_BYTES: usize = 64 * 1024;

/// Default cap on the PDUs of one LTDS (h2's CONTINUATION-flood lesson: cap the count, not only
/// the bytes, so that empty continuation PDUs cannot spin us forever).
pub const DEFAULT_MAX_LTDS_PDUS: u32 = 32;

/// Reserved answer constants (RFC 7143 §6.2: "The constants "None", "Reject", "Irrelevant",
/// and "NotUnderstood" are reserved and MUST ONLY be used as described here.").
pub const NONE: &str = "None";
/// See [`NONE`].
pub const REJECT: &str = "Reject";
/// See [`NONE`].
pub const IRRELEVANT: &str = "Irrelevant";
/// See [`NONE`].
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
/// Boolean value "Yes" (RFC 7143 §6.1, boolean-value).
pub const YES: &str = "Yes";
/// Boolean value "No".
pub const NO: &str = "No";

/// Malformed or oversized text. Small and `Copy`; the login and session code map it to a
/// status (initiator error) or a Reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// A pair without `=`.
    #[error("key=value pair without '='")]
    MissingEquals,
    /// Empty, too long, or bad characters in a key name.
    #[error("invalid key name")]
    InvalidKey,
    /// A raw value longer than [`MAX_RAW_VALUE_LEN`].
    #[error("value too long")]
    ValueTooLong,
    /// Not UTF-8 (RFC 7143 §6.1: "key=value pairs encoded in UTF-8 Unicode").
    #[error("text is not UTF-8")]
    NotUtf8,
    /// RFC 7143 §6.1: "Every key=value pair, including the last or only pair in a LTDS, MUST
    /// be followed by one null (0x00) delimiter."
    #[error("last key=value pair is not NUL-terminated")]
    Unterminated,
    /// The same key twice in one LTDS (a key may be negotiated only once per exchange).
    #[error("duplicate key")]
    DuplicateKey,
    /// The LTDS exceeded its byte cap.
    #[error("text spread over PDUs exceeds {max} bytes")]
    TooManyBytes { max: usize },
    /// The LTDS exceeded its PDU-count cap.
    #[error("text spread over more than {max} PDUs")]
    TooManyPdus { max: u32 },
}

/// Parses one complete LTDS into `(key, value)` pairs in wire order.
///
/// Empty entries (two NULs in a row) are skipped: some initiators pad text with NULs.
///
/// # Errors
/// Any [`TextError`] except the assembly caps.
pub fn parse(data: &[u8]) -> Result<Vec<(&str, &str)>, TextError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    if data.is_empty() {
        return Ok(out);
    }
    if data.last() != Some(&0) {
        return Err(TextError::Unterminated);
    }
    // The final NUL terminates the last pair, so split on the body without it.
    for raw in data[..data.len() - 1].split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let pair = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        // RFC 7143 §6.1: "A key-name is whatever precedes the first "=" in the key=value pair."
        let (key, value) = pair.split_once('=').ok_or(TextError::MissingEquals)?;
        check_key(key)?;
        if value.len() > MAX_RAW_VALUE_LEN {
            return Err(TextError::ValueTooLong);
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(TextError::DuplicateKey);
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Checks a key name: 1..=63 bytes, a letter first, then letters, digits, `.`, `-`, `+`, `@`,
/// `_` (RFC 7143 §6.1 standard-label) or `#` (for `X#` keys, §13.22).
fn check_key(key: &str) -> Result<(), TextError> {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > MAX_KEY_LEN || !b[0].is_ascii_alphabetic() {
        return Err(TextError::InvalidKey);
    }
    if b.iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_' | b'#'))
    {
        Ok(())
    } else {
        Err(TextError::InvalidKey)
    }
}

/// Builds outgoing text: `key=value\0` pairs.
#[derive(Debug, Default, Clone)]
pub struct TextBuilder {
    buf: BytesMut,
    keys: Vec<String>,
}

impl TextBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `key=value`. A key already present is not added twice (the first wins), so
    /// that a response never carries a duplicate key.
    pub fn push(&mut self, key: &str, value: &str) -> &mut Self {
        if self.contains(key) {
            return self;
        }
        self.keys.push(key.to_owned());
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"=");
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.extend_from_slice(&[0]);
        self
    }

    /// Appends `key=<decimal>`.
    pub fn push_number(&mut self, key: &str, value: u64) -> &mut Self {
        self.push(key, &value.to_string())
    }

    /// Appends `key=Yes|No`.
    pub fn push_bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.push(key, encode_bool(value))
    }

    /// Whether `key` has been pushed.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }

    /// Whether nothing has been pushed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The encoded text.
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Joins an LTDS spread over PDUs with the C bit (RFC 7143 §6.1: "Data segments in a series
/// of PDUs that have the C bit set to 1 and end with a PDU that has the C bit set to 0, or
/// that include a single PDU that has the C bit set to 0, have to be considered as forming a
/// single logical-text-data-segment (LTDS).").
#[derive(Debug, Clone)]
pub struct TextAssembler {
    buf: BytesMut,
    pdus: u32,
    max_bytes: usize,
    max_pdus: u32,
}

impl Default for TextAssembler {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LTDS_BYTES, DEFAULT_MAX_LTDS_PDUS)
    }
}

impl TextAssembler {
    /// An assembler with the given caps.
    pub fn new(max_bytes: usize, max_pdus: u32) -> Self {
        TextAssembler {
            buf: BytesMut::new(),
            pdus: 0,
            max_bytes,
            max_pdus,
        }
    }

    /// Whether a partial LTDS is buffered.
    pub fn is_partial(&self) -> bool {
        self.pdus > 0
    }

    /// Adds one PDU's data segment. Returns the complete LTDS when `continue_` is false.
    ///
    /// # Errors
    /// [`TextError::TooManyBytes`] or [`TextError::TooManyPdus`] when a cap is exceeded; the
    /// buffered text is dropped.
    pub fn handle_segment(
        &mut self,
        data: &[u8],
        continue_: bool,
    ) -> Result<Option<Bytes>, TextError> {
        self.pdus = self.pdus.saturating_add(1);
        if self.pdus > self.max_pdus {
            self.reset();
            return Err(TextError::TooManyPdus { max: self.max_pdus });
        }
        // Check before buffering (STYLE §3: check lengths against limits before buffering).
        if self.buf.len().saturating_add(data.len()) > self.max_bytes {
            self.reset();
            return Err(TextError::TooManyBytes {
                max: self.max_bytes,
            });
        }
        self.buf.extend_from_slice(data);
        if continue_ {
            return Ok(None);
        }
        self.pdus = 0;
        Ok(Some(self.buf.split().freeze()))
    }

    /// Drops any partial LTDS.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pdus = 0;
    }
}

/// Splits outgoing text into chunks of at most `max` bytes (the peer's
/// MaxRecvDataSegmentLength). The caller sets the C bit on all but the last chunk (RFC 7143
/// §6.1: "An initiator or target that sends partial key=value text within a PDU indicates that
/// more text follows by setting the C bit ... to 1."). Empty text gives one empty chunk. A
/// `max` of 0 is treated as 1.
pub fn split_text(text: Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(1);
    if text.len() <= max {
        return vec![text];
    }
    let mut rest = text;
    let mut out = Vec::with_capacity(rest.len() / max + 1);
    while rest.len() > max {
        out.push(rest.split_to(max));
    }
    out.push(rest);
    out
}

/// Bad value encodings (RFC 7143 §6.1 value formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Not a number in any accepted encoding.
    #[error("not a number")]
    NotANumber,
    /// A number outside the key's range.
    #[error("number {value} outside {min}..={max}")]
    OutOfRange { value: u64, min: u64, max: u64 },
    /// Not `Yes` or `No`.
    #[error("not a boolean")]
    NotABoolean,
    /// Not `0x` hex or `0b` base64.
    #[error("bad binary value")]
    BadBinary,
    /// A value (or decoded binary value) longer than allowed.
    #[error("value too long")]
    TooLong,
}

/// Parses a numerical value: decimal, `0x` hex, or `0b` base64 (RFC 7143 §6.1:
/// "regular-binary-value ... decimal-constant, hex-constant, or base64-constant"), less than
/// 2^64.
///
/// # Errors
/// [`ValueError::NotANumber`].
pub fn parse_number(s: &str) -> Result<u64, ValueError> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let digits = hex.trim_start_matches('0');
        if hex.is_empty() || digits.len() > 16 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(ValueError::NotANumber);
        }
        return u64::from_str_radix(if digits.is_empty() { "0" } else { digits }, 16)
            .map_err(|_| ValueError::NotANumber);
    }
    if s.starts_with("0b") || s.starts_with("0B") {
        let bytes = decode_binary(s, 8).map_err(|_| ValueError::NotANumber)?;
        if bytes.is_empty() {
            return Err(ValueError::NotANumber);
        }
        return Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)));
    }
    // RFC 7143 §6.1 decimal-constant: digits only (no sign, no spaces).
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(ValueError::NotANumber);
    }
    s.parse::<u64>().map_err(|_| ValueError::NotANumber)
}

/// [`parse_number`] with a range check.
///
/// # Errors
/// [`ValueError::NotANumber`] or [`ValueError::OutOfRange`].
pub fn parse_number_in(s: &str, min: u64, max: u64) -> Result<u64, ValueError> {
    let value = parse_number(s)?;
    if value < min || value > max {
        return Err(ValueError::OutOfRange { value, min, max });
    }
    Ok(value)
}

/// Parses `Yes` or `No` (case-sensitive, RFC 7143 §6.1: "All the text keys and text values
/// specified in this document are case sensitive").
///
/// # Errors
/// [`ValueError::NotABoolean`].
pub fn parse_bool(s: &str) -> Result<bool, ValueError> {
    match s {
        YES => Ok(true),
        NO => Ok(false),
        _ => Err(ValueError::NotABoolean),
    }
}

/// `Yes` or `No`.
pub fn encode_bool(b: bool) -> &'static str {
    if b {
        YES
    } else {
        NO
    }
}

/// Splits a list-of-values (RFC 7143 §6.1: "A list-of-values ... separated by comma").
/// Empty elements are dropped.
pub fn parse_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|v| !v.is_empty())
}

/// Whether `s` is one of the reserved answer constants that must not be offered (RFC 7143
/// §6.2: "Violation of this rule is a protocol error (in particular, the use of "Reject",
/// "Irrelevant", and "NotUnderstood" as proposed values).").
pub fn is_reserved_answer(s: &str) -> bool {
    matches!(s, REJECT | IRRELEVANT | NOT_UNDERSTOOD)
}

/// Decodes a binary value: `0x`/`0X` hex (an odd digit count is allowed: a leading zero is
/// implied) or `0b`/`0B` base64 (RFC 7143 §6.1 hex-constant, base64-constant). At most
/// `max_len` decoded bytes; the check happens before decoding allocates.
///
/// # Errors
/// [`ValueError::BadBinary`] or [`ValueError::TooLong`].
pub fn decode_binary(s: &str, max_len: usize) -> Result<Vec<u8>, ValueError> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() {
            return Err(ValueError::BadBinary);
        }
        if hex.len().div_ceil(2) > max_len {
            return Err(ValueError::TooLong);
        }
        let mut digits = hex.bytes();
        let mut out = Vec::with_capacity(hex.len().div_ceil(2));
        if hex.len() % 2 == 1 {
            let d = digits
                .next()
                .and_then(hex_digit)
                .ok_or(ValueError::BadBinary)?;
            out.push(d);
        }
        while let (Some(h), Some(l)) = (digits.next(), digits.next()) {
            let (h, l) = (
                hex_digit(h).ok_or(ValueError::BadBinary)?,
                hex_digit(l).ok_or(ValueError::BadBinary)?,
            );
            out.push((h << 4) | l);
        }
        return Ok(out);
    }
    if let Some(b64) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        if b64.len() / 4 * 3 > max_len.saturating_add(2) {
            return Err(ValueError::TooLong);
        }
        let out = base64_decode(b64).ok_or(ValueError::BadBinary)?;
        if out.len() > max_len {
            return Err(ValueError::TooLong);
        }
        return Ok(out);
    }
    Err(ValueError::BadBinary)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Encodes bytes as a `0x` hex binary value (lower case), the form libiscsi and open-iscsi
/// both accept.
pub fn encode_hex(data: &[u8]) -> String {
    let mut s = String::with_capacity(2 + data.len() * 2);
    s.push_str("0x");
    s.push_str(&hex::encode(data));
    s
}

/// Encodes bytes as a `0b` base64 binary value (RFC 4648 alphabet, with padding).
pub fn encode_base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(2 + data.len().div_ceil(3) * 4);
    s.push_str("0b");
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decodes RFC 4648 base64, padding optional. `None` on bad characters or lengths.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let trimmed = s.trim_end_matches('=');
    // RFC 7143 §6.1: base64-constant is "0b" or "0B" "followed by 1 or more digits or letters
    // or plus or slash or equals"; an empty value ("0b", "0b==") is not a binary value.
    if trimmed.is_empty() || s.len() - trimmed.len() > 2 || trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in trimmed.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs_in_order() {
        let p = parse(b"InitiatorName=iqn.x:y\0SessionType=Normal\0Empty=\0").unwrap();
        assert_eq!(
            p,
            vec![
                ("InitiatorName", "iqn.x:y"),
                ("SessionType", "Normal"),
                ("Empty", "")
            ]
        );
        // The value may contain '=' (only the first one splits).
        assert_eq!(parse(b"A=b=c\0").unwrap(), vec![("A", "b=c")]);
        assert_eq!(parse(b"").unwrap(), vec![]);
        assert_eq!(
            parse(b"A=1\0\0\0B=2\0").unwrap(),
            vec![("A", "1"), ("B", "2")]
        );
    }

    #[test]
    fn rejects_malformed_text() {
        assert_eq!(parse(b"A=1"), Err(TextError::Unterminated));
        assert_eq!(parse(b"A\0"), Err(TextError::MissingEquals));
        assert_eq!(parse(b"=1\0"), Err(TextError::InvalidKey));
        assert_eq!(parse(b"1A=1\0"), Err(TextError::InvalidKey));
        assert_eq!(parse(b"A B=1\0"), Err(TextError::InvalidKey));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::DuplicateKey));
        assert_eq!(parse(b"A=\xff\0"), Err(TextError::NotUtf8));
        let long_key = format!("{}=1\0", "K".repeat(64));
        assert_eq!(parse(long_key.as_bytes()), Err(TextError::InvalidKey));
        let ok_key = format!("{}=1\0", "K".repeat(63));
        assert!(parse(ok_key.as_bytes()).is_ok());
        let long_value = format!("A={}\0", "v".repeat(MAX_RAW_VALUE_LEN + 1));
        assert_eq!(parse(long_value.as_bytes()), Err(TextError::ValueTooLong));
        assert!(parse(b"X#NodeArchitecture=a\0iSCSIProtocolLevel=1\0X-com.x=1\0").is_ok());
    }

    #[test]
    fn builder_round_trips_and_skips_duplicates() {
        let mut b = TextBuilder::new();
        b.push("A", "1")
            .push_number("B", 2)
            .push_bool("C", true)
            .push("A", "x");
        let t = b.finish();
        assert_eq!(&t[..], b"A=1\0B=2\0C=Yes\0");
        assert_eq!(
            parse(&t).unwrap(),
            vec![("A", "1"), ("B", "2"), ("C", "Yes")]
        );
    }

    #[test]
    fn assembler_joins_and_caps() {
        let mut a = TextAssembler::new(16, 3);
        assert_eq!(a.handle_segment(b"A=1\0B", true).unwrap(), None);
        assert!(a.is_partial());
        let t = a.handle_segment(b"=2\0", false).unwrap().unwrap();
        assert_eq!(&t[..], b"A=1\0B=2\0");
        assert!(!a.is_partial());

        assert_eq!(
            a.handle_segment(&[b'x'; 17], false),
            Err(TextError::TooManyBytes { max: 16 })
        );
        for _ in 0..3 {
            assert_eq!(a.handle_segment(b"", true).unwrap(), None);
        }
        assert_eq!(
            a.handle_segment(b"", true),
            Err(TextError::TooManyPdus { max: 3 })
        );
        // After an error the assembler starts over.
        assert_eq!(
            &a.handle_segment(b"A=1\0", false).unwrap().unwrap()[..],
            b"A=1\0"
        );
    }

    #[test]
    fn splitter_respects_max() {
        let chunks = split_text(Bytes::from_static(b"0123456789"), 4);
        assert_eq!(chunks, vec!["0123", "4567", "89"]);
        assert_eq!(split_text(Bytes::new(), 4), vec![Bytes::new()]);
        assert_eq!(split_text(Bytes::from_static(b"abcd"), 4).len(), 1);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("8192"), Ok(8192));
        assert_eq!(parse_number("0x2000"), Ok(8192));
        assert_eq!(parse_number("0X0000000000000000002000"), Ok(8192));
        assert_eq!(parse_number("0bIAA="), Ok(0x2000));
        assert_eq!(parse_number("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x",
            "0xg",
            "18446744073709551616",
            "0x1_0",
        ] {
            assert_eq!(parse_number(bad), Err(ValueError::NotANumber), "{bad:?}");
        }
        assert_eq!(
            parse_number_in("511", 512, 16_777_215),
            Err(ValueError::OutOfRange {
                value: 511,
                min: 512,
                max: 16_777_215
            })
        );
    }

    #[test]
    fn booleans_and_lists() {
        assert_eq!(parse_bool("Yes"), Ok(true));
        assert_eq!(parse_bool("No"), Ok(false));
        assert_eq!(parse_bool("yes"), Err(ValueError::NotABoolean));
        assert_eq!(
            parse_list("CRC32C,None").collect::<Vec<_>>(),
            ["CRC32C", "None"]
        );
        assert_eq!(parse_list("a,,b,").collect::<Vec<_>>(), ["a", "b"]);
        assert!(is_reserved_answer("Reject") && !is_reserved_answer("None"));
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0102ff", 16).unwrap(), vec![1, 2, 0xff]);
        assert_eq!(decode_binary("0x102", 16).unwrap(), vec![1, 2]);
        assert_eq!(decode_binary("0bAQL/", 16).unwrap(), vec![1, 2, 0xff]);
        assert_eq!(decode_binary("0x0102", 1), Err(ValueError::TooLong));
        assert_eq!(decode_binary("0xzz", 4), Err(ValueError::BadBinary));
        assert_eq!(decode_binary("0x", 4), Err(ValueError::BadBinary));
        assert_eq!(decode_binary("12", 4), Err(ValueError::BadBinary));
        assert_eq!(decode_binary("0b!!!!", 4), Err(ValueError::BadBinary));
        assert_eq!(encode_hex(&[0xab, 1]), "0xab01");
        assert_eq!(encode_base64(&[1, 2, 0xff]), "0bAQL/");
        assert_eq!(encode_base64(&[1]), "0bAQ==");
    }

    proptest! {
        #[test]
        fn base64_round_trips(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let enc = encode_base64(&data);
            if data.is_empty() {
                // "0b" has no digits: not a base64-constant (RFC 7143 §6.1), like "0x".
                prop_assert_eq!(decode_binary(&enc, 64), Err(ValueError::BadBinary));
            } else {
                prop_assert_eq!(decode_binary(&enc, 64).unwrap(), data.clone());
            }
            prop_assert_eq!(decode_binary(&encode_hex(&data), 64).ok(),
                if data.is_empty() { None } else { Some(data) });
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&data);
        }

        #[test]
        fn builder_output_parses(pairs in proptest::collection::vec(("[A-Z][a-zA-Z0-9]{0,10}", "[a-z0-9:.,]{0,20}"), 0..8)) {
            let mut b = TextBuilder::new();
            for (k, v) in &pairs { b.push(k, v); }
            let t = b.finish();
            let parsed = parse(&t).unwrap();
            prop_assert!(parsed.len() <= pairs.len());
        }
    }
}
