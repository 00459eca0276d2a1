//! The routing oracle: the published routing functions of
//! `docs/routing.md`, written here independently of the manager, so tests
//! can say where each key must go.

use std::collections::BTreeMap;

/// 64-bit FNV-1a.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The weight hash: MurmurHash3's `fmix64` over FNV-1a.
pub fn weight_hash(s: &str) -> u64 {
    let mut k = fnv1a64(s);
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The hash split: the subset whose weight range holds `hash`, ranges in
/// declared order, `[W(i-1)·2⁶⁴/T, W(i)·2⁶⁴/T)`.
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

/// The exact split of `namespaces` (those that hold keys, none pinned or
/// excluded): sorted by `(weight_hash, name)`, subset `i` gets positions
/// `[C(i-1), C(i))` with `C(i) = floor(N·W(i)/T + 1/2)`.
pub fn exact<'a>(namespaces: &[String], weights: &[(&'a str, u64)]) -> BTreeMap<String, &'a str> {
    let mut sorted: Vec<(u64, &String)> = namespaces.iter().map(|n| (weight_hash(n), n)).collect();
    sorted.sort();
    let n = sorted.len() as u128;
    let total: u128 = weights.iter().map(|(_, w)| u128::from(*w)).sum();
    let mut out = BTreeMap::new();
    let (mut start, mut acc) = (0usize, 0u128);
    for (name, w) in weights {
        acc += u128::from(*w);
        let end = ((2 * n * acc + total) / (2 * total)) as usize;
        for (_, ns) in &sorted[start..end.max(start)] {
            out.insert((*ns).clone(), *name);
        }
        start = start.max(end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_published_vectors() {
        assert_eq!(weight_hash(""), 0xefd0_1f60_ba99_2926);
        assert_eq!(weight_hash("team-22"), 0xf5a7_535d_e0e2_15c9);
        assert_eq!(
            oracle(weight_hash("team-22"), &[("v1", 95), ("v2", 5)]),
            "v2"
        );
        let namespaces: Vec<String> = (0..40).map(|i| format!("team-{i}")).collect();
        let split = exact(&namespaces, &[("v1", 95), ("v2", 5)]);
        assert_eq!(split.values().filter(|s| **s == "v2").count(), 2);
    }
}
