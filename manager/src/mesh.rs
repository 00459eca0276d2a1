//! One mesh's pure state: its policy and resource types, the [`index`] of
//! objects by primary key, and the [`ownership`] of those keys.

mod index;
mod ownership;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use kube::ResourceExt as _;

pub(crate) use index::{Index, ObjRef};
pub(crate) use ownership::{Held, Move, Ownership};

use crate::{
    gvk::Gvk,
    id::Holder,
    object::RawObject,
    policy::{Apportionment, Policy},
};

/// What the last snapshot computed per key, kept while what it was
/// computed from stays the same.
#[derive(Debug, Default)]
pub(crate) struct ViewCache {
    /// Every held key and how many each holder owns, as of an
    /// [`Ownership::version`].
    pub(crate) keys: Option<HeldKeys>,
    /// Where the policy routes the keys with objects.
    pub(crate) routed: Option<Routed>,
}

/// An [`Ownership::version`], every key held then, and how many keys each
/// holder owned.
pub(crate) type HeldKeys = (
    u64,
    Arc<BTreeMap<String, crate::snapshot::KeyView>>,
    HashMap<Holder, u64>,
);

/// Keys routed to each subset, and routed keys no one holds, with what
/// they were computed from.
#[derive(Debug)]
pub(crate) struct Routed {
    /// [`Index::version`].
    pub(crate) index: u64,
    /// [`Ownership::version`].
    pub(crate) own: u64,
    /// The coordinator's count of namespace changes.
    pub(crate) namespaces: u64,
    pub(crate) policy: Arc<Policy>,
    pub(crate) apportionment: Arc<Apportionment>,
    /// Per subset index.
    pub(crate) counts: Vec<u64>,
    pub(crate) unowned: usize,
}

/// One `OperatorMesh` as the coordinator keeps it.
#[derive(Debug)]
pub(crate) struct Mesh {
    /// The spec generation processed last.
    pub(crate) generation: Option<i64>,
    /// The last valid policy, in force.
    pub(crate) policy: Option<Arc<Policy>>,
    /// The policy's exact split of the namespaces that exist (shared with
    /// the published snapshot).
    pub(crate) apportionment: Arc<Apportionment>,
    /// Why the latest spec is invalid, if it is.
    pub(crate) invalid: Option<String>,
    /// The effective spec `policy` was compiled from: an update that
    /// leaves it as it was (the manager's own status writes, most often)
    /// moves nothing and is not placed again.
    pub(crate) spec_in_force: Option<serde_json::Value>,
    /// What the last snapshot computed from this mesh.
    pub(crate) view: ViewCache,
    /// The primary types, by key, as the runtimes declare them.
    pub(crate) primaries: BTreeMap<String, Gvk>,
    /// Owned types, by key, declared by runtimes.
    pub(crate) owns: BTreeMap<String, Gvk>,
    /// Objects by primary key.
    pub(crate) index: Index,
    /// Who holds each key.
    pub(crate) own: Ownership,
    /// Keys runtimes reported holding when they (re)connected, not yet
    /// adopted or revoked.
    pub(crate) reported: HashMap<String, Holder>,
    /// No key is assigned before this: runtimes of an earlier mesh of the
    /// same name may still hold leases.
    pub(crate) not_before: Instant,
    /// True until `not_before` has passed and the keys were placed.
    pub(crate) waiting: bool,
    /// Pods to drain, with the UID each had when the drain was asked for
    /// (empty: whichever pod has the name), from the mesh's
    /// [`DRAIN_ANNOTATION`].
    pub(crate) drain: BTreeMap<crate::id::PodId, String>,
    /// Keys revoked to move them, and moves completed by a release, ever:
    /// for Events, which sample snapshots too rarely to see a fast move.
    pub(crate) moves: (u64, u64),
}

/// The `OperatorMesh` annotation that lists the pods to drain, as a JSON
/// object of `"namespace/name": "pod UID"`. The admin API's drain writes
/// it; it lives on the mesh so a new leader finds it.
pub(crate) const DRAIN_ANNOTATION: &str = "opmesh.io/drain";

/// The drains an annotation value asks for; entries that are not
/// `namespace/name` are ignored, as is a value that is not a JSON object.
pub(crate) fn parse_drain(value: Option<&str>) -> BTreeMap<crate::id::PodId, String> {
    let Some(map) = value.and_then(|v| serde_json::from_str::<BTreeMap<String, String>>(v).ok())
    else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(pod, uid)| {
            let (ns, name) = pod.split_once('/')?;
            (!ns.is_empty() && !name.is_empty() && !name.contains('/'))
                .then(|| (crate::id::PodId::new(ns, name), uid))
        })
        .collect()
}

// === impl Mesh ===

impl Mesh {
    /// A mesh with no policy yet that assigns nothing before `not_before`.
    pub(crate) fn new(not_before: Option<Instant>, now: Instant) -> Self {
        Self {
            generation: None,
            policy: None,
            apportionment: Arc::default(),
            invalid: None,
            spec_in_force: None,
            view: ViewCache::default(),
            primaries: BTreeMap::new(),
            owns: BTreeMap::new(),
            index: Index::default(),
            own: Ownership::default(),
            reported: HashMap::new(),
            waiting: not_before.is_some(),
            drain: BTreeMap::new(),
            moves: (0, 0),
            not_before: not_before.unwrap_or(now),
        }
    }

    /// The key an object of type `gvk` belongs to in this mesh: its own, if
    /// it is of a primary type, or its controller owner's, if that is of a
    /// primary type this mesh's controllers own objects of type `gvk` for.
    pub(crate) fn key_for(&self, gvk: &str, obj: &RawObject) -> Option<String> {
        let ns = obj.namespace();
        let key = |primary: &Gvk, name: &str| {
            let ns = ns.as_deref().filter(|_| primary.namespaced);
            opmesh_proto::mesh_key(&primary.group, &primary.version, &primary.kind, ns, name)
        };
        if let Some(primary) = self.primaries.get(gvk) {
            return Some(key(primary, &obj.name_any()));
        }
        if !self.owns.contains_key(gvk) {
            return None;
        }
        // Secondary objects follow their controller owner of a primary kind.
        let owner = obj
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true))?;
        let primary = self
            .primaries
            .values()
            .find(|p| p.kind == owner.kind && p.api_version() == owner.api_version)?;
        Some(key(primary, &owner.name))
    }

    /// The type of `gvk` key, if this mesh routes it.
    pub(crate) fn gvk(&self, key: &str) -> Option<&Gvk> {
        self.primaries.get(key).or_else(|| self.owns.get(key))
    }

    /// Every type this mesh routes.
    pub(crate) fn types(&self) -> impl Iterator<Item = &Gvk> {
        self.primaries.values().chain(self.owns.values())
    }

    /// Every key with objects, a holder, or a runtime that reported it.
    /// A reported key whose objects are gone must still be placed, so the
    /// reporter is told to let go of it.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        let held = self
            .own
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !self.index.knows(k));
        let reported = self
            .reported
            .keys()
            .filter(|k| !self.index.knows(k) && self.own.holder(k).is_none());
        self.index.keys().chain(held).chain(reported)
    }
}
