//! iSCSI name checks (RFC 3720 §3.2.6, RFC 3721, RFC 3722, RFC 3980).
//!
//! Three formats:
//! - `iqn.yyyy-mm.reversed.domain[:anything]`
//! - `eui.` followed by 16 hex digits
//! - `naa.` followed by 16 or 32 hex digits
//!
//! RFC 3720 §3.2.6.1: "The encoded representation of an iSCSI name MUST NOT be larger than 223
//! bytes." RFC 3722's stringprep profile case-folds names, so the canonical form is lowercase
//! and the only ASCII punctuation left is `-`, `.` and `:`. We do not run stringprep: an
//! uppercase `iqn.` name is rejected with its lowercase form suggested, rather than silently
//! rewritten (a rewritten target name would differ from what the operator wrote and what the
//! target advertises in SendTargets). The hex digits of `eui.`/`naa.` names may be either case
//! (the RFC's own examples are uppercase).

/// RFC 3720 §3.2.6.1: maximum encoded length of an iSCSI name.
pub const MAX_NAME_BYTES: usize = 223;

/// Checks that `name` is a well-formed iSCSI name. The error is a human-readable reason.
pub fn check_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{} bytes long; the maximum is {MAX_NAME_BYTES} (RFC 3720 §3.2.6.1)",
            name.len()
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".to_owned());
    }
    let lower = name.to_lowercase();
    if let Some(hex) = lower.strip_prefix("eui.") {
        check_prefix_case(name, "eui.")?;
        return check_hex(hex, &[16], "eui.");
    }
    if let Some(hex) = lower.strip_prefix("naa.") {
        check_prefix_case(name, "naa.")?;
        return check_hex(hex, &[16, 32], "naa.");
    }
    if lower.starts_with("iqn.") {
        if name != lower {
            return Err(format!(
                "iSCSI names are compared in lowercase (RFC 3722); write {lower:?}"
            ));
        }
        return check_iqn(&name["iqn.".len()..]);
    }
    Err("must start with \"iqn.\", \"eui.\" or \"naa.\"".to_owned())
}

fn check_prefix_case(name: &str, prefix: &str) -> Result<(), String> {
    if name.starts_with(prefix) {
        Ok(())
    } else {
        Err(format!("the type prefix must be lowercase {prefix:?}"))
    }
}

fn check_hex(hex: &str, lengths: &[usize], prefix: &str) -> Result<(), String> {
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) || !lengths.contains(&hex.len()) {
        let want = match lengths {
            [n] => format!("{n}"),
            _ => lengths
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" or "),
        };
        return Err(format!("{prefix:?} must be followed by {want} hex digits"));
    }
    Ok(())
}

/// `rest` is what follows `iqn.`: `yyyy-mm.naming.authority[:unique]`.
fn check_iqn(rest: &str) -> Result<(), String> {
    const FORMAT: &str = "expected iqn.yyyy-mm.reversed.domain[:identifier]";
    let bytes = rest.as_bytes();
    let date_ok = bytes.len() > 8
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[5..7].iter().all(u8::is_ascii_digit)
        && bytes[7] == b'.';
    if !date_ok {
        return Err(format!("bad date; {FORMAT}"));
    }
    let month = (bytes[5] - b'0') * 10 + (bytes[6] - b'0');
    if !(1..=12).contains(&month) {
        return Err(format!("month {month:02} is not 01..12; {FORMAT}"));
    }
    let after_date = &rest[8..];
    let (authority, unique) = match after_date.split_once(':') {
        Some((a, u)) => (a, Some(u)),
        None => (after_date, None),
    };
    if authority.is_empty() || authority.split('.').any(str::is_empty) {
        return Err(format!("bad naming authority {authority:?}; {FORMAT}"));
    }
    if let Some(c) = authority.chars().find(|&c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || !c.is_ascii())
    }) {
        return Err(format!(
            "character {c:?} is not allowed in the naming authority {authority:?}"
        ));
    }
    if let Some(unique) = unique {
        if unique.is_empty() {
            return Err("nothing after ':'".to_owned());
        }
        if let Some(c) = unique.chars().find(|&c| !allowed(c)) {
            return Err(format!(
                "character {c:?} is not allowed (RFC 3722 allows letters, digits, '-', '.' and ':')"
            ));
        }
    }
    Ok(())
}

fn allowed(c: char) -> bool {
    match c {
        'a'..='z' | '0'..='9' | '-' | '.' | ':' => true,
        // Non-ASCII: RFC 3722 allows most of Unicode after normalisation; refuse only what
        // case folding would change.
        c if !c.is_ascii() => !c.is_uppercase(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfc_examples_and_common_initiators() {
        for ok in [
            "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
            "iqn.2001-04.com.example",
            "iqn.2001-04.com.example:storage.tape1.sys1.xyz",
            "iqn.2004-10.com.ubuntu:01:5c9a3e8f1b2",
            "iqn.1994-05.com.redhat:3f2c1a9b8d7e",
            "iqn.2026-11.io.ktgt:demo",
            "eui.02004567A425678D",
            "eui.02004567a425678d",
            "naa.52004567BA64678D",
            "naa.6001405abcdef0123456789abcdef012",
        ] {
            assert_eq!(check_iscsi_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_malformed_names() {
        let cases = [
            ("", "empty"),
            ("iqn.2001-4.com.example", "bad date"),
            ("iqn.2001-13.com.example", "month 13"),
            ("iqn.2001-04.", "bad date"),
            ("iqn.2001-04.com..example", "naming authority"),
            ("iqn.2001-04.com.example:", "nothing after"),
            ("iqn.2001-04.com.example:disk_1", "'_'"),
            ("iqn.2001-04.com.example:disk 1", "whitespace"),
            (
                "iqn.2001-04.com.Example:disk",
                "write \"iqn.2001-04.com.example:disk\"",
            ),
            ("IQN.2001-04.com.example", "lowercase"),
            ("EUI.02004567A425678D", "lowercase \"eui.\""),
            ("eui.02004567A425678", "16 hex digits"),
            ("eui.02004567A425678G", "16 hex digits"),
            ("naa.52004567BA64678D00", "16 or 32 hex digits"),
            ("target1", "must start with"),
        ];
        for (name, want) in cases {
            let err = check_iscsi_name(name).expect_err(name);
            assert!(err.contains(want), "{name}: {err}");
        }
        let long = format!("iqn.2001-04.com.example:{}", "a".repeat(200));
        assert!(check_iscsi_name(&long)
            .unwrap_err()
            .contains("maximum is 223"));
        let max = format!("iqn.2001-04.com.example:{}", "a".repeat(223 - 24));
        assert_eq!(max.len(), 223);
        assert_eq!(check_iscsi_name(&max), Ok(()));
    }
}
