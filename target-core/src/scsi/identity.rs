//! Who a logical unit says it is: INQUIRY strings, serial number and the NAA designator.
//!
//! Everything is derived from the target IQN and the LUN number with a fixed hash, so a LU
//! keeps its identity across restarts and versions (multipath and filesystems key on it).

/// INQUIRY identification and designators of one logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuIdentity {
    /// T10 VENDOR IDENTIFICATION, 8 ASCII bytes.
    pub vendor: [u8; 8],
    /// PRODUCT IDENTIFICATION, 16 ASCII bytes.
    pub product: [u8; 16],
    /// PRODUCT REVISION LEVEL, 4 ASCII bytes.
    pub revision: [u8; 4],
    /// UNIT SERIAL NUMBER (VPD page 80h): printable ASCII, at most [`MAX_SERIAL_LEN`] bytes.
    pub serial: String,
    /// NAA IEEE Registered Extended (6h) designator (SPC-4 §7.8.6.6.5), 16 bytes.
    pub naa: [u8; 16],
    /// The target's iSCSI name, for the SCSI name string designators.
    pub target_iqn: String,
    /// The LUN number on the target.
    pub lun: u16,
}

/// Longest serial number we report (VPD 80h has a one-byte page length; keep it short).
pub const MAX_SERIAL_LEN: usize = 64;

/// IEEE COMPANY ID of the NAA designator. ktgt has no registered company ID, so this is a
/// locally administered value (the X bit, bit 1 of the first octet, is set), which IEEE never
/// assigns: it cannot collide with a registered vendor's designators.
const COMPANY_ID: u32 = 0x02_6B_74; // 0x02 'k' 't'

impl LuIdentity {
    /// The identity of LUN `lun` of target `target_iqn`. `serial_override` replaces the
    /// derived serial number (non-printable bytes become `_`, long values are cut to
    /// [`MAX_SERIAL_LEN`]).
    pub fn derive(target_iqn: &str, lun: u16, serial_override: Option<&str>) -> LuIdentity {
        let h1 = fnv1a64(FNV_OFFSET, target_iqn.as_bytes(), lun);
        let h2 = fnv1a64(h1 ^ 0x6b74_6774_6e61_6131, target_iqn.as_bytes(), lun);
        let serial = match serial_override {
            Some(s) => s
                .chars()
                .take(MAX_SERIAL_LEN)
                .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
                .collect(),
            None => format!("{h1:016x}"),
        };
        // NAA 6h layout: NAA (4 bits), IEEE COMPANY ID (24), VENDOR SPECIFIC IDENTIFIER (36),
        // VENDOR SPECIFIC IDENTIFIER EXTENSION (64).
        let vsid = u128::from(h1 >> 28);
        let naa = (6u128 << 124) | (u128::from(COMPANY_ID) << 100) | (vsid << 64) | u128::from(h2);
        let mut revision = *b"    ";
        for (d, s) in revision.iter_mut().zip(env!("CARGO_PKG_VERSION").bytes()) {
            *d = s;
        }
        LuIdentity {
            vendor: *b"KTGT    ",
            product: *b"ktgt disk       ",
            revision,
            serial,
            naa: naa.to_be_bytes(),
            target_iqn: target_iqn.to_owned(),
            lun,
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `name`, a separator and the LUN number. Fixed by definition, so stable across
/// Rust versions (unlike `std::hash`).
fn fnv1a64(seed: u64, name: &[u8], lun: u16) -> u64 {
    let mut h = seed;
    for &b in name.iter().chain(&[0u8]).chain(&lun.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_distinct() {
        let a = LuIdentity::derive("iqn.2024-01.io.ktgt:a", 1, None);
        let b = LuIdentity::derive("iqn.2024-01.io.ktgt:a", 1, None);
        let c = LuIdentity::derive("iqn.2024-01.io.ktgt:a", 2, None);
        assert_eq!(a, b);
        assert_ne!(a.naa, c.naa);
        assert_ne!(a.serial, c.serial);
        assert_eq!(a.naa[0] >> 4, 6);
        // Golden values: changing the derivation changes every deployed LU's identity (and
        // breaks multipath and anything else keyed on it). Never update these.
        assert_eq!(a.serial, "158879b2a97f4ea7");
        assert_eq!(
            a.naa,
            [
                0x60, 0x26, 0xb7, 0x41, 0x58, 0x87, 0x9b, 0x2a, 0x4c, 0xcc, 0x37, 0x87, 0x7a, 0xc9,
                0xaa, 0x14
            ]
        );
    }

    #[test]
    fn serial_override_is_sanitised() {
        let id = LuIdentity::derive("iqn.x", 0, Some("ab\u{7}c\u{e9}"));
        assert_eq!(id.serial, "ab_c_");
        let long = "x".repeat(200);
        assert_eq!(
            LuIdentity::derive("iqn.x", 0, Some(&long)).serial.len(),
            MAX_SERIAL_LEN
        );
    }
}
