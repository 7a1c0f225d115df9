//! Kubernetes quantities (`1Gi`, `500M`, `1e9`, `1073741824`) as byte counts.
//!
//! Grammar (k8s.io/apimachinery `resource.Quantity`): a number (digits with an optional
//! fraction) followed by a binary suffix (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`), a decimal suffix
//! (`m` `k` `M` `G` `T` `P` `E`, or none) or a decimal exponent (`e3`, `E-2`). The result must
//! be a positive whole number of bytes that fits in a `u64`.

/// Parses `s` into bytes. The error is a human-readable reason.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.starts_with('-') {
        return Err("negative".to_owned());
    }
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(split);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err("no number".to_owned());
    }
    if frac_part.contains('.') {
        return Err("more than one '.'".to_owned());
    }
    // value = mantissa / 10^frac_digits * 2^bin_shift * 10^dec_exp
    let digits = format!("{int_part}{frac_part}");
    let mantissa: u128 = digits.parse().map_err(|_| "number too large".to_owned())?;
    let mut dec_exp: i32 = -i32::try_from(frac_part.len()).map_err(|_| "too many digits")?;
    let mut bin_shift: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => bin_shift = 10,
        "Mi" => bin_shift = 20,
        "Gi" => bin_shift = 30,
        "Ti" => bin_shift = 40,
        "Pi" => bin_shift = 50,
        "Ei" => bin_shift = 60,
        "m" => dec_exp -= 3,
        "k" => dec_exp += 3,
        "M" => dec_exp += 6,
        "G" => dec_exp += 9,
        "T" => dec_exp += 12,
        "P" => dec_exp += 15,
        "E" => dec_exp += 18,
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..]
                .parse()
                .map_err(|_| format!("bad exponent {exp:?}"))?;
            if !(-40..=40).contains(&e) {
                return Err("exponent out of range".to_owned());
            }
            dec_exp += e;
        }
        other => {
            return Err(format!(
                "unknown suffix {other:?}; use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E or none"
            ))
        }
    }
    const TOO_LARGE: &str = "too large";
    let mut value = mantissa.checked_mul(1u128 << bin_shift).ok_or(TOO_LARGE)?;
    if dec_exp >= 0 {
        let scale = 10u128
            .checked_pow(dec_exp.unsigned_abs())
            .ok_or(TOO_LARGE)?;
        value = value.checked_mul(scale).ok_or(TOO_LARGE)?;
    } else {
        let scale = 10u128
            .checked_pow(dec_exp.unsigned_abs())
            .ok_or(TOO_LARGE)?;
        if value % scale != 0 {
            return Err("not a whole number of bytes".to_owned());
        }
        value /= scale;
    }
    if value == 0 {
        return Err("zero".to_owned());
    }
    u64::try_from(value).map_err(|_| TOO_LARGE.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        let cases = [
            ("1Gi", 1 << 30),
            ("1073741824", 1 << 30),
            ("512Mi", 512 << 20),
            ("1.5Gi", 3 << 29),
            ("4Ki", 4096),
            ("1G", 1_000_000_000),
            ("1k", 1000),
            ("1e9", 1_000_000_000),
            ("1E3", 1000),
            ("1E", 1_000_000_000_000_000_000),
            ("+2M", 2_000_000),
            ("2000m", 2),
            ("8Ei", 1 << 63),
        ];
        for (s, want) in cases {
            assert_eq!(parse_bytes(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn rejects_bad_quantities() {
        for (s, want) in [
            ("", "no number"),
            ("Gi", "no number"),
            ("-1Gi", "negative"),
            ("1GB", "unknown suffix"),
            ("1.2.3", "more than one"),
            ("0", "zero"),
            ("1500m", "whole number"),
            ("16Ei", "too large"),
            ("1e400", "exponent"),
        ] {
            let err = parse_bytes(s).expect_err(s);
            assert!(err.contains(want), "{s}: {err}");
        }
    }
}
