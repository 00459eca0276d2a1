//! The routing function: pure, deterministic and free of I/O.
//!
//! 1. The routing string (the namespace, or `namespace/name`) is hashed with
//!    64-bit FNV-1a, the function of KEP-5866 sharded watch.
//! 2. Pins are checked first, then the weights: subset `i` owns the range
//!    `[floor(W(i-1)·2⁶⁴/T), floor(W(i)·2⁶⁴/T))` of the u64 space, where `W(i)`
//!    is the running sum of weights in declared order and `T` their total.
//!    The arithmetic is exact (u128), so the shares are exact.
//! 3. Inside a subset, a consistent hash ring with virtual nodes picks the
//!    replica, so a replica joining or leaving moves only its own share. The
//!    ring hashes with XXH64 (seed 0), not FNV-1a: FNV-1a mixes a key's last
//!    bytes only into its low bits, so `app-0` … `app-99` would sit between
//!    the same two ring points and all go to one replica.

use std::hash::{BuildHasherDefault, Hasher as _};

use consistent_hash_ring::{Ring, RingBuilder};
use fnv::FnvHasher;
use twox_hash::XxHash64;

use crate::id::PodId;

/// Virtual nodes per replica on the ring. More nodes even out the shares.
pub(crate) const VNODES: usize = 64;

/// 64-bit FNV-1a of `s`'s bytes.
pub(crate) fn fnv1a64(s: &str) -> u64 {
    let mut h = FnvHasher::default();
    h.write(s.as_bytes());
    h.finish()
}

/// Half-open ranges of the u64 hash space, one per subset, in declared order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WeightRanges {
    /// `ends[i]` is the exclusive end of subset `i`'s range; the start is the
    /// previous end (0 for the first). The last end is 2⁶⁴.
    ends: Vec<u128>,
}

// === impl WeightRanges ===

impl WeightRanges {
    /// Ranges for `weights` (in declared order) that sum to `total`.
    /// Returns `None` when the weights do not sum to `total` or `total` is 0.
    pub(crate) fn new(weights: &[u64], total: u64) -> Option<Self> {
        let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        if total == 0 || sum != u128::from(total) {
            return None;
        }
        let space: u128 = 1 << 64;
        let mut acc: u128 = 0;
        let ends = weights
            .iter()
            .map(|&w| {
                acc += u128::from(w);
                acc * space / u128::from(total)
            })
            .collect();
        Some(Self { ends })
    }

    /// The subset whose range holds `hash`.
    pub(crate) fn subset_of(&self, hash: u64) -> usize {
        let h = u128::from(hash);
        // The last end is 2⁶⁴ > any hash, so a subset is always found.
        self.ends
            .iter()
            .position(|&end| h < end)
            .unwrap_or(self.ends.len().saturating_sub(1))
    }

    /// Subset `i`'s range as `(start, end)`, end exclusive.
    #[cfg(test)]
    pub(crate) fn range(&self, i: usize) -> (u128, u128) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (start, self.ends[i])
    }
}

/// The ring's hash: XXH64 with seed 0, stable across processes and releases,
/// so every manager that becomes leader computes the same owners.
type RingHasher = BuildHasherDefault<XxHash64>;

/// The replicas of one subset on a consistent hash ring. A pod is placed by
/// the hash of its name, `namespace/name`.
#[derive(Clone)]
pub(crate) struct ReplicaRing {
    ring: Ring<PodId, RingHasher>,
}

// === impl ReplicaRing ===

impl ReplicaRing {
    /// A ring over `replicas`.
    pub(crate) fn new<'a>(replicas: impl IntoIterator<Item = &'a PodId>) -> Self {
        Self {
            ring: RingBuilder::new(RingHasher::default())
                .vnodes(VNODES)
                .nodes_iter(replicas.into_iter().cloned())
                .build(),
        }
    }

    /// The replica that owns `key`, or `None` when the ring is empty.
    pub(crate) fn owner(&self, key: &str) -> Option<&PodId> {
        self.ring.try_get(key)
    }
}

impl std::fmt::Debug for ReplicaRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaRing")
            .field("replicas", &self.ring.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn ranges_cover_the_space_exactly() {
        let r = WeightRanges::new(&[80, 20], 100).unwrap();
        assert_eq!(r.range(0), (0, (1u128 << 64) * 80 / 100));
        assert_eq!(r.range(1).1, 1u128 << 64);
        assert_eq!(r.subset_of(0), 0);
        assert_eq!(r.subset_of(u64::MAX), 1);
        assert!(WeightRanges::new(&[80, 10], 100).is_none());
        // A zero weight owns nothing.
        let r = WeightRanges::new(&[0, 100], 100).unwrap();
        assert_eq!(r.subset_of(0), 1);
    }

    proptest! {
        #[test]
        fn routing_is_deterministic(key in ".{0,40}", w in 0u64..=100) {
            let r = WeightRanges::new(&[w, 100 - w], 100).unwrap();
            prop_assert_eq!(r.subset_of(fnv1a64(&key)), r.subset_of(fnv1a64(&key)));
        }

        #[test]
        fn ranges_are_exact_shares(weights in prop::collection::vec(0u64..1000, 1..8)) {
            let total: u64 = weights.iter().sum();
            prop_assume!(total > 0);
            let r = WeightRanges::new(&weights, total).unwrap();
            let space = 1u128 << 64;
            let mut acc = 0u128;
            for (i, &w) in weights.iter().enumerate() {
                let (start, end) = r.range(i);
                // Contiguous, in declared order, and exactly w/total of the space
                // up to the floor of the running sum.
                prop_assert_eq!(start, acc * space / u128::from(total));
                acc += u128::from(w);
                prop_assert_eq!(end, acc * space / u128::from(total));
                let width = end - start;
                let ideal = u128::from(w) * space / u128::from(total);
                prop_assert!(width.abs_diff(ideal) <= 1);
            }
            prop_assert_eq!(r.range(weights.len() - 1).1, space);
        }

        #[test]
        fn raising_the_last_weight_only_moves_keys_into_it(
            mut weights in prop::collection::vec(1u64..100, 2..6),
            raise in 1u64..100,
            keys in prop::collection::vec(".{1,24}", 1..200),
        ) {
            let n = weights.len();
            let total: u64 = weights.iter().sum();
            let before = WeightRanges::new(&weights, total).unwrap();
            // Take the extra share from the subset before the last, as a
            // canary rollout does: v1 gives, v2 (last) takes.
            let raise = raise.min(weights[n - 2]);
            weights[n - 2] -= raise;
            weights[n - 1] += raise;
            let after = WeightRanges::new(&weights, total).unwrap();
            for key in &keys {
                let h = fnv1a64(key);
                let (old, new) = (before.subset_of(h), after.subset_of(h));
                prop_assert!(old == new || new == n - 1, "{key}: {old} -> {new}");
            }
        }

        #[test]
        fn replicas_share_keys_that_differ_only_in_a_suffix(
            n in 2usize..5,
            prefix in "[a-z][a-z0-9-]{0,20}/[a-z][a-z-]{0,10}",
        ) {
            let replicas: Vec<PodId> = (0..n).map(|i| PodId::new("ns", format!("pod-{i}"))).collect();
            let ring = ReplicaRing::new(&replicas);
            let mut shares = std::collections::BTreeMap::<&PodId, usize>::new();
            for i in 0..400 {
                *shares.entry(ring.owner(&format!("{prefix}{i}")).unwrap()).or_default() += 1;
            }
            // An even share is 400/n; every replica gets at least a third of it.
            prop_assert_eq!(shares.len(), n, "{:?}", shares);
            for (replica, count) in &shares {
                prop_assert!(*count * n * 3 >= 400, "{} got {} of 400: {:?}", replica, count, shares);
            }
        }

        #[test]
        fn a_ring_change_moves_only_the_changed_replicas_share(
            n in 1usize..6,
            keys in prop::collection::vec("[a-z0-9/-]{1,24}", 1..300),
        ) {
            let replicas: Vec<PodId> = (0..n).map(|i| PodId::new("ns", format!("pod-{i}"))).collect();
            let joined = PodId::new("ns", "pod-new");
            let before = ReplicaRing::new(&replicas);
            let mut grown = replicas.clone();
            grown.push(joined.clone());
            let after = ReplicaRing::new(&grown);
            for key in &keys {
                let (old, new) = (before.owner(key).unwrap(), after.owner(key).unwrap());
                // Joining: a key either stays or moves to the newcomer.
                prop_assert!(old == new || *new == joined);
            }
            // Leaving is the same change in reverse: only the leaver's keys move.
            for key in &keys {
                let (old, new) = (after.owner(key).unwrap(), before.owner(key).unwrap());
                prop_assert!(old == new || *old == joined);
            }
        }
    }
}
