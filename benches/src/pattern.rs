//! Deterministic data and offsets, so that runs are comparable with each other.

/// `len` bytes of a recognisable, non-zero, non-repeating-per-block pattern (so that a store
/// cannot shortcut zero pages and a misplaced block would show in a check).
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// `count` offsets in `0..span`, each a multiple of `align`, in a fixed pseudo-random order
/// (xorshift64* from `seed`). `span` must be at least `align`.
///
/// # Panics
/// If `align` is zero or larger than `span`.
pub fn random_offsets(count: usize, span: u64, align: u64, seed: u64) -> Vec<u64> {
    assert!(align > 0 && align <= span, "align must be in 1..=span");
    let slots = span / align;
    let mut x = seed | 1;
    (0..count)
        .map(|_| {
            // xorshift64* (Vigna, "An experimental exploration of Marsaglia's xorshift
            // generators"): plenty for spreading I/O, no dependency.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            (r % slots) * align
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_in_range_and_spread() {
        let offs = random_offsets(10_000, 1 << 28, 4096, 7);
        assert!(offs.iter().all(|&o| o % 4096 == 0 && o + 4096 <= 1 << 28));
        let distinct: std::collections::BTreeSet<_> = offs.iter().collect();
        assert!(distinct.len() > 9_000, "only {} distinct", distinct.len());
        assert_eq!(offs, random_offsets(10_000, 1 << 28, 4096, 7));
    }
}
