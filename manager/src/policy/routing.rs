//! The routing function: pure, deterministic and free of I/O.
//!
//! 1. The routing string (the namespace, or `namespace/name`) is hashed with
//!    [`weight_hash`]: 64-bit FNV-1a followed by MurmurHash3's 64-bit
//!    finalizer (`fmix64`). Raw FNV-1a mixes a string's last bytes only
//!    weakly into its high bits, so `team-0` … `team-199` all fell into one
//!    range; the finalizer spreads every input bit over all output bits.
//! 2. Pins are checked first, then the weights: subset `i` owns the range
//!    `[floor(W(i-1)·2⁶⁴/T), floor(W(i)·2⁶⁴/T))` of the u64 space, where `W(i)`
//!    is the running sum of weights in declared order and `T` their total.
//!    The arithmetic is exact (u128), so the shares are exact.
//!    With the exact split, the existing namespaces are sorted by hash
//!    instead and subset `i` gets positions `[C(i-1), C(i))` with
//!    `C(i) = round(n·W(i)/T)` ([`WeightRanges::boundaries`]).
//! 3. Inside a subset, a consistent hash ring with virtual nodes picks the
//!    replica, so a replica joining or leaving moves only its own share. The
//!    ring hashes with XXH64 (seed 0), independent of the weight hash, so
//!    the keys of a small subset spread over the whole ring.

use std::hash::Hasher as _;

use fnv::FnvHasher;
use twox_hash::XxHash64;

use crate::id::PodId;

/// Virtual nodes per replica on the ring. More nodes even out the shares:
/// with 1,024 each replica's share of the ring is within a few percent of
/// even, so three replicas each get a third of a subset's keys within 20%.
pub(crate) const VNODES: usize = 1024;

/// 64-bit FNV-1a of `s`'s bytes.
fn fnv1a64(s: &str) -> u64 {
    let mut h = FnvHasher::default();
    h.write(s.as_bytes());
    h.finish()
}

/// MurmurHash3's 64-bit finalizer: a bijection in which every input bit
/// affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The hash the weights split: `fmix64(fnv1a64(s))`, over the UTF-8 bytes
/// of the routing string. Fixed and published (test vectors in
/// `docs/routing.md`), and independent of the replica ring's XXH64, so the
/// keys of a small subset are not crowded onto a few ring points.
pub(crate) fn weight_hash(s: &str) -> u64 {
    fmix64(fnv1a64(s))
}

/// Half-open ranges of the u64 hash space, one per subset, in declared order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WeightRanges {
    /// `ends[i]` is the exclusive end of subset `i`'s range; the start is the
    /// previous end (0 for the first). The last end is 2⁶⁴.
    ends: Vec<u128>,
    /// Running sums of the weights, in declared order.
    cumulative: Vec<u128>,
    total: u128,
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
        let cumulative: Vec<u128> = weights
            .iter()
            .map(|&w| {
                acc += u128::from(w);
                acc
            })
            .collect();
        let total = u128::from(total);
        let ends = cumulative.iter().map(|c| c * space / total).collect();
        Some(Self {
            ends,
            cumulative,
            total,
        })
    }

    /// The exact split of `n` items in hash order: subset `i` gets positions
    /// `[C(i-1), C(i))`, where `C(i) = round(n·W(i)/T)`, halves rounded up.
    /// Each subset gets its quota `n·w/T` rounded down or up, the counts sum
    /// to `n`, and, as the boundaries are cumulative, raising the last
    /// subset's weight (taking it from the subset before it, as a canary
    /// rollout does) only moves items into it.
    /// Adding one item moves each boundary by at most one position.
    pub(crate) fn boundaries(&self, n: usize) -> Vec<usize> {
        let n = n as u128;
        self.cumulative
            .iter()
            .map(|c| {
                let at = (2 * n * c + self.total) / (2 * self.total);
                usize::try_from(at).unwrap_or(usize::MAX)
            })
            .collect()
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
    pub(crate) fn range(&self, i: usize) -> (u128, u128) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (start, self.ends[i])
    }
}

/// The replicas of one subset on a consistent hash ring. Replica `pod`
/// (`namespace/name`) has [`VNODES`] points, at XXH64 of its name with seed
/// `i`, for `i` in `0..VNODES`; a key belongs to the first point at or after
/// `ring_hash(key)`, wrapping around. A replica joining or leaving moves only
/// its own points, so only its share of the keys.
///
/// Written here rather than taken from a crate: the ring crate this started
/// with inserts each point into a sorted vector, which is quadratic in the
/// number of points and made 1,024 points per replica slow to rebuild.
#[derive(Clone)]
pub(crate) struct ReplicaRing {
    /// Points in order, with the index of their replica.
    points: Vec<(u64, usize)>,
    /// Replicas in name order.
    replicas: Vec<PodId>,
}

/// The ring's hash: XXH64 with seed 0 over the UTF-8 bytes, stable across
/// processes and releases, so every manager that becomes leader computes
/// the same owners.
pub(crate) fn ring_hash(s: &str) -> u64 {
    XxHash64::oneshot(0, s.as_bytes())
}

// === impl ReplicaRing ===

impl ReplicaRing {
    /// A ring over `replicas`.
    pub(crate) fn new<'a>(replicas: impl IntoIterator<Item = &'a PodId>) -> Self {
        let mut replicas: Vec<PodId> = replicas.into_iter().cloned().collect();
        replicas.sort();
        replicas.dedup();
        let mut points = Vec::with_capacity(replicas.len() * VNODES);
        for (r, pod) in replicas.iter().enumerate() {
            let name = pod.to_string();
            for i in 0..VNODES as u64 {
                points.push((XxHash64::oneshot(i, name.as_bytes()), r));
            }
        }
        // Ties between two replicas' points go to the one first by name.
        points.sort_unstable();
        Self { points, replicas }
    }

    /// The replica that owns `key`, or `None` when the ring is empty.
    pub(crate) fn owner(&self, key: &str) -> Option<&PodId> {
        let h = ring_hash(key);
        let at = self.points.partition_point(|(p, _)| *p < h);
        let (_, r) = self.points.get(at).or_else(|| self.points.first())?;
        self.replicas.get(*r)
    }
}

impl std::fmt::Debug for ReplicaRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaRing")
            .field("replicas", &self.replicas)
            .finish()
    }
}

#[cfg(test)]
mod tests;
