//! Who owns each key of one mesh, and the moves that get ownership to where
//! the policy wants it. Pure state, no I/O: the caller turns the returned
//! [`Move`]s into messages.
//!
//! Invariant: a key is held by at most one runtime. A key only leaves a
//! runtime through `Revoke` → `Released`, a goodbye, or the expiry of the
//! runtime's lease; only then may the key be assigned elsewhere.
//!
//! Ring members are pods, which keep their place across reconnects; holders
//! are sessions ([`Holder`]), so a reconnected pod never inherits keys its
//! earlier session may still be acting on.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{
    id::{Holder, PodId},
    policy::ReplicaRing,
};

/// Who has a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// The holder owns the key and gets its events.
    Owned(Holder),
    /// The holder was asked to release the key; events are held until it does.
    Revoking(Holder),
}

/// A change the caller must carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Move {
    /// Send the key's objects to the holder.
    Assign(Holder, String),
    /// Ask the holder to release the key.
    Revoke(Holder, String),
}

/// Ownership of one mesh's keys.
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    holders: HashMap<String, Held>,
    /// Counts changes of `holders`, so a snapshot can tell it is unchanged.
    version: u64,
    /// Live pods per subset index.
    members: BTreeMap<usize, BTreeSet<PodId>>,
    /// Live pods being drained: members, but off the rings.
    draining: BTreeSet<PodId>,
    rings: BTreeMap<usize, ReplicaRing>,
}

// === impl Ownership ===

impl Ownership {
    /// Adds a live pod to a subset.
    pub(crate) fn join(&mut self, subset: usize, pod: &PodId) {
        self.members.entry(subset).or_default().insert(pod.clone());
        self.rebuild(subset);
    }

    /// Takes a runtime off its subset's ring, so no new keys go to it. The
    /// keys it holds stay held until [`Ownership::free`]: a runtime that
    /// vanished may still be reconciling until its lease runs out.
    pub(crate) fn leave(&mut self, pod: &PodId) {
        let subsets: Vec<usize> = self
            .members
            .iter()
            .filter(|(_, m)| m.contains(pod))
            .map(|(s, _)| *s)
            .collect();
        for s in subsets {
            if let Some(m) = self.members.get_mut(&s) {
                m.remove(pod);
            }
            self.rebuild(s);
        }
    }

    /// Frees every key `holder` holds, once it can no longer reconcile them
    /// (it released them, said goodbye, or its lease ran out). The caller
    /// then re-places them.
    pub(crate) fn free(&mut self, holder: &Holder) -> Vec<String> {
        let freed: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, h)| matches!(h, Held::Owned(r) | Held::Revoking(r) if r == holder))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &freed {
            self.holders.remove(k);
        }
        self.version += 1;
        freed
    }

    /// Sets the pods being drained: they stay members (their sessions and
    /// the keys they hold are untouched) but leave the rings, so no key is
    /// placed on them and the keys they hold move elsewhere. Returns true if
    /// the set changed.
    pub(crate) fn set_draining(&mut self, draining: BTreeSet<PodId>) -> bool {
        if draining == self.draining {
            return false;
        }
        self.draining = draining;
        let subsets: Vec<usize> = self.members.keys().copied().collect();
        for s in subsets {
            self.rebuild(s);
        }
        true
    }

    /// True if `pod` is being drained.
    pub(crate) fn is_draining(&self, pod: &PodId) -> bool {
        self.draining.contains(pod)
    }

    /// The pod the ring picks for `key` inside `subset`.
    pub(crate) fn pick(&self, subset: usize, key: &str) -> Option<&PodId> {
        self.rings.get(&subset).and_then(|r| r.owner(key))
    }

    /// The live pods of `subset`.
    pub(crate) fn members(&self, subset: usize) -> impl Iterator<Item = &PodId> {
        self.members.get(&subset).into_iter().flatten()
    }

    /// Who has `key`.
    pub(crate) fn holder(&self, key: &str) -> Option<&Held> {
        self.holders.get(key)
    }

    /// Changes whenever any key's holder changes.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// Every key with who has it.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Held)> {
        self.holders.iter()
    }

    /// Moves `key` one step towards `desired`. When `frozen`, owned keys stay
    /// where they are (a paused mesh); unowned keys are still placed, so no
    /// update is lost.
    pub(crate) fn place(
        &mut self,
        key: &str,
        desired: Option<&Holder>,
        frozen: bool,
    ) -> Option<Move> {
        match (self.holders.get(key), desired) {
            (None, Some(to)) => {
                self.version += 1;
                self.holders
                    .insert(key.to_string(), Held::Owned(to.clone()));
                Some(Move::Assign(to.clone(), key.to_string()))
            }
            (None, None) | (Some(Held::Revoking(_)), _) => None,
            (Some(Held::Owned(from)), _) if frozen || desired == Some(from) => None,
            (Some(Held::Owned(from)), _) => {
                let from = from.clone();
                self.version += 1;
                self.holders
                    .insert(key.to_string(), Held::Revoking(from.clone()));
                Some(Move::Revoke(from, key.to_string()))
            }
        }
    }

    /// Gives `key` to `holder` as it is: a runtime reported holding it after
    /// a reconnect, and the policy still wants it there.
    pub(crate) fn adopt(&mut self, key: &str, holder: &Holder) {
        self.version += 1;
        self.holders
            .insert(key.to_string(), Held::Owned(holder.clone()));
    }

    /// Records that `holder` still holds `key` and has been asked to release
    /// it: a runtime reported holding it after a reconnect, but the policy
    /// wants it elsewhere.
    pub(crate) fn mark_revoking(&mut self, key: &str, holder: &Holder) {
        self.version += 1;
        self.holders
            .insert(key.to_string(), Held::Revoking(holder.clone()));
    }

    /// Records that `holder` released `key`. Returns true if the key was
    /// being revoked from it (and is now unowned, ready to be placed).
    pub(crate) fn released(&mut self, holder: &Holder, key: &str) -> bool {
        if matches!(self.holders.get(key), Some(Held::Revoking(r)) if r == holder) {
            self.version += 1;
            self.holders.remove(key);
            true
        } else {
            false
        }
    }

    fn rebuild(&mut self, subset: usize) {
        let ring = ReplicaRing::new(
            self.members
                .get(&subset)
                .into_iter()
                .flatten()
                .filter(|p| !self.draining.contains(*p)),
        );
        self.rings.insert(subset, ring);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;
    use crate::id::SessionId;

    /// In this model a pod has one session for life.
    fn pod(r: u8) -> PodId {
        PodId::new("ns", format!("pod-{r}"))
    }

    fn holder(pod: &PodId) -> Holder {
        Holder {
            pod: pod.clone(),
            session: SessionId(0),
        }
    }

    /// What the runtimes themselves believe they hold, driven only by the
    /// messages the manager sends. The invariant is checked on this view.
    #[derive(Default)]
    struct World {
        own: Ownership,
        held: HashMap<Holder, HashSet<String>>,
        /// Revokes sent but not yet answered.
        in_flight: Vec<(Holder, String)>,
        weights: Vec<bool>,
    }

    impl World {
        fn desired(&self, key: &str) -> Option<Holder> {
            // Two subsets; `weights[i]` says whether subset i gets all keys.
            let subset = self.weights.iter().position(|w| *w)?;
            self.own.pick(subset, key).map(holder)
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
        /// The runtime vanishes without a word: off the ring at once, but its
        /// keys stay held until its lease expires.
        Crash(u8),
        Expire(u8),
        Answer(usize),
        Flip(usize),
        Pause(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..2, 0u8..5).prop_map(|(s, r)| Op::Join(s, r)),
            (0u8..5).prop_map(Op::Leave),
            (0u8..5).prop_map(Op::Crash),
            (0u8..5).prop_map(Op::Expire),
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
            let mut crashed: HashSet<Holder> = HashSet::new();
            for op in ops {
                match op {
                    Op::Join(s, r) => {
                        let p = pod(r);
                        // A runtime lives in one subset at a time; a crashed one
                        // comes back only after it expired.
                        if !crashed.contains(&holder(&p))
                            && !w.own.members(0).chain(w.own.members(1)).any(|m| *m == p)
                        {
                            w.own.join(s, &p);
                        }
                    }
                    Op::Leave(r) => {
                        let p = pod(r);
                        let id = holder(&p);
                        // A graceful leave: drained, so it holds nothing any more.
                        w.held.remove(&id);
                        w.in_flight.retain(|(x, _)| *x != id);
                        w.own.leave(&p);
                        w.own.free(&id);
                    }
                    Op::Crash(r) => {
                        let p = pod(r);
                        // Still holding (maybe reconciling) until it expires.
                        w.own.leave(&p);
                        crashed.insert(holder(&p));
                    }
                    Op::Expire(r) => {
                        let id = holder(&pod(r));
                        if crashed.remove(&id) {
                            w.held.remove(&id);
                            w.in_flight.retain(|(x, _)| *x != id);
                            w.own.free(&id);
                        }
                    }
                    Op::Answer(i) => {
                        // Only a live runtime answers a revoke.
                        let live: Vec<usize> = (0..w.in_flight.len())
                            .filter(|j| !crashed.contains(&w.in_flight[*j].0))
                            .collect();
                        if !live.is_empty() {
                            let (r, k) = w.in_flight.remove(live[i % live.len()]);
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
            // With every crashed runtime expired, every revoke answered and the
            // mesh unpaused, every key ends with its policy owner: nothing is lost.
            for id in crashed.drain() {
                w.held.remove(&id);
                w.in_flight.retain(|(x, _)| *x != id);
                w.own.free(&id);
            }
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
