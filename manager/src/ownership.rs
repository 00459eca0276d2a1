//! Who owns each key of one mesh, and the moves that get ownership to where
//! the policy wants it. Pure state, no I/O: the caller turns the returned
//! [`Move`]s into messages.
//!
//! Invariant: a key is held by at most one runtime. A key only leaves a
//! runtime through `Revoke` → `Released`; only after `Released` (or after the
//! runtime is gone) may the key be assigned elsewhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::routing::ReplicaRing;

/// A runtime's id (its pod, `namespace/name`).
pub type RuntimeId = String;

/// The state of an owned key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The runtime owns the key and gets its events.
    Owned(RuntimeId),
    /// The runtime was asked to release the key; events are held until it does.
    Revoking(RuntimeId),
}

/// A change the caller must carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// Send the key's objects to the runtime.
    Assign(RuntimeId, String),
    /// Ask the runtime to release the key.
    Revoke(RuntimeId, String),
}

/// Ownership of one mesh's keys.
#[derive(Debug, Default)]
pub struct Ownership {
    holders: HashMap<String, Holder>,
    /// Live runtimes per subset index.
    members: BTreeMap<usize, BTreeSet<RuntimeId>>,
    rings: BTreeMap<usize, ReplicaRing>,
}

// === impl Ownership ===

impl Ownership {
    /// Adds a live runtime to a subset.
    pub fn join(&mut self, subset: usize, runtime: &str) {
        self.members
            .entry(subset)
            .or_default()
            .insert(runtime.to_string());
        self.rebuild(subset);
    }

    /// Removes a runtime that is gone. Its keys become unowned at once; the
    /// caller then re-places them.
    pub fn leave(&mut self, runtime: &str) -> Vec<String> {
        let subsets: Vec<usize> = self
            .members
            .iter()
            .filter(|(_, m)| m.contains(runtime))
            .map(|(s, _)| *s)
            .collect();
        for s in subsets {
            if let Some(m) = self.members.get_mut(&s) {
                m.remove(runtime);
            }
            self.rebuild(s);
        }
        let freed: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, h)| matches!(h, Holder::Owned(r) | Holder::Revoking(r) if r == runtime))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &freed {
            self.holders.remove(k);
        }
        freed
    }

    /// The runtime the ring picks for `key` inside `subset`.
    pub fn pick(&self, subset: usize, key: &str) -> Option<&RuntimeId> {
        self.rings.get(&subset).and_then(|r| r.owner(key))
    }

    /// The live runtimes of `subset`.
    pub fn members(&self, subset: usize) -> impl Iterator<Item = &RuntimeId> {
        self.members.get(&subset).into_iter().flatten()
    }

    /// Who holds `key`.
    pub fn holder(&self, key: &str) -> Option<&Holder> {
        self.holders.get(key)
    }

    /// Every key that has a holder.
    pub fn held_keys(&self) -> impl Iterator<Item = &String> {
        self.holders.keys()
    }

    /// Number of keys owned (not revoking) by `runtime`.
    pub fn owned_by(&self, runtime: &str) -> usize {
        self.holders
            .values()
            .filter(|h| matches!(h, Holder::Owned(r) if r == runtime))
            .count()
    }

    /// Number of keys waiting for a `Released`.
    pub fn revoking(&self) -> usize {
        self.holders
            .values()
            .filter(|h| matches!(h, Holder::Revoking(_)))
            .count()
    }

    /// Moves `key` one step towards `desired`. When `frozen`, owned keys stay
    /// where they are (a paused mesh); unowned keys are still placed, so no
    /// update is lost.
    pub fn place(&mut self, key: &str, desired: Option<&RuntimeId>, frozen: bool) -> Option<Move> {
        match (self.holders.get(key), desired) {
            (None, Some(to)) => {
                self.holders
                    .insert(key.to_string(), Holder::Owned(to.clone()));
                Some(Move::Assign(to.clone(), key.to_string()))
            }
            (None, None) | (Some(Holder::Revoking(_)), _) => None,
            (Some(Holder::Owned(from)), _) if frozen || desired == Some(from) => None,
            (Some(Holder::Owned(from)), _) => {
                let from = from.clone();
                self.holders
                    .insert(key.to_string(), Holder::Revoking(from.clone()));
                Some(Move::Revoke(from, key.to_string()))
            }
        }
    }

    /// Records that `runtime` released `key`. Returns true if the key was
    /// being revoked from it (and is now unowned, ready to be placed).
    pub fn released(&mut self, runtime: &str, key: &str) -> bool {
        if matches!(self.holders.get(key), Some(Holder::Revoking(r)) if r == runtime) {
            self.holders.remove(key);
            true
        } else {
            false
        }
    }

    fn rebuild(&mut self, subset: usize) {
        let ring = ReplicaRing::new(self.members.get(&subset).into_iter().flatten());
        self.rings.insert(subset, ring);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    /// What the runtimes themselves believe they hold, driven only by the
    /// messages the manager sends. The invariant is checked on this view.
    #[derive(Default)]
    struct World {
        own: Ownership,
        held: HashMap<RuntimeId, HashSet<String>>,
        /// Revokes sent but not yet answered.
        in_flight: Vec<(RuntimeId, String)>,
        weights: Vec<bool>,
    }

    impl World {
        fn desired(&self, key: &str) -> Option<RuntimeId> {
            // Two subsets; `weights[i]` says whether subset i gets all keys.
            let subset = self.weights.iter().position(|w| *w)?;
            self.own.pick(subset, key).cloned()
        }

        fn settle(&mut self, keys: &[String], frozen: bool) {
            for k in keys {
                let d = self.desired(k);
                match self.own.place(k, d.as_ref(), frozen) {
                    Some(Move::Assign(r, k)) => {
                        self.held.entry(r).or_default().insert(k);
                    }
                    Some(Move::Revoke(r, k)) => self.in_flight.push((r, k)),
                    None => {}
                }
            }
        }

        fn check(&self) -> Result<(), TestCaseError> {
            let mut seen = HashMap::new();
            for (r, keys) in &self.held {
                for k in keys {
                    if let Some(other) = seen.insert(k.clone(), r.clone()) {
                        return Err(TestCaseError::fail(format!("{k} held by {other} and {r}")));
                    }
                }
            }
            Ok(())
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Join(usize, u8),
        Leave(u8),
        Answer(usize),
        Flip(usize),
        Pause(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..2, 0u8..5).prop_map(|(s, r)| Op::Join(s, r)),
            (0u8..5).prop_map(Op::Leave),
            (0usize..64).prop_map(Op::Answer),
            (0usize..2).prop_map(Op::Flip),
            any::<bool>().prop_map(Op::Pause),
        ]
    }

    proptest! {
        #[test]
        fn no_key_is_ever_held_twice(ops in prop::collection::vec(op(), 1..120)) {
            let keys: Vec<String> = (0..40).map(|i| format!("ns-{}/obj-{i}", i % 7)).collect();
            let mut w = World { weights: vec![true, false], ..Default::default() };
            let mut paused = false;
            for op in ops {
                match op {
                    Op::Join(s, r) => {
                        let id = format!("pod-{r}");
                        // A runtime lives in one subset at a time.
                        if !w.own.members(0).chain(w.own.members(1)).any(|m| *m == id) {
                            w.own.join(s, &id);
                        }
                    }
                    Op::Leave(r) => {
                        let id = format!("pod-{r}");
                        // A runtime that is gone holds nothing any more.
                        w.held.remove(&id);
                        w.in_flight.retain(|(x, _)| *x != id);
                        w.own.leave(&id);
                    }
                    Op::Answer(i) => {
                        if !w.in_flight.is_empty() {
                            let (r, k) = w.in_flight.remove(i % w.in_flight.len());
                            // The runtime drops the key, then says Released.
                            w.held.entry(r.clone()).or_default().remove(&k);
                            prop_assert!(w.own.released(&r, &k));
                        }
                    }
                    Op::Flip(s) => {
                        w.weights = vec![false, false];
                        w.weights[s] = true;
                    }
                    Op::Pause(p) => paused = p,
                }
                w.settle(&keys, paused);
                w.check()?;
            }
            // With every revoke answered and the mesh unpaused, every key ends
            // with its policy owner: nothing is lost.
            while let Some((r, k)) = w.in_flight.pop() {
                w.held.entry(r.clone()).or_default().remove(&k);
                w.own.released(&r, &k);
                w.settle(&keys, false);
            }
            w.settle(&keys, false);
            while let Some((r, k)) = w.in_flight.pop() {
                w.held.entry(r.clone()).or_default().remove(&k);
                w.own.released(&r, &k);
                w.settle(&keys, false);
            }
            w.check()?;
            for k in &keys {
                let want = w.desired(k);
                let holder = w.held.iter().find(|(_, ks)| ks.contains(k)).map(|(r, _)| r.clone());
                prop_assert_eq!(holder, want, "key {}", k);
            }
        }
    }
}
