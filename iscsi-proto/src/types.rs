//! Wire integers with meaning: task tags, sequence numbers, LUNs, session identifiers.

use std::cmp::Ordering;
use std::fmt;

/// Initiator Task Tag (RFC 7143 §11.1.5). `0xffffffff` is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Itt(pub u32);

impl Itt {
    /// The reserved tag, used by unsolicited PDUs (Async Message, Reject, NOP-In pings).
    pub const RESERVED: Itt = Itt(0xffff_ffff);
}

/// Target Transfer Tag (RFC 7143 §11.7.4, §11.8.4). `0xffffffff` means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ttt(pub u32);

impl Ttt {
    /// "The Target Transfer Tag ... 0xffffffff" means no transfer tag.
    pub const RESERVED: Ttt = Ttt(0xffff_ffff);
}

/// A 32-bit sequence number compared with serial number arithmetic (RFC 1982, as RFC 7143 §4.2.2.1
/// requires for CmdSN, StatSN, DataSN and R2TSN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sn(pub u32);

impl Sn {
    /// `self + n` with wrap-around (RFC 1982 §3.1: addition modulo 2^32). Not `ops::Add`:
    /// serial numbers only add small counts and never add to each other.
    #[must_use]
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, n: u32) -> Sn {
        Sn(self.0.wrapping_add(n))
    }

    /// Serial comparison (RFC 1982 §3.2). Returns `None` when the two are exactly 2^31 apart,
    /// where RFC 1982 leaves the comparison undefined.
    pub fn serial_cmp(self, other: Sn) -> Option<Ordering> {
        let (a, b) = (self.0, other.0);
        if a == b {
            return Some(Ordering::Equal);
        }
        let diff = b.wrapping_sub(a);
        match diff.cmp(&0x8000_0000) {
            Ordering::Less => Some(Ordering::Less),
            Ordering::Greater => Some(Ordering::Greater),
            Ordering::Equal => None,
        }
    }

    /// `self < other` in serial arithmetic.
    pub fn lt(self, other: Sn) -> bool {
        self.serial_cmp(other) == Some(Ordering::Less)
    }

    /// `self <= other` in serial arithmetic.
    pub fn le(self, other: Sn) -> bool {
        matches!(
            self.serial_cmp(other),
            Some(Ordering::Less | Ordering::Equal)
        )
    }

    /// `self > other` in serial arithmetic.
    pub fn gt(self, other: Sn) -> bool {
        self.serial_cmp(other) == Some(Ordering::Greater)
    }
}

impl fmt::Display for Sn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A logical unit number in its 8-byte SAM encoding (SAM-5 §4.7; RFC 7143 §11.2.1.3 carries it
/// verbatim).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// The single-level encoding of LUN `n`: peripheral device addressing for `n < 256`, flat
    /// space addressing (method 01b) for `256..=16383`, as Linux and libiscsi expect.
    /// Returns `None` above 16383, which single-level addressing cannot express.
    pub fn from_number(n: u16) -> Option<Lun> {
        let mut b = [0u8; 8];
        if n < 256 {
            b[1] = n as u8;
        } else if n <= 0x3fff {
            b[0] = 0x40 | (n >> 8) as u8;
            b[1] = (n & 0xff) as u8;
        } else {
            return None;
        }
        Some(Lun(b))
    }

    /// The LUN number of a single-level peripheral or flat address; `None` for hierarchical or
    /// extended addresses, which this target never reports (SAM-5 §4.7.6: such a LUN is not
    /// one of ours and gets LOGICAL UNIT NOT SUPPORTED).
    pub fn number(&self) -> Option<u16> {
        if self.0[2..].iter().any(|&b| b != 0) {
            return None;
        }
        match self.0[0] >> 6 {
            // Peripheral device addressing, bus 0.
            0b00 if self.0[0] == 0 => Some(u16::from(self.0[1])),
            // Flat space addressing.
            0b01 => Some((u16::from(self.0[0] & 0x3f) << 8) | u16::from(self.0[1])),
            _ => None,
        }
    }

    /// As a big-endian u64, the form used in the BHS.
    pub fn as_u64(&self) -> u64 {
        u64::from_be_bytes(self.0)
    }
}

impl fmt::Debug for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number() {
            Some(n) => write!(f, "Lun({n})"),
            None => write!(f, "Lun({:02x?})", self.0),
        }
    }
}

/// Initiator Session ID (RFC 7143 §11.12.5): 6 bytes chosen by the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Isid(pub [u8; 6]);

impl fmt::Display for Isid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Target Session Identifying Handle (RFC 7143 §11.12.6). Zero in a login means "new session".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tsih(pub u16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(Sn(0xffff_fff0).lt(Sn(5)));
        assert!(Sn(5).gt(Sn(0xffff_fff0)));
        assert!(Sn(7).le(Sn(7)));
        assert_eq!(Sn(0).serial_cmp(Sn(0x8000_0000)), None);
        assert_eq!(Sn(u32::MAX).add(2), Sn(1));
    }

    #[test]
    fn lun_encodings() {
        assert_eq!(Lun::from_number(1).unwrap().0, [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Lun::from_number(300).unwrap().0,
            [0x41, 0x2c, 0, 0, 0, 0, 0, 0]
        );
        for n in [0u16, 1, 255, 256, 16383] {
            assert_eq!(Lun::from_number(n).unwrap().number(), Some(n));
        }
        assert!(Lun::from_number(16384).is_none());
        assert_eq!(Lun([0, 1, 0, 0, 0, 0, 0, 1]).number(), None);
        assert_eq!(Lun([0x80, 1, 0, 0, 0, 0, 0, 0]).number(), None);
    }
}
