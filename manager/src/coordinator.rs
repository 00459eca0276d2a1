//! The coordinator: the one owner of the manager's mutable state — the object
//! store, every mesh's policy and ownership, and every runtime session.
//!
//! It does no I/O. [`Coordinator::step`] takes an [`Input`] and the time, and
//! returns the [`Effect`]s its driver must carry out (start a watch); the
//! messages for runtimes go into each session's outbox ([`Pending`]), which
//! the session's writer drains. So the one-owner invariant is kept by plain
//! sequential code and checked in process by the property test below.
//!
//! - [`pending`] — a session's coalescing outbox.
//! - `objects` — watch inputs: objects, Namespaces, meshes.
//! - `sessions` — connect, disconnect, released, lease expiry.
//! - `placement` — moving each key towards its policy owner.
//! - `snapshot` — the typed view every reader gets.
//!
//! Invariant: a key is held by at most one runtime; it leaves a runtime only
//! through revoke → released, a goodbye, or the end of the runtime's lease.

mod notes;
mod objects;
mod pending;
mod placement;
mod sessions;
mod snapshot;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opmesh_proto::v1::Hello;
use tokio::sync::oneshot;

use notes::Notes;
pub(crate) use pending::Pending;

use crate::{
    crd::OperatorMesh,
    error::Refusal,
    gvk::Gvk,
    id::{Holder, MeshId, PodId},
    mesh::Mesh,
    metrics::Metrics,
    object::RawObject,
    policy::Labels,
    watch::{NamespaceLabels, ObjName, WatchEvent},
};

/// Everything the coordinator reacts to.
#[derive(Debug)]
pub(crate) enum Input {
    /// An object of a watched type changed.
    Object {
        /// The type's key.
        gvk: String,
        /// What happened.
        event: WatchEvent<RawObject>,
    },
    /// A Namespace changed.
    Namespace(WatchEvent<NamespaceLabels>),
    /// An OperatorMesh changed.
    Mesh(WatchEvent<OperatorMesh>),
    /// A runtime asks to join; `reply` gets its session or a refusal.
    Connect {
        /// The runtime's hello.
        hello: Box<Hello>,
        /// Labels of the runtime's real Pod.
        pod_labels: Labels,
        /// The real Pod's UID.
        pod_uid: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Connected, Refusal>>,
    },
    /// A session ended.
    Disconnect {
        /// The session's holder.
        holder: Holder,
        /// True after a goodbye: the runtime drained and holds nothing, so its
        /// keys move at once. Otherwise they wait for its lease to run out.
        graceful: bool,
        /// Set when the runtime left because its operator stayed gone: why,
        /// for the mesh's status.
        operator_gone: Option<String>,
    },
    /// A runtime released revoked keys.
    Released {
        /// The session's holder.
        holder: Holder,
        /// The released keys.
        keys: Vec<String>,
    },
    /// Time passed: leases may have run out.
    Tick,
    /// A type a mesh declares, found in the API server's discovery (the
    /// answer to [`Effect::Resolve`]).
    Resolved(Gvk),
    /// A type a mesh declares is not in the API server's discovery (yet):
    /// the answer to [`Effect::Resolve`] while it is looked for again.
    Unresolved {
        /// The type's key.
        key: String,
        /// Why, for the mesh's status.
        error: String,
    },
}

/// What the driver must do for the coordinator.
#[derive(Debug, PartialEq)]
pub(crate) enum Effect {
    /// Start watching this type and feed its events back as [`Input::Object`].
    Watch(Gvk),
    /// Find this type (its plural and scope) in the API server's discovery
    /// and answer with [`Input::Resolved`], or [`Input::Unresolved`] each
    /// time it is not there yet, so its watch starts before any runtime
    /// declares it. A runtime's hello starts a watch that is still missing.
    Resolve(crate::crd::TypeRef),
    /// Stop looking this type (by key) up: no mesh declares it any more.
    StopResolving(String),
}

/// A session the coordinator accepted.
#[derive(Debug)]
pub(crate) struct Connected {
    /// Who holds the session's keys.
    pub(crate) holder: Holder,
    /// The session's outbox; the session's writer drains it.
    pub(crate) pending: Arc<Pending>,
    /// When the runtime was last heard from; the session's reader updates it.
    pub(crate) contact: Contact,
    /// The runtime's mesh.
    pub(crate) mesh: MeshId,
    /// The runtime's subset.
    pub(crate) subset: String,
}

/// When a runtime was last heard from. The session's reader writes it on
/// every message; the coordinator reads it to find silent runtimes, so
/// heartbeats never queue behind the coordinator's inputs.
#[derive(Clone, Debug)]
pub(crate) struct Contact(Arc<Mutex<(Instant, Load)>>);

/// What a runtime's last heartbeat said about its work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Load {
    /// Keys waiting in its queue.
    pub(crate) queue_depth: u32,
    /// Reconciles running.
    pub(crate) in_flight: u32,
    /// Reconciles it runs at once.
    pub(crate) capacity: u32,
}

/// Objects by type key, then `(namespace, name)`.
type Store = HashMap<String, HashMap<ObjName, Arc<RawObject>>>;

struct Session {
    mesh: MeshId,
    holder: Holder,
    /// The real Pod's UID: a drain names a pod by it, so a new pod of the
    /// same name is not drained.
    uid: String,
    pending: Arc<Pending>,
    needs_sync: bool,
    contact: Contact,
    /// The type keys the runtime's hello declared (primaries and owned).
    declared: HashSet<String>,
    /// Revoked keys not yet released, in the order the revokes were sent.
    revoked: std::collections::VecDeque<(Instant, String)>,
    /// The keys of `revoked` still waiting for a `Released`, and when each
    /// was revoked.
    unreleased: HashMap<String, Instant>,
}

/// Keys of a session that ended without a goodbye: held until its lease
/// must have run out.
struct Expiring {
    mesh: MeshId,
    holder: Holder,
    deadline: Instant,
}

struct WatchState {
    /// The type watched.
    gvk: Gvk,
    synced: bool,
    /// The last error, until the watch lists or delivers again.
    error: Option<String>,
}

/// The manager's state. Build with [`Coordinator::new`], then feed it with
/// [`Coordinator::step`].
pub(crate) struct Coordinator {
    lease_ttl: Duration,
    /// The time of the step being processed.
    now: Instant,
    meshes: BTreeMap<MeshId, Mesh>,
    sessions: HashMap<PodId, Session>,
    store: Store,
    watches: HashMap<String, WatchState>,
    /// Types declared by a mesh that were sent to be resolved, by key.
    resolving: HashSet<String>,
    /// Types declared by a mesh that discovery does not know (yet), by
    /// key: why.
    unresolved: HashMap<String, String>,
    /// Every namespace's labels (shared with the published snapshot).
    namespaces: Arc<HashMap<String, Labels>>,
    namespaces_synced: bool,
    /// The Namespace watch's last error, until it lists or delivers again.
    namespaces_error: Option<String>,
    next_session: u64,
    /// Revokes to send, by holder.
    revokes: HashMap<Holder, Vec<String>>,
    expiring: Vec<Expiring>,
    /// Meshes removed while runtimes held their keys: a mesh re-created
    /// under the same name waits until those leases have run out.
    deleted_meshes: HashMap<MeshId, Instant>,
    /// No key is assigned before this: runtimes may still hold leases from
    /// an earlier manager.
    assign_after: Instant,
    started: bool,
    effects: Vec<Effect>,
    dirty: bool,
    /// What the status should say about particular pods.
    notes: Notes,
    /// Counters and the handoff histogram.
    metrics: Arc<Metrics>,
    /// Where primary objects' generations go, for the rollout's
    /// generation-lag analysis.
    generations: Arc<crate::outcomes::Outcomes>,
    /// Told, every [`PROGRESS_EVERY`] keys placed, that the coordinator
    /// still runs: one step may place 100,000 keys, and runtimes' leases
    /// are renewed only while it runs.
    progress: Option<Arc<crate::leader::Authority>>,
    /// Keys placed, counted for `progress`.
    placed: u64,
    /// Counts changes to `namespaces` (labels, appearances, removals), so
    /// a snapshot knows when routing may have changed.
    namespaces_version: u64,
}

/// How many keys the coordinator places between reports of progress.
const PROGRESS_EVERY: u64 = 1024;

impl Input {
    /// What kind of input this is, for logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Input::Object {
                event: WatchEvent::Relisted(_),
                ..
            } => "objects listed",
            Input::Object { .. } => "object",
            Input::Namespace(_) => "namespace",
            Input::Mesh(_) => "mesh",
            Input::Connect { .. } => "connect",
            Input::Disconnect { .. } => "disconnect",
            Input::Released { .. } => "released",
            Input::Tick => "tick",
            Input::Resolved(_) => "type resolved",
            Input::Unresolved { .. } => "type not resolved",
        }
    }
}

// === impl Coordinator ===

impl Coordinator {
    /// A coordinator that starts at `now` and grants leases of `lease_ttl`.
    /// It assigns no key before any lease an earlier manager granted has run
    /// out.
    pub(crate) fn new(lease_ttl: Duration, now: Instant) -> Self {
        Self {
            lease_ttl,
            now,
            meshes: BTreeMap::new(),
            sessions: HashMap::new(),
            store: HashMap::new(),
            watches: HashMap::new(),
            resolving: HashSet::new(),
            unresolved: HashMap::new(),
            namespaces: Arc::default(),
            namespaces_synced: false,
            namespaces_error: None,
            next_session: 1,
            revokes: HashMap::new(),
            expiring: Vec::new(),
            deleted_meshes: HashMap::new(),
            assign_after: now + lease_ttl + margin(lease_ttl),
            started: false,
            effects: Vec::new(),
            dirty: true,
            notes: Notes::default(),
            metrics: Arc::default(),
            generations: Arc::default(),
            progress: None,
            placed: 0,
            namespaces_version: 0,
        }
    }

    /// Counts into `metrics` instead of metrics of its own.
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Notes primary objects' generations in `outcomes`, where the
    /// runtimes' reports say which were reconciled.
    pub(crate) fn with_generations(mut self, outcomes: Arc<crate::outcomes::Outcomes>) -> Self {
        self.generations = outcomes;
        self
    }

    /// Reports progress to `authority` during long steps, as the driver
    /// does between steps.
    pub(crate) fn with_progress(mut self, authority: Arc<crate::leader::Authority>) -> Self {
        self.progress = Some(authority);
        self
    }

    /// Counts one key placed; every [`PROGRESS_EVERY`], says the
    /// coordinator runs.
    fn placed_one(&mut self) {
        self.placed += 1;
        if self.placed.is_multiple_of(PROGRESS_EVERY) {
            self.still_running();
        }
    }

    /// Tells whoever renews leases that the coordinator runs, from inside
    /// a step that goes over every key.
    fn still_running(&self) {
        if let Some(authority) = &self.progress {
            authority.coordinator_ran(Instant::now());
        }
    }

    /// Applies `input` at time `now`, queues what runtimes must hear, and
    /// returns what the driver must do.
    pub(crate) fn step(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        self.now = self.now.max(now);
        match input {
            Input::Object { gvk, event } => self.on_object(&gvk, event),
            Input::Namespace(ev) => self.on_namespace(ev),
            Input::Mesh(ev) => self.on_mesh(ev),
            Input::Connect {
                hello,
                pod_labels,
                pod_uid,
                reply,
            } => {
                let result = self.connect(&hello, &pod_labels, &pod_uid);
                // If the session handler is gone, undo the join so no key waits
                // on a runtime nobody serves. It may hold reported keys under
                // a lease from before: they wait for that lease like any lost
                // session's.
                if let Err(Ok(c)) = reply.send(result) {
                    self.disconnect(&c.holder, false);
                }
            }
            Input::Disconnect {
                holder,
                graceful,
                operator_gone,
            } => {
                if let Some(why) = operator_gone
                    && let Some(session) = self.sessions.get(&holder.pod)
                    && session.holder == holder
                {
                    tracing::warn!(runtime = %holder.pod, reason = %why, "runtime left: its operator is gone");
                    self.notes
                        .operator_gone(&session.mesh.clone(), &holder.pod, &why, self.now);
                }
                self.disconnect(&holder, graceful)
            }
            Input::Released { holder, keys } => self.released(&holder, keys),
            Input::Tick => self.tick(),
            Input::Resolved(gvk) => {
                // Not for a type the meshes stopped declaring meanwhile.
                if self.declared_anywhere(&gvk.key()) {
                    self.ensure_watch(&gvk);
                    // Another mesh's watch may have listed it already.
                    self.adopt_everywhere();
                }
            }
            Input::Unresolved { key, error } => {
                if !self.watches.contains_key(&key)
                    && self.resolving.contains(&key)
                    && self.unresolved.get(&key) != Some(&error)
                {
                    self.dirty = true;
                    self.unresolved.insert(key, error);
                }
            }
        }
        self.flush();
        std::mem::take(&mut self.effects)
    }

    /// True if anything changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Closes every session's outbox: the coordinator is going away.
    pub(crate) fn close(&mut self) {
        for s in self.sessions.values() {
            s.pending.close();
        }
    }

    fn tick(&mut self) {
        if !self.started && self.now >= self.assign_after {
            // Any lease an earlier manager granted has run out.
            self.started = true;
            // The snapshot's `synced` (readiness) changes, meshes or not.
            self.dirty = true;
            self.place_everywhere();
        }
        self.expire();
    }

    /// Asks for the types `spec` declares that are not watched yet to be
    /// resolved, each once.
    fn resolve_declared(&mut self, spec: &crate::crd::OperatorMeshSpec) {
        let declared = spec
            .controllers
            .iter()
            .flat_map(|c| std::iter::once(&c.primary).chain(&c.owns));
        for t in declared {
            let key = t.key();
            if !self.watches.contains_key(&key) && self.resolving.insert(key) {
                self.effects.push(Effect::Resolve(t.clone()));
            }
        }
    }

    /// True when some mesh's policy in force declares the type `key`.
    fn declared_anywhere(&self, key: &str) -> bool {
        self.meshes.values().any(|m| {
            m.policy
                .as_ref()
                .is_some_and(|p| p.declared().types().into_iter().any(|k| k == key))
        })
    }

    /// Stops looking up the types no mesh declares any more (a typo fixed,
    /// a mesh deleted), and forgets why they were not found.
    pub(super) fn forget_undeclared(&mut self) {
        let gone: Vec<String> = self
            .resolving
            .iter()
            .filter(|k| !self.watches.contains_key(*k) && !self.declared_anywhere(k))
            .cloned()
            .collect();
        for key in gone {
            self.resolving.remove(&key);
            if self.unresolved.remove(&key).is_some() {
                self.dirty = true;
            }
            self.effects.push(Effect::StopResolving(key));
        }
    }

    /// Routes the types mesh `id`'s spec declares, without waiting for a
    /// runtime to declare them: its keys are counted, and placed once its
    /// replicas come. A type is adopted once its watch has listed (until
    /// then every key of the mesh would wait for it), an owned type with
    /// its primary, and only while every runtime of the mesh declared it:
    /// a runtime that joined under an earlier spec is not handed keys of a
    /// type it does not run. Returns whether a type was adopted.
    pub(super) fn adopt_declared(&mut self, id: &MeshId) -> bool {
        let Some(mesh) = self.meshes.get(id) else {
            return false;
        };
        let Some(policy) = mesh.policy.clone() else {
            return false;
        };
        let listed = |key: &String| {
            self.watches
                .get(key)
                .filter(|w| w.synced)
                .map(|w| w.gvk.clone())
        };
        let every_runtime_runs = |key: &String| {
            self.sessions
                .values()
                .filter(|s| s.mesh == *id)
                .all(|s| s.declared.contains(key))
        };
        let mut adopt: Vec<(bool, String, Gvk)> = Vec::new();
        for (primary, owns) in policy.declared().controllers() {
            let primary_in = mesh.primaries.contains_key(primary);
            if !primary_in {
                match listed(primary) {
                    Some(g) if every_runtime_runs(primary) => {
                        adopt.push((true, primary.clone(), g));
                    }
                    _ => continue,
                }
            }
            for owned in owns {
                if mesh.owns.contains_key(owned) || !every_runtime_runs(owned) {
                    continue;
                }
                if let Some(g) = listed(owned) {
                    adopt.push((false, owned.clone(), g));
                }
            }
        }
        if adopt.is_empty() {
            return false;
        }
        let Some(mesh) = self.meshes.get_mut(id) else {
            return false;
        };
        for (is_primary, key, g) in adopt {
            tracing::info!(mesh = %id, gvk = %key, "routing a type the mesh declares");
            if is_primary {
                mesh.primaries.insert(key, g);
            } else {
                mesh.owns.insert(key, g);
            }
        }
        self.dirty = true;
        self.index_all_cached(id);
        true
    }

    /// Indexes every cached object of every type mesh `id` routes: an
    /// object of an owned type is indexed only once its primary's type is
    /// routed, so a type added later may make earlier objects indexable.
    /// Already indexed objects are skipped.
    pub(super) fn index_all_cached(&mut self, id: &MeshId) {
        let types: Vec<String> = self
            .meshes
            .get(id)
            .map(|m| m.types().map(Gvk::key).collect())
            .unwrap_or_default();
        for key in types {
            self.index_cached(id, &key);
        }
    }

    /// Adopts declared types into every mesh, placing the keys of each
    /// mesh that adopted one.
    fn adopt_everywhere(&mut self) {
        let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
        for id in ids {
            if self.adopt_declared(&id) {
                self.reapportion(&id);
                self.place_all(&id);
            }
        }
    }

    fn ensure_watch(&mut self, gvk: &Gvk) {
        let key = gvk.key();
        if self.watches.contains_key(&key) {
            return;
        }
        tracing::info!(gvk = %key, "starting watch");
        // From here on, the watch reports its own errors.
        self.unresolved.remove(&key);
        self.dirty = true;
        self.watches.insert(
            key,
            WatchState {
                gvk: gvk.clone(),
                synced: false,
                error: None,
            },
        );
        self.effects.push(Effect::Watch(gvk.clone()));
    }

    /// The deadline after which a runtime last heard from at `last` can no
    /// longer be reconciling: its lease plus the margin.
    fn lease_deadline(&self, last: Instant) -> Instant {
        last + self.lease_ttl + margin(self.lease_ttl)
    }
}

// === impl Contact ===

impl Contact {
    /// A runtime first heard from at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self(Arc::new(Mutex::new((now, Load::default()))))
    }

    /// The runtime was heard from at `now`.
    pub(crate) fn touch(&self, now: Instant) {
        let mut last = self.lock();
        last.0 = last.0.max(now);
    }

    /// The runtime's heartbeat reported `load`.
    pub(crate) fn report(&self, load: Load) {
        self.lock().1 = load;
    }

    /// When the runtime was last heard from.
    pub(crate) fn last(&self) -> Instant {
        self.lock().0
    }

    /// What its last heartbeat said about its work.
    pub(crate) fn load(&self) -> Load {
        self.lock().1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Instant, Load)> {
        // Plain data; a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a runtime may take to answer a revoke: the runtime cancels a
/// reconcile still running a lease TTL after the revoke, so twice the TTL
/// plus the margin is ample. After it, the session is ended and its keys
/// follow the lease-expiry path, so one hung reconcile cannot hold keys
/// forever.
pub(crate) fn revoke_deadline(ttl: Duration) -> Duration {
    2 * ttl + margin(ttl)
}

/// Extra wait on top of the lease TTL before a silent runtime's keys move:
/// a tenth of the TTL, at least 200 ms.
pub(crate) fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(200))
}
