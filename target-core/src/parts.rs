//! Buffers made of several [`Bytes`] parts (a write's Data-Out segments, a PDU's header and
//! data slices), after a vectored write took some of their bytes.

use bytes::Bytes;

/// Consumes `n` bytes from `parts[first..]`, in place: parts taken whole are stepped over,
/// a part taken partly loses its front. Returns the index of the first part with bytes left
/// (empty parts in between are stepped over too), `parts.len()` when none is left.
pub(crate) fn consume(parts: &mut [Bytes], mut first: usize, mut n: usize) -> usize {
    while first < parts.len() {
        let len = parts[first].len();
        if n < len {
            if n > 0 {
                let _ = parts[first].split_to(n);
            }
            return first;
        }
        n -= len;
        first += 1;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> Vec<Bytes> {
        ["ab", "", "c", "defg"]
            .iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect()
    }

    fn rest(p: &[Bytes], first: usize) -> Vec<u8> {
        p[first..].iter().flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn consume_steps_over_whole_and_empty_parts_and_trims_a_partial_one() {
        for (n, want) in [
            (0, &b"abcdefg"[..]),
            (1, b"bcdefg"),
            (2, b"cdefg"),
            (3, b"defg"),
            (5, b"fg"),
            (7, b""),
        ] {
            let mut p = parts();
            let first = consume(&mut p, 0, n);
            assert_eq!(rest(&p, first), want, "n = {n}");
            assert!(first == p.len() || !p[first].is_empty(), "n = {n}");
        }
        // Continuing from where an earlier call stopped.
        let mut p = parts();
        let first = consume(&mut p, 0, 1);
        let first = consume(&mut p, first, 3);
        assert_eq!(rest(&p, first), b"efg");
    }
}
