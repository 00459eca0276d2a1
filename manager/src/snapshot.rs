//! The coordinator's published view: meshes, subsets, replicas, who holds
//! each key, what is moving and the lease state of each session.
//!
//! One writer (the coordinator's driver), many readers (the status writer,
//! and next the admin API, webhook and rollout controller). Readers load the
//! current snapshot without locks through `arc-swap` and learn of a new one
//! through a `watch` channel; they never call into the coordinator.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    id::{Holder, MeshId},
    policy::{Apportionment, Declared, Labels, Policy},
};

/// Everything the coordinator knows that others may read.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Every mesh the manager handles.
    pub(crate) meshes: BTreeMap<MeshId, MeshView>,
    /// True once the coordinator routes: namespaces listed, and any lease
    /// an earlier manager granted run out.
    pub(crate) synced: bool,
}

/// One mesh.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct MeshView {
    /// The spec generation processed last.
    pub(crate) generation: Option<i64>,
    /// Why the latest spec is invalid, if it is.
    pub(crate) invalid: Option<String>,
    /// True once a valid policy is in force.
    pub(crate) has_policy: bool,
    /// The types the policy in force routes.
    pub(crate) declared: Option<Declared>,
    /// Namespaces besides the mesh's own whose pods may join.
    pub(crate) runtime_namespaces: Vec<String>,
    /// The weights in force, e.g. `v1=80 v2=20`.
    pub(crate) weights: String,
    /// The subsets in declared order, with their live replicas.
    pub(crate) subsets: Vec<SubsetView>,
    /// Every held key and its holder.
    pub(crate) keys: Arc<BTreeMap<String, KeyView>>,
    /// Keys with objects that the policy routes to a subset, but that no
    /// live runtime holds.
    pub(crate) unowned: usize,
    /// Watches this mesh needs that are failing: (resource, error).
    pub(crate) watch_errors: Vec<(String, String)>,
    /// What is wrong with particular pods.
    pub(crate) notes: Vec<PodNote>,
    /// What the coordinator routes with, for explaining and planning.
    pub(crate) routing: Option<RoutingView>,
    /// Keys revoked to move them, and moves completed, since this manager
    /// started leading.
    pub(crate) moves: (u64, u64),
}

/// The policy in force and the inputs it routes with, shared with the
/// coordinator (cheap to publish: the coordinator copies them only when it
/// changes them while a reader holds them).
#[derive(Clone, Debug)]
pub(crate) struct RoutingView {
    /// The compiled policy.
    pub(crate) policy: Arc<Policy>,
    /// Its exact split of the namespaces that exist.
    pub(crate) apportionment: Arc<Apportionment>,
    /// Every namespace's labels.
    pub(crate) namespaces: Arc<HashMap<String, Labels>>,
}

impl PartialEq for RoutingView {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.policy, &other.policy)
            && Arc::ptr_eq(&self.apportionment, &other.apportionment)
            && Arc::ptr_eq(&self.namespaces, &other.namespaces)
    }
}

// === impl RoutingView ===

impl RoutingView {
    /// The labels of the namespace of `key`.
    pub(crate) fn labels_of(&self, key: &str) -> &Labels {
        static EMPTY: Labels = Labels::new();
        let ns = key.split_once('/').map(|(ns, _)| ns).unwrap_or("");
        self.namespaces.get(ns).unwrap_or(&EMPTY)
    }
}

/// Something wrong with one pod, for the mesh's `Degraded` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodNote {
    /// The condition reason, e.g. `OperatorGone`.
    pub(crate) reason: &'static str,
    /// What happened, naming the pod.
    pub(crate) message: String,
}

/// Who holds one key.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KeyView {
    /// The session holding it.
    pub(crate) holder: Holder,
    /// True while it is being revoked from that holder.
    pub(crate) moving: bool,
}

/// One subset.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SubsetView {
    /// The subset's name.
    pub(crate) name: String,
    /// Its connected replicas.
    pub(crate) replicas: Vec<ReplicaView>,
    /// Its share of the weight split, in percent.
    pub(crate) configured_share: f64,
    /// Keys with objects the policy routes to it, pins included.
    pub(crate) routed_keys: u64,
}

/// One connected runtime.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ReplicaView {
    /// Its session.
    pub(crate) holder: Holder,
    /// True when everything queued for it has been sent.
    pub(crate) ready: bool,
    /// Messages queued for it and not yet sent.
    pub(crate) pending: usize,
    /// True while it is drained: it gets no keys, and its keys move off.
    pub(crate) draining: bool,
    /// What its last heartbeat said about its work.
    pub(crate) load: crate::coordinator::Load,
    /// Keys it owns (not counting keys being revoked).
    pub(crate) owned_keys: u64,
    /// When it was last heard from.
    pub(crate) last_contact: Instant,
    /// When its lease runs out unless renewed.
    pub(crate) lease_until: Instant,
}

/// The latest snapshot, for readers.
#[derive(Debug)]
pub(crate) struct Published {
    current: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
}

// === impl MeshView ===

impl MeshView {
    /// Keys waiting for a `Released`.
    pub(crate) fn moving(&self) -> usize {
        self.keys.values().filter(|k| k.moving).count()
    }
}

// === impl Published ===

impl Published {
    /// An empty snapshot.
    pub(crate) fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            version: watch::channel(0).0,
        }
    }

    /// Replaces the snapshot and wakes readers, if it changed.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        if **self.current.load() == snapshot {
            return;
        }
        self.current.store(Arc::new(snapshot));
        self.version.send_modify(|v| *v += 1);
    }

    /// The current snapshot.
    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Changes whenever a new snapshot is published.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
