//! The routing oracle: the published weight split, written here
//! independently of the manager, so tests can say where each key must go.

/// 64-bit FNV-1a, written here independently of the manager.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The subset whose weight range holds `hash`: ranges in declared order,
/// `[W(i-1)·2⁶⁴/T, W(i)·2⁶⁴/T)`.
pub fn oracle<'a>(hash: u64, weights: &[(&'a str, u64)]) -> &'a str {
    let total: u128 = weights.iter().map(|(_, w)| u128::from(*w)).sum();
    let mut acc = 0u128;
    for (name, w) in weights {
        acc += u128::from(*w);
        if u128::from(hash) < (acc << 64) / total {
            return name;
        }
    }
    weights.last().map(|(n, _)| *n).unwrap_or_default()
}
