//! The manager's core: one task that owns the object store, every mesh's
//! policy and ownership, and every runtime session, and turns events into
//! messages on the runtimes' pending sets.
//!
//! A single owner means no locks around ownership: the invariant that a key
//! has at most one holder is kept by plain sequential code ([`Ownership`]).
//! Status is published as a snapshot on a `watch` channel for the status
//! writer, so readers never touch the core's state.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{Client, ResourceExt as _, api::DynamicObject, core::TypeMeta};
use opmesh_proto::v1::{
    Hello, ManagerMessage, ObjectEvent, Revoke, Synced, Welcome, manager_message::Msg,
    object_event::Type as EventType,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    crd::OperatorMesh,
    error::Refusal,
    ownership::{Holder, Move, Ownership, RuntimeId},
    pending::Pending,
    policy::Policy,
    selector::Labels,
    watch::{self as watches, Gvk, NamespaceLabels, ObjName, Task, WatchEvent},
};

/// How often the status snapshot is refreshed when something changed.
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How often leases and silent runtimes are checked.
const LEASE_EVERY: Duration = Duration::from_millis(50);

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Input {
    /// An object of a watched type changed.
    Object {
        /// The type's key (`group/version/Kind`).
        gvk: String,
        /// What happened.
        event: WatchEvent<DynamicObject>,
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
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Connected, Refusal>>,
    },
    /// A session ended.
    Disconnect {
        /// The runtime.
        runtime: RuntimeId,
        /// The session's sequence number, so a stale session cannot end a newer one.
        seq: u64,
        /// True after a goodbye: the runtime drained and holds nothing, so its
        /// keys move at once. Otherwise they wait for its lease to run out.
        graceful: bool,
    },
    /// A runtime released revoked keys.
    Released {
        /// The runtime.
        runtime: RuntimeId,
        /// The session's sequence number.
        seq: u64,
        /// The released keys.
        keys: Vec<String>,
    },
}

/// A session the core accepted.
#[derive(Debug)]
pub struct Connected {
    /// The runtime's id.
    pub runtime: RuntimeId,
    /// The session's sequence number.
    pub seq: u64,
    /// The runtime's pending set; the session's writer drains it.
    pub pending: Arc<Pending>,
    /// When the runtime was last heard from; the session's reader updates it.
    pub last_contact: Arc<Mutex<Instant>>,
}

/// What the status writer needs to know about one mesh.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshStatus {
    /// The spec generation processed last.
    pub generation: Option<i64>,
    /// Why the latest spec is invalid, if it is.
    pub invalid: Option<String>,
    /// True once a valid policy is in force.
    pub has_policy: bool,
    /// Keys waiting for a `Released`.
    pub moving: usize,
    /// Keys with no live owner although the policy names a subset.
    pub unowned: usize,
    /// The weights in force.
    pub weights: String,
    /// Per subset: (name, replicas, ready replicas, owned keys).
    pub subsets: Vec<(String, u32, u32, u64)>,
    /// Watches this mesh needs that are failing: (resource, error).
    pub watch_errors: Vec<(String, String)>,
}

/// Status of every mesh, keyed by `namespace/name`.
pub type StatusSnapshot = BTreeMap<String, MeshStatus>;

struct Mesh {
    namespace: String,
    name: String,
    generation: Option<i64>,
    policy: Option<Arc<Policy>>,
    invalid: Option<String>,
    primary: Option<Gvk>,
    owns: BTreeMap<String, Gvk>,
    own: Ownership,
    /// The objects of each key: `(gvk key, namespace, name)`.
    objects: HashMap<String, HashSet<(String, String, String)>>,
    /// The key each object belongs to.
    key_of: HashMap<(String, String, String), String>,
    /// Keys runtimes reported holding when they (re)connected, by holder,
    /// not yet adopted or revoked.
    reported: HashMap<String, String>,
    /// No key is assigned before this: runtimes of an earlier mesh of the
    /// same name may still hold leases.
    not_before: Instant,
    /// True until `not_before` has passed and the keys were placed.
    waiting: bool,
}

struct Session {
    mesh: String,
    seq: u64,
    /// The holder id of this session's keys: `pod@seq`.
    holder: String,
    pending: Arc<Pending>,
    needs_sync: bool,
    last_contact: Arc<Mutex<Instant>>,
}

/// Keys of a session that ended without a goodbye: held until its lease
/// must have run out.
struct Expiring {
    mesh: String,
    holder: String,
    deadline: Instant,
}

struct WatchState {
    synced: bool,
    /// The last error, until the watch lists or delivers again.
    error: Option<String>,
    _task: Task,
}

/// The core's state. Build with [`Core::new`], then [`Core::run`].
pub struct Core {
    client: Client,
    tx: mpsc::Sender<Input>,
    lease_ttl: Duration,
    meshes: BTreeMap<String, Mesh>,
    sessions: HashMap<RuntimeId, Session>,
    store: HashMap<String, HashMap<ObjName, Arc<DynamicObject>>>,
    watches: HashMap<String, WatchState>,
    namespaces: HashMap<String, Labels>,
    namespaces_synced: bool,
    /// The Namespace watch's last error, until it lists or delivers again.
    namespaces_error: Option<String>,
    next_seq: u64,
    /// Revokes to send, by holder.
    revokes: HashMap<String, Vec<String>>,
    expiring: Vec<Expiring>,
    /// Meshes removed while runtimes held their keys: a mesh re-created
    /// under the same name waits until those leases have run out.
    deleted_meshes: HashMap<String, Instant>,
    /// No key is assigned before this: runtimes may still hold leases from
    /// an earlier manager.
    assign_after: Instant,
    status: watch::Sender<Arc<StatusSnapshot>>,
    dirty: bool,
}

// === impl Core ===

impl Core {
    /// A core that talks to the API server through `client`. `tx` must be the
    /// sender of the channel later passed to [`Core::run`].
    pub fn new(
        client: Client,
        tx: mpsc::Sender<Input>,
        lease_ttl: Duration,
    ) -> (Self, watch::Receiver<Arc<StatusSnapshot>>) {
        let (status, status_rx) = watch::channel(Arc::new(StatusSnapshot::new()));
        let core = Self {
            client,
            tx,
            lease_ttl,
            meshes: BTreeMap::new(),
            sessions: HashMap::new(),
            store: HashMap::new(),
            watches: HashMap::new(),
            namespaces: HashMap::new(),
            namespaces_synced: false,
            namespaces_error: None,
            next_seq: 1,
            revokes: HashMap::new(),
            expiring: Vec::new(),
            deleted_meshes: HashMap::new(),
            assign_after: Instant::now() + lease_ttl + margin(lease_ttl),
            status,
            dirty: true,
        };
        (core, status_rx)
    }

    /// Processes inputs until every sender is gone. `namespaces` and `meshes`
    /// are the watch tasks the core's lifetime owns.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>, _owned: Vec<Task>) {
        let mut tick = tokio::time::interval(STATUS_EVERY);
        let mut leases = tokio::time::interval(LEASE_EVERY);
        let mut started = false;
        loop {
            tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    self.flush();
                }
                _ = leases.tick() => {
                    if !started && Instant::now() >= self.assign_after {
                        // Any lease an earlier manager granted has run out.
                        started = true;
                        let ids: Vec<String> = self.meshes.keys().cloned().collect();
                        for id in ids {
                            self.place_all(&id);
                        }
                    }
                    self.expire();
                    self.flush();
                }
                _ = tick.tick() => {
                    if std::mem::take(&mut self.dirty) {
                        self.publish_status();
                    }
                }
            }
        }
        for s in self.sessions.values() {
            s.pending.close();
        }
    }

    fn handle(&mut self, input: Input) {
        self.dirty = true;
        match input {
            Input::Object { gvk, event } => self.on_object(&gvk, event),
            Input::Namespace(ev) => self.on_namespace(ev),
            Input::Mesh(ev) => self.on_mesh(ev),
            Input::Connect {
                hello,
                pod_labels,
                reply,
            } => {
                let result = self.connect(hello, pod_labels);
                // If the session handler is gone, undo the join so no key waits
                // on a runtime nobody serves.
                if let Err(Ok(c)) = reply.send(result) {
                    // It may hold reported keys under a lease from before;
                    // let them wait for that lease like any lost session's.
                    self.disconnect(&c.runtime, c.seq, false);
                }
            }
            Input::Disconnect {
                runtime,
                seq,
                graceful,
            } => self.disconnect(&runtime, seq, graceful),
            Input::Released { runtime, seq, keys } => self.released(&runtime, seq, keys),
        }
    }

    // --- objects ---

    fn on_object(&mut self, gvk: &str, event: WatchEvent<DynamicObject>) {
        let failed = match &event {
            WatchEvent::Failed(e) => Some(e.clone()),
            _ => None,
        };
        if let Some(w) = self.watches.get_mut(gvk) {
            w.error = failed;
        }
        match event {
            WatchEvent::Failed(_) => {}
            WatchEvent::Apply(obj) => self.object_changed(gvk, obj, false),
            WatchEvent::Delete(obj) => self.object_changed(gvk, obj, true),
            WatchEvent::Relisted(present) => {
                let gone: Vec<Arc<DynamicObject>> = self
                    .store
                    .get(gvk)
                    .into_iter()
                    .flat_map(|m| m.iter())
                    .filter(|(name, _)| !present.contains(*name))
                    .map(|(_, o)| o.clone())
                    .collect();
                for obj in gone {
                    self.object_changed(gvk, obj, true);
                }
                let newly_synced = self
                    .watches
                    .get_mut(gvk)
                    .is_some_and(|w| !std::mem::replace(&mut w.synced, true));
                if newly_synced {
                    let ids: Vec<String> = self.meshes.keys().cloned().collect();
                    for id in ids {
                        self.place_all(&id);
                    }
                }
            }
        }
    }

    fn object_changed(&mut self, gvk: &str, obj: Arc<DynamicObject>, deleted: bool) {
        let name = watches::name_of(obj.as_ref());
        let store = self.store.entry(gvk.to_string()).or_default();
        if deleted {
            store.remove(&name);
        } else {
            store.insert(name.clone(), obj.clone());
        }
        let objref = (gvk.to_string(), name.0.clone(), name.1.clone());
        let ids: Vec<String> = self.meshes.keys().cloned().collect();
        for id in ids {
            let Some(mesh) = self.meshes.get_mut(&id) else {
                continue;
            };
            let new_key = if deleted {
                None
            } else {
                mesh.key_for(gvk, &obj)
            };
            let old_key = mesh.key_of.get(&objref).cloned();
            if old_key.is_none() && new_key.is_none() {
                continue;
            }
            if let Some(k) = &old_key {
                if let Some(set) = mesh.objects.get_mut(k) {
                    set.remove(&objref);
                }
                mesh.key_of.remove(&objref);
            }
            if let Some(k) = &new_key {
                mesh.objects
                    .entry(k.clone())
                    .or_default()
                    .insert(objref.clone());
                mesh.key_of.insert(objref.clone(), k.clone());
            }
            // Tell the holders; an object whose key changed is gone from the old key.
            let mut notify: Vec<(String, bool)> = Vec::new();
            if let Some(k) = old_key.filter(|k| new_key.as_ref() != Some(k)) {
                notify.push((k, false));
            }
            if let Some(k) = new_key {
                notify.push((k, true));
            }
            for (key, exists) in notify {
                let Some(mesh) = self.meshes.get_mut(&id) else {
                    break;
                };
                match mesh.own.holder(&key) {
                    Some(Holder::Owned(holder)) => {
                        // A holder without a session gets the state when its
                        // keys are reassigned.
                        if let Some(s) = session_of(&mut self.sessions, holder) {
                            let ty = if exists {
                                EventType::Applied
                            } else {
                                EventType::Deleted
                            };
                            push_object(&s.pending, &key, ty, &obj, gvk_of(mesh, gvk));
                        }
                    }
                    // The next owner gets the current state once the key is released.
                    Some(Holder::Revoking(_)) => {}
                    None => {
                        if mesh.objects.get(&key).is_some_and(|s| s.is_empty()) {
                            // Nothing left and nobody holds it: forget the key,
                            // so memory stays O(live keys).
                            mesh.objects.remove(&key);
                        } else {
                            self.place(&id, &key);
                        }
                    }
                }
            }
        }
    }

    /// Indexes the objects already cached for `gvk` into mesh `id`: a mesh
    /// that starts using a watch another mesh runs sees what that watch has
    /// seen, not only what changes from now on.
    fn index_cached(&mut self, id: &str, gvk: &str) {
        let (Some(mesh), Some(store)) = (self.meshes.get_mut(id), self.store.get(gvk)) else {
            return;
        };
        for (name, obj) in store {
            let objref = (gvk.to_string(), name.0.clone(), name.1.clone());
            if mesh.key_of.contains_key(&objref) {
                continue;
            }
            if let Some(key) = mesh.key_for(gvk, obj) {
                mesh.objects
                    .entry(key.clone())
                    .or_default()
                    .insert(objref.clone());
                mesh.key_of.insert(objref, key);
            }
        }
    }

    // --- namespaces ---

    fn on_namespace(&mut self, ev: WatchEvent<NamespaceLabels>) {
        self.namespaces_error = match &ev {
            WatchEvent::Failed(e) => Some(e.clone()),
            _ => None,
        };
        let changed: Option<String> = match ev {
            WatchEvent::Failed(_) => None,
            WatchEvent::Apply(o) => {
                let ((_, name), labels) = o.as_ref();
                let old = self.namespaces.insert(name.clone(), labels.clone());
                (old.as_ref() != Some(labels)).then(|| name.clone())
            }
            WatchEvent::Delete(o) => {
                self.namespaces.remove(&o.0.1);
                None
            }
            WatchEvent::Relisted(present) => {
                self.namespaces
                    .retain(|ns, _| present.contains(&(String::new(), ns.clone())));
                if !std::mem::replace(&mut self.namespaces_synced, true) {
                    let ids: Vec<String> = self.meshes.keys().cloned().collect();
                    for id in ids {
                        self.place_all(&id);
                    }
                }
                None
            }
        };
        if let Some(ns) = changed {
            let prefix = format!("{ns}/");
            let ids: Vec<String> = self.meshes.keys().cloned().collect();
            for id in ids {
                let keys: Vec<String> = self
                    .meshes
                    .get(&id)
                    .map(|m| m.all_keys().filter(|k| k.starts_with(&prefix)).collect())
                    .unwrap_or_default();
                for k in keys {
                    self.place(&id, &k);
                }
            }
        }
    }

    // --- meshes ---

    fn on_mesh(&mut self, ev: WatchEvent<OperatorMesh>) {
        match ev {
            WatchEvent::Apply(om) => {
                let id = format!("{}/{}", om.namespace().unwrap_or_default(), om.name_any());
                let not_before = self.deleted_meshes.remove(&id);
                let mesh = self.meshes.entry(id.clone()).or_insert_with(|| Mesh {
                    waiting: not_before.is_some(),
                    not_before: not_before.unwrap_or_else(Instant::now),
                    namespace: om.namespace().unwrap_or_default(),
                    name: om.name_any(),
                    generation: None,
                    policy: None,
                    invalid: None,
                    primary: None,
                    owns: BTreeMap::new(),
                    own: Ownership::default(),
                    objects: HashMap::new(),
                    key_of: HashMap::new(),
                    reported: HashMap::new(),
                });
                mesh.generation = om.metadata.generation;
                match Policy::compile(&om.spec) {
                    Ok(p) => {
                        mesh.policy = Some(Arc::new(p));
                        mesh.invalid = None;
                    }
                    Err(e) => {
                        // The last valid policy stays in force.
                        tracing::warn!(mesh = %id, error = %e, "invalid OperatorMesh spec");
                        mesh.invalid = Some(e.to_string());
                        return;
                    }
                }
                self.place_all(&id);
            }
            WatchEvent::Delete(om) => {
                let id = format!("{}/{}", om.namespace().unwrap_or_default(), om.name_any());
                self.remove_mesh(&id);
            }
            // Logged by the watch; without it the manager cannot know any
            // mesh, so there is no status to report it in.
            WatchEvent::Failed(_) => {}
            WatchEvent::Relisted(present) => {
                let gone: Vec<String> = self
                    .meshes
                    .values()
                    .filter(|m| !present.contains(&(m.namespace.clone(), m.name.clone())))
                    .map(|m| format!("{}/{}", m.namespace, m.name))
                    .collect();
                for id in gone {
                    self.remove_mesh(&id);
                }
            }
        }
    }

    // --- sessions ---

    fn connect(&mut self, hello: Box<Hello>, pod_labels: Labels) -> Result<Connected, Refusal> {
        let id = format!("{}/{}", hello.mesh_namespace, hello.mesh_name);
        let runtime = format!("{}/{}", hello.pod_namespace, hello.pod_name);
        let mesh = self
            .meshes
            .get_mut(&id)
            .ok_or_else(|| Refusal::UnknownMesh(id.clone()))?;
        let policy = mesh.policy.clone().ok_or_else(|| Refusal::NoValidPolicy {
            mesh: id.clone(),
            reason: mesh.invalid.clone().unwrap_or_default(),
        })?;
        let subset = policy
            .subset_for_pod(&pod_labels)
            .map_err(|e| Refusal::NotAMember {
                pod: runtime.clone(),
                mesh: id.clone(),
                reason: e.to_string(),
            })?;
        let primary = hello
            .primary
            .as_ref()
            .map(Gvk::from)
            .ok_or_else(|| Refusal::Malformed("hello.primary is missing".into()))?;
        if let Some(existing) = &mesh.primary
            && existing.key() != primary.key()
        {
            return Err(Refusal::PrimaryMismatch {
                mesh: id,
                declared: primary.key(),
                existing: existing.key(),
            });
        }
        // GVKs this mesh declares for the first time: another mesh may
        // already watch them, so their cached objects are indexed below.
        let mut declared = Vec::new();
        if mesh.primary.is_none() {
            declared.push(primary.key());
        }
        mesh.primary = Some(primary.clone());
        for g in &hello.owns {
            let g = Gvk::from(g);
            if mesh.owns.insert(g.key(), g.clone()).is_none() {
                declared.push(g.key());
            }
        }
        let wanted: Vec<Gvk> = std::iter::once(primary)
            .chain(mesh.owns.values().cloned())
            .collect();
        for g in wanted {
            self.ensure_watch(g);
        }
        for gvk in declared {
            self.index_cached(&id, &gvk);
        }

        // A newer session from the same pod replaces the old one, whose keys
        // wait for its lease like any vanished session's.
        if let Some(old) = self.sessions.get(&runtime) {
            let seq = old.seq;
            self.disconnect(&runtime, seq, false);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let pending = Arc::new(Pending::default());
        let subset_name = policy.subsets()[subset].name.clone();
        pending.control(ManagerMessage {
            msg: Some(Msg::Welcome(Welcome {
                runtime_id: runtime.clone(),
                subset: subset_name.clone(),
                lease_ttl_ms: u32::try_from(self.lease_ttl.as_millis()).unwrap_or(u32::MAX),
                epoch: seq,
            })),
        });
        let last_contact = Arc::new(Mutex::new(Instant::now()));
        self.sessions.insert(
            runtime.clone(),
            Session {
                mesh: id.clone(),
                seq,
                holder: format!("{runtime}@{seq}"),
                pending: pending.clone(),
                needs_sync: true,
                last_contact: last_contact.clone(),
            },
        );
        if let Some(mesh) = self.meshes.get_mut(&id) {
            mesh.own.join(subset, &runtime);
            let holder = format!("{runtime}@{seq}");
            for held in &hello.held {
                mesh.reported.insert(held.key.clone(), holder.clone());
            }
        }
        tracing::info!(mesh = %id, runtime = %runtime, subset = %subset_name, held = hello.held.len(), "runtime joined");
        // Reported keys first: they can stay where they are without waiting.
        for held in &hello.held {
            self.place(&id, &held.key);
        }
        self.place_all(&id);
        Ok(Connected {
            runtime,
            seq,
            pending,
            last_contact,
        })
    }

    fn disconnect(&mut self, runtime: &str, seq: u64, graceful: bool) {
        if self.sessions.get(runtime).is_none_or(|s| s.seq != seq) {
            return;
        }
        let Some(session) = self.sessions.remove(runtime) else {
            return;
        };
        session.pending.close();
        self.revokes.remove(&session.holder);
        if let Some(mesh) = self.meshes.get_mut(&session.mesh) {
            mesh.own.leave(runtime);
            // Keys it reported but that were not placed yet are still its own
            // until its lease runs out.
            let unplaced: Vec<String> = mesh
                .reported
                .iter()
                .filter(|(_, h)| **h == session.holder)
                .map(|(k, _)| k.clone())
                .collect();
            for k in unplaced {
                mesh.reported.remove(&k);
                if mesh.own.holder(&k).is_none() {
                    mesh.own.mark_revoking(&k, &session.holder);
                }
            }
        }
        if graceful {
            tracing::info!(mesh = %session.mesh, runtime = %runtime, "runtime said goodbye; its keys move now");
            if let Some(mesh) = self.meshes.get_mut(&session.mesh) {
                mesh.own.free(&session.holder);
            }
        } else {
            // It may still be reconciling until its lease runs out, which is at
            // most one TTL after the last heartbeat we heard.
            let last = *lock(&session.last_contact);
            let deadline = last + self.lease_ttl + margin(self.lease_ttl);
            tracing::info!(mesh = %session.mesh, runtime = %runtime, wait = ?deadline.saturating_duration_since(Instant::now()), "runtime lost; its keys move when its lease has run out");
            self.expiring.push(Expiring {
                mesh: session.mesh.clone(),
                holder: session.holder.clone(),
                deadline,
            });
        }
        self.place_all(&session.mesh);
    }

    /// Drops a mesh and ends its sessions. Their runtimes drop their keys
    /// when their leases run out; until then a mesh re-created under the
    /// same name assigns nothing.
    fn remove_mesh(&mut self, id: &str) {
        self.meshes.remove(id);
        let gone: Vec<RuntimeId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.mesh == id)
            .map(|(r, _)| r.clone())
            .collect();
        let mut until = Instant::now();
        for r in gone {
            if let Some(s) = self.sessions.remove(&r) {
                s.pending.close();
                until = until.max(*lock(&s.last_contact) + self.lease_ttl + margin(self.lease_ttl));
            }
        }
        self.deleted_meshes.insert(id.to_string(), until);
        self.expiring.retain(|e| e.mesh != id);
    }

    /// Frees the keys of sessions whose lease has run out, and ends sessions
    /// that went silent.
    fn expire(&mut self) {
        let now = Instant::now();
        self.deleted_meshes.retain(|_, t| *t > now);
        let waking: Vec<String> = self
            .meshes
            .iter_mut()
            .filter(|(_, m)| m.waiting && m.not_before <= now)
            .map(|(id, m)| {
                m.waiting = false;
                id.clone()
            })
            .collect();
        for id in waking {
            self.place_all(&id);
        }
        let limit = self.lease_ttl + margin(self.lease_ttl);
        let silent: Vec<(RuntimeId, u64)> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(*lock(&s.last_contact)) > limit)
            .map(|(r, s)| (r.clone(), s.seq))
            .collect();
        for (runtime, seq) in silent {
            tracing::warn!(runtime = %runtime, "no heartbeat for longer than the lease; ending the session");
            self.disconnect(&runtime, seq, false);
        }
        let (due, rest): (Vec<Expiring>, Vec<Expiring>) = std::mem::take(&mut self.expiring)
            .into_iter()
            .partition(|e| e.deadline <= now);
        self.expiring = rest;
        for e in due {
            self.dirty = true;
            if let Some(mesh) = self.meshes.get_mut(&e.mesh) {
                let freed = mesh.own.free(&e.holder);
                if !freed.is_empty() {
                    tracing::info!(mesh = %e.mesh, holder = %e.holder, keys = freed.len(), "lease expired; reassigning");
                }
            }
            self.place_all(&e.mesh);
        }
    }

    fn released(&mut self, runtime: &str, seq: u64, keys: Vec<String>) {
        let Some(session) = self.sessions.get(runtime).filter(|s| s.seq == seq) else {
            return;
        };
        let (id, holder) = (session.mesh.clone(), session.holder.clone());
        for key in keys {
            let freed = self
                .meshes
                .get_mut(&id)
                .is_some_and(|m| m.own.released(&holder, &key));
            if freed {
                self.place(&id, &key);
            }
        }
    }

    // --- placement ---

    fn place_all(&mut self, id: &str) {
        let keys: Vec<String> = match self.meshes.get(id) {
            Some(m) => m.all_keys().collect(),
            None => return,
        };
        for k in keys {
            self.place(id, &k);
        }
    }

    /// True when the mesh's view of the cluster is complete enough to route.
    fn synced(&self, mesh: &Mesh) -> bool {
        self.namespaces_synced
            && mesh.policy.is_some()
            && mesh.primary.is_some()
            && mesh
                .primary
                .iter()
                .chain(mesh.owns.values())
                .all(|g| self.watches.get(&g.key()).is_some_and(|w| w.synced))
    }

    fn place(&mut self, id: &str, key: &str) {
        let Some(mesh) = self.meshes.get(id) else {
            return;
        };
        if !self.synced(mesh) {
            return;
        }
        let Some(policy) = mesh.policy.clone() else {
            return;
        };
        let ns = key.split_once('/').map(|(ns, _)| ns).unwrap_or("");
        let empty = Labels::new();
        let ns_labels = self.namespaces.get(ns).unwrap_or(&empty);
        let has_objects = mesh.objects.get(key).is_some_and(|s| !s.is_empty());
        let desired = if has_objects {
            policy
                .route(key, ns_labels)
                .and_then(|s| mesh.own.pick(s, key))
                .and_then(|pod| self.sessions.get(pod))
                .map(|s| s.holder.clone())
        } else {
            None
        };
        let Some(mesh) = self.meshes.get_mut(id) else {
            return;
        };
        if let Some(reporter) = mesh.reported.remove(key) {
            let pod = |h: &str| h.rsplit_once('@').map(|(p, _)| p.to_string());
            if let Some(Holder::Owned(h) | Holder::Revoking(h)) = mesh.own.holder(key)
                && pod(h) != pod(&reporter)
            {
                // Another runtime holds it: the reporter must let go.
                tracing::warn!(key, holder = %h, reporter = %reporter, "reported key is held elsewhere; revoking it from the reporter");
                self.revokes
                    .entry(reporter)
                    .or_default()
                    .push(key.to_string());
                return;
            }
            // Unowned, or held by an earlier session of the same pod, which
            // the reporter now is: keep it there if the policy agrees, without
            // waiting for leases; otherwise take it back through a revoke.
            let keep = desired.as_ref() == Some(&reporter) || (policy.paused() && has_objects);
            if keep {
                mesh.own.adopt(key, &reporter);
                send_key(&mut self.sessions, &self.store, mesh, &reporter, key);
            } else {
                mesh.own.mark_revoking(key, &reporter);
                self.revokes
                    .entry(reporter)
                    .or_default()
                    .push(key.to_string());
            }
            return;
        }
        // Anything else waits until no lease from an earlier manager (or
        // an earlier mesh of this name) can still be running.
        if Instant::now() < self.assign_after.max(mesh.not_before) {
            return;
        }
        match mesh.own.place(key, desired.as_ref(), policy.paused()) {
            Some(Move::Assign(holder, key)) => {
                send_key(&mut self.sessions, &self.store, mesh, &holder, &key);
            }
            Some(Move::Revoke(runtime, key)) => {
                self.revokes.entry(runtime).or_default().push(key);
            }
            None => {}
        }
    }

    /// Sends the batched revokes and the `Synced` markers that close each
    /// assignment batch.
    fn flush(&mut self) {
        let revokes: Vec<(String, Vec<String>)> = self.revokes.drain().collect();
        for (holder, keys) in revokes {
            if let Some(s) = session_of(&mut self.sessions, &holder) {
                s.pending
                    .drop_keys(&keys.iter().map(String::as_str).collect());
                s.pending.control(ManagerMessage {
                    msg: Some(Msg::Revoke(Revoke { keys, epoch: s.seq })),
                });
            }
        }
        for s in self.sessions.values_mut() {
            if std::mem::take(&mut s.needs_sync) {
                s.pending.control(ManagerMessage {
                    msg: Some(Msg::Synced(Synced { epoch: s.seq })),
                });
            }
        }
    }

    fn ensure_watch(&mut self, gvk: Gvk) {
        let key = gvk.key();
        if self.watches.contains_key(&key) {
            return;
        }
        tracing::info!(gvk = %key, "starting watch");
        let task = watches::objects(self.client.clone(), gvk, self.tx.clone());
        self.watches.insert(
            key,
            WatchState {
                synced: false,
                error: None,
                _task: task,
            },
        );
    }

    fn publish_status(&self) {
        let mut snap = StatusSnapshot::new();
        for (id, mesh) in &self.meshes {
            let mut subsets = Vec::new();
            let mut unowned = 0;
            if let Some(policy) = &mesh.policy {
                let mut owned: HashMap<&str, u64> = HashMap::new();
                for k in mesh.all_keys_ref() {
                    match mesh.own.holder(k) {
                        Some(Holder::Owned(r)) => *owned.entry(r.as_str()).or_default() += 1,
                        Some(Holder::Revoking(_)) => {}
                        None => {
                            let has = mesh.objects.get(k).is_some_and(|s| !s.is_empty());
                            let ns = k.split_once('/').map(|(ns, _)| ns).unwrap_or("");
                            let labels = self.namespaces.get(ns).cloned().unwrap_or_default();
                            if has && policy.route(k, &labels).is_some() {
                                unowned += 1;
                            }
                        }
                    }
                }
                for (i, s) in policy.subsets().iter().enumerate() {
                    let members: Vec<&RuntimeId> = mesh.own.members(i).collect();
                    let ready = members
                        .iter()
                        .filter(|r| {
                            self.sessions
                                .get(r.as_str())
                                .is_some_and(|s| s.pending.is_empty())
                        })
                        .count();
                    let keys: u64 = members
                        .iter()
                        .filter_map(|r| self.sessions.get(r.as_str()))
                        .map(|s| owned.get(s.holder.as_str()).copied().unwrap_or(0))
                        .sum();
                    subsets.push((
                        s.name.clone(),
                        u32::try_from(members.len()).unwrap_or(u32::MAX),
                        u32::try_from(ready).unwrap_or(u32::MAX),
                        keys,
                    ));
                }
            }
            let mut watch_errors: Vec<(String, String)> = mesh
                .primary
                .iter()
                .chain(mesh.owns.values())
                .filter_map(|g| {
                    let key = g.key();
                    let err = self.watches.get(&key)?.error.clone()?;
                    Some((key, err))
                })
                .collect();
            if let Some(e) = &self.namespaces_error {
                watch_errors.push(("/v1/Namespace".into(), e.clone()));
            }
            snap.insert(
                id.clone(),
                MeshStatus {
                    watch_errors,
                    generation: mesh.generation,
                    invalid: mesh.invalid.clone(),
                    has_policy: mesh.policy.is_some(),
                    moving: mesh.own.revoking(),
                    unowned,
                    weights: mesh
                        .policy
                        .as_ref()
                        .map(|p| p.weights_summary())
                        .unwrap_or_default(),
                    subsets,
                },
            );
        }
        self.status.send_if_modified(|old| {
            if **old == snap {
                false
            } else {
                *old = Arc::new(snap);
                true
            }
        });
    }
}

// === impl Mesh ===

impl Mesh {
    /// The primary key an object of type `gvk` belongs to in this mesh.
    fn key_for(&self, gvk: &str, obj: &DynamicObject) -> Option<String> {
        let primary = self.primary.as_ref()?;
        let ns = obj.namespace();
        let join = |name: &str| match &ns {
            Some(ns) if primary.namespaced => format!("{ns}/{name}"),
            _ => name.to_string(),
        };
        if gvk == primary.key() {
            return Some(join(&obj.name_any()));
        }
        if !self.owns.contains_key(gvk) {
            return None;
        }
        // Secondary objects follow their controller owner of the primary kind.
        let api_version = primary.api_version();
        obj.owner_references()
            .iter()
            .find(|o| {
                o.controller == Some(true) && o.kind == primary.kind && o.api_version == api_version
            })
            .map(|o| join(&o.name))
    }

    fn all_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.all_keys_ref().cloned()
    }

    fn all_keys_ref(&self) -> impl Iterator<Item = &String> + '_ {
        let held = self
            .own
            .held_keys()
            .filter(|k| !self.objects.contains_key(*k));
        self.objects.keys().chain(held)
    }
}

/// Sends every object of `key` to `holder`'s session, to be closed by a
/// `Synced` marker at the next flush.
fn send_key(
    sessions: &mut HashMap<RuntimeId, Session>,
    store: &HashMap<String, HashMap<ObjName, Arc<DynamicObject>>>,
    mesh: &Mesh,
    holder: &str,
    key: &str,
) {
    let Some(s) = session_of(sessions, holder) else {
        return;
    };
    for (g, ns, name) in mesh.objects.get(key).into_iter().flatten() {
        if let Some(obj) = store
            .get(g)
            .and_then(|m| m.get(&(ns.clone(), name.clone())))
        {
            push_object(&s.pending, key, EventType::Applied, obj, gvk_of(mesh, g));
        }
    }
    s.needs_sync = true;
}

/// The session that holds keys as `holder` (`pod@seq`), if still connected.
fn session_of<'a>(
    sessions: &'a mut HashMap<RuntimeId, Session>,
    holder: &str,
) -> Option<&'a mut Session> {
    let (runtime, _) = holder.rsplit_once('@')?;
    sessions.get_mut(runtime).filter(|s| s.holder == holder)
}

fn gvk_of<'a>(mesh: &'a Mesh, key: &str) -> Option<&'a Gvk> {
    mesh.primary
        .as_ref()
        .filter(|p| p.key() == key)
        .or_else(|| mesh.owns.get(key))
}

fn push_object(
    pending: &Pending,
    key: &str,
    ty: EventType,
    obj: &DynamicObject,
    gvk: Option<&Gvk>,
) {
    let Some(gvk) = gvk else { return };
    let mut obj = obj.clone();
    // Lists omit apiVersion/kind on items; typed clients need them.
    obj.types = Some(TypeMeta {
        api_version: gvk.api_version(),
        kind: gvk.kind.clone(),
    });
    let bytes = match serde_json::to_vec(&obj) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(key, error = %e, "cannot encode object; skipping");
            return;
        }
    };
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    pending.object(
        key,
        &gvk.key(),
        &namespace.clone(),
        &name.clone(),
        ManagerMessage {
            msg: Some(Msg::Event(ObjectEvent {
                key: key.to_string(),
                r#type: ty as i32,
                resource_version: obj.resource_version().unwrap_or_default(),
                object: bytes,
                gvk: Some(gvk.into()),
                namespace,
                name,
                epoch: 0,
            })),
        },
    );
}

/// Extra wait on top of the lease TTL before a silent runtime's keys move:
/// a tenth of the TTL, at least 200 ms.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(200))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data; a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
