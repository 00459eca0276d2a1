//! The runtime's shared state: session, ownership, lease, cache, queue and
//! in-flight reconciles. Each lock is held only for plain data updates, never
//! across an `.await`.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use opmesh_proto::v1::{GroupVersionKind, ObjectEvent, Task, Welcome, object_event::Type};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, watch},
    time::Instant,
};
use tonic::Status;

use crate::{
    cache::{Cache, ObjRef, gvk_key},
    config::Config,
    metrics::Metrics,
    queue::Queue,
};

/// The sending half of an operator's task stream.
pub type TaskSender = mpsc::Sender<Result<Task, Status>>;

/// What the operator declared through `Register`.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    /// The primary type.
    pub primary: GroupVersionKind,
    /// Owned types.
    pub owns: Vec<GroupVersionKind>,
}

/// The current session with the manager.
#[derive(Debug, Default)]
pub struct Session {
    /// Set once welcomed.
    pub runtime_id: String,
    /// The subset the manager resolved.
    pub subset: String,
    /// True once the first `Synced` arrived.
    pub synced: bool,
    /// Keys owned and synced: their events are queued.
    pub owned: HashSet<String>,
    /// Keys assigned since the last `Synced`: not yet dispatched.
    pub unsynced: HashSet<String>,
    /// When the lease ends, if there is one.
    pub lease_until: Option<Instant>,
    /// Keys owned when the last session ended, while that lease lasts: they
    /// are reported in the next hello so a new manager can keep them here.
    /// Nothing is dispatched for them until the manager re-sends them.
    pub held: HashSet<String>,
}

/// A task handed to the operator and not yet completed.
#[derive(Debug)]
pub struct Inflight {
    /// The key.
    pub key: String,
    /// When it was handed out.
    pub started: Instant,
    /// The operator connection it went to.
    pub operator: u64,
    _permit: OwnedSemaphorePermit,
}

/// Shared state of one runtime.
pub struct Runtime {
    /// The settings.
    pub config: Config,
    /// The work queue.
    pub queue: Queue,
    /// The metrics.
    pub metrics: Metrics,
    cache: Mutex<Cache>,
    session: Mutex<Session>,
    inflight: Mutex<HashMap<u64, Inflight>>,
    operator: Mutex<Option<(u64, TaskSender)>>,
    next_id: AtomicU64,
    /// True while shutting down: no new reconciles start.
    draining: std::sync::atomic::AtomicBool,
    /// The registration, announced to the session task.
    pub registration: watch::Sender<Option<Registration>>,
    /// Bumped whenever dispatch conditions or in-flight work change.
    pub changed: watch::Sender<u64>,
}

// === impl Runtime ===

impl Runtime {
    /// Fresh state for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            queue: Queue::new(),
            metrics: Metrics::new("opmesh"),
            cache: Mutex::default(),
            session: Mutex::default(),
            inflight: Mutex::default(),
            operator: Mutex::new(None),
            next_id: AtomicU64::new(1),
            draining: std::sync::atomic::AtomicBool::new(false),
            registration: watch::channel(None).0,
            changed: watch::channel(0).0,
        }
    }

    /// Locks the cache.
    pub fn cache(&self) -> MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    /// Locks the session.
    pub fn session(&self) -> MutexGuard<'_, Session> {
        lock(&self.session)
    }

    /// Wakes everyone waiting on [`Runtime::changed`].
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The registration, if the operator registered.
    pub fn registered(&self) -> Option<Registration> {
        self.registration.borrow().clone()
    }

    /// True when a reconcile may start now: welcomed, synced, lease valid
    /// and an operator connected.
    pub fn can_dispatch(&self) -> bool {
        if self.draining.load(Ordering::Relaxed) {
            return false;
        }
        let s = self.session();
        s.synced
            && s.lease_until.is_some_and(|t| Instant::now() < t)
            && lock(&self.operator).is_some()
    }

    /// True when the session is established and the slice synced (readiness).
    pub fn ready(&self) -> bool {
        let s = self.session();
        s.synced && s.lease_until.is_some_and(|t| Instant::now() < t)
    }

    /// True when `key` is owned and synced and the lease is valid.
    pub fn owns(&self, key: &str) -> (bool, bool) {
        let s = self.session();
        (
            s.owned.contains(key),
            s.lease_until.is_some_and(|t| Instant::now() < t),
        )
    }

    // --- session events ---

    /// A session was accepted; `hello_sent` starts the first lease.
    pub fn welcomed(&self, w: &Welcome, hello_sent: Instant, reported: &[String]) {
        let mut s = self.session();
        // Reported keys wait, like any assignment, for the manager to send
        // them and close the batch with Synced; those it does not keep it
        // revokes. Held keys that were not reported are gone.
        let held = std::mem::take(&mut s.held);
        s.unsynced
            .extend(reported.iter().filter(|k| held.contains(*k)).cloned());
        s.runtime_id = w.runtime_id.clone();
        s.subset = w.subset.clone();
        s.lease_until =
            Some(hello_sent + std::time::Duration::from_millis(u64::from(w.lease_ttl_ms)));
        drop(s);
        self.bump();
    }

    /// The lease was renewed until `until`.
    pub fn renewed(&self, until: Instant) {
        let mut s = self.session();
        if s.lease_until.is_none_or(|t| t < until) {
            s.lease_until = Some(until);
        }
        drop(s);
        self.bump();
    }

    /// An object of an owned (or newly assigned) key changed.
    pub fn on_event(&self, ev: ObjectEvent) {
        let Some(gvk) = ev.gvk.as_ref() else { return };
        let obj: ObjRef = (gvk_key(gvk), ev.namespace.clone(), ev.name.clone());
        let deleted = ev.r#type == Type::Deleted as i32;
        {
            let mut cache = self.cache();
            if deleted {
                cache.delete(&obj);
            } else {
                cache.apply(&ev.key, obj, ev.object);
            }
        }
        let mut s = self.session();
        if s.owned.contains(&ev.key) {
            drop(s);
            if self.queue.add(&ev.key) {
                self.metrics.adds.get_or_create(self.metrics.queue()).inc();
            }
        } else {
            // A new key: hold it until the batch's Synced marker.
            s.unsynced.insert(ev.key);
        }
    }

    /// The current assignment batch is complete: start on its keys.
    pub fn on_synced(&self) {
        let keys: Vec<String> = {
            let mut s = self.session();
            s.synced = true;
            let keys: Vec<String> = s.unsynced.drain().collect();
            s.owned.extend(keys.iter().cloned());
            self.metrics
                .owned_keys
                .set(i64::try_from(s.owned.len()).unwrap_or(i64::MAX));
            keys
        };
        for k in keys {
            if self.queue.add(&k) {
                self.metrics.adds.get_or_create(self.metrics.queue()).inc();
            }
        }
        self.bump();
    }

    /// Drops revoked keys from ownership, queue and cache. The caller then
    /// waits with [`Runtime::drained`] before answering `Released`.
    pub fn revoke(&self, keys: &[String]) {
        {
            let mut s = self.session();
            for k in keys {
                s.owned.remove(k);
                s.unsynced.remove(k);
                s.held.remove(k);
            }
            self.metrics
                .owned_keys
                .set(i64::try_from(s.owned.len()).unwrap_or(i64::MAX));
        }
        let mut cache = self.cache();
        for k in keys {
            self.queue.remove(k);
            cache.drop_key(k);
        }
    }

    /// Waits until no reconcile of any of `keys` is in flight.
    pub async fn drained(&self, keys: &[String]) {
        let set: HashSet<&String> = keys.iter().collect();
        let mut changed = self.changed.subscribe();
        loop {
            let busy = lock(&self.inflight).values().any(|i| set.contains(&i.key));
            if !busy {
                return;
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// The session ended (or its lease ran out): drop every key, since the
    /// manager will give them to another runtime, and cancel running
    /// reconciles, whose writes the SDK's fence now refuses anyway.
    pub fn session_lost(&self) {
        {
            // Cleared under the session lock (order: session, then cache), so
            // a new session's first events cannot be wiped by a late clear.
            let mut s = self.session();
            *s = Session::default();
            self.queue.clear();
            self.cache().clear();
        }
        self.metrics.owned_keys.set(0);
        self.cancel_inflight();
        self.bump();
    }

    /// The session ended but the lease still runs: stop starting reconciles
    /// and forget cached state, but remember the owned keys to report them on
    /// reconnect. Running reconciles finish (or are cancelled when the lease
    /// runs out, see [`Runtime::expire_lease`]).
    pub fn session_ended(&self) {
        let mut s = self.session();
        if s.lease_until.is_none_or(|t| Instant::now() >= t) {
            drop(s);
            self.session_lost();
            return;
        }
        let owned: Vec<String> = s.owned.drain().collect();
        s.held.extend(owned);
        s.unsynced.clear();
        s.synced = false;
        self.queue.clear();
        self.cache().clear();
        drop(s);
        self.metrics.owned_keys.set(0);
        self.bump();
    }

    /// Drops everything if the lease has run out. Checked under the session
    /// lock, so a welcome that renewed the lease wins the race.
    pub fn expire_lease(&self) {
        let lapsed = {
            let s = self.session();
            s.lease_until.is_some_and(|t| Instant::now() >= t)
        };
        if lapsed {
            let mut s = self.session();
            if s.lease_until.is_some_and(|t| Instant::now() >= t) {
                tracing::warn!(
                    "lease ran out; dropping every key and cancelling running reconciles"
                );
                *s = Session::default();
                self.queue.clear();
                self.cache().clear();
                drop(s);
                self.metrics.owned_keys.set(0);
                self.cancel_inflight();
                self.bump();
            }
        }
    }

    /// Keys to report in a hello; none once the lease has run out.
    pub fn held_keys(&self) -> Vec<String> {
        self.expire_lease();
        self.session().held.iter().cloned().collect()
    }

    /// Asks the operator to stop the running reconciles of `keys`.
    pub fn cancel_keys(&self, keys: &[String]) {
        let keys: HashSet<&String> = keys.iter().collect();
        self.cancel_where(|i| keys.contains(&i.key));
    }

    /// Asks the operator to stop every running reconcile.
    pub fn cancel_inflight(&self) {
        self.cancel_where(|_| true);
    }

    fn cancel_where(&self, pick: impl Fn(&Inflight) -> bool) {
        let Some((op, tx)) = lock(&self.operator).clone() else {
            return;
        };
        let ids: Vec<u64> = lock(&self.inflight)
            .iter()
            .filter(|(_, i)| i.operator == op && pick(i))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let cancel = Task {
                id,
                cancel: true,
                ..Default::default()
            };
            if tx.try_send(Ok(cancel)).is_err() {
                tracing::warn!(task = id, "cannot send cancel to the operator");
            }
        }
    }

    /// Stops starting reconciles, for a graceful shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.bump();
    }

    /// Waits until no reconcile is running.
    pub async fn drained_all(&self) {
        let mut changed = self.changed.subscribe();
        while !lock(&self.inflight).is_empty() {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// When the lease ends, if there is one.
    pub fn lease_until(&self) -> Option<Instant> {
        self.session().lease_until
    }

    // --- operator ---

    /// Connects an operator's task stream, replacing any earlier one.
    /// Returns the connection's id.
    pub fn attach_operator(&self, tx: TaskSender) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *lock(&self.operator) = Some((id, tx));
        self.bump();
        id
    }

    /// The operator connection `id` is gone: its unfinished tasks are retried.
    pub fn detach_operator(&self, id: u64) {
        {
            let mut op = lock(&self.operator);
            if op.as_ref().is_some_and(|(i, _)| *i == id) {
                *op = None;
            }
        }
        let orphaned: Vec<Inflight> = {
            let mut inflight = lock(&self.inflight);
            let ids: Vec<u64> = inflight
                .iter()
                .filter(|(_, i)| i.operator == id)
                .map(|(t, _)| *t)
                .collect();
            ids.into_iter()
                .filter_map(|t| inflight.remove(&t))
                .collect()
        };
        for i in orphaned {
            self.queue.done(&i.key);
            if self.owns(&i.key).0 {
                self.queue.add_rate_limited(&i.key);
            }
        }
        self.bump();
    }

    /// Hands `key` with its primary object to the operator. On failure the
    /// key goes back to the queue.
    pub fn hand_out(&self, key: String, object: Vec<u8>, permit: OwnedSemaphorePermit) -> bool {
        let Some((op_id, tx)) = lock(&self.operator).clone() else {
            self.queue.done(&key);
            self.queue.add(&key);
            return false;
        };
        let (subset, runtime_id) = {
            let s = self.session();
            (s.subset.clone(), s.runtime_id.clone())
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inflight).insert(
            id,
            Inflight {
                key: key.clone(),
                started: Instant::now(),
                operator: op_id,
                _permit: permit,
            },
        );
        let task = Task {
            id,
            key,
            object,
            subset,
            runtime_id,
            cancel: false,
        };
        if tx.try_send(Ok(task)).is_err() {
            // The stream is gone or full; undo.
            if let Some(i) = lock(&self.inflight).remove(&id) {
                self.queue.done(&i.key);
                self.queue.add_rate_limited(&i.key);
            }
            return false;
        }
        self.metrics
            .active_workers
            .get_or_create(&self.metrics.controller(None))
            .inc();
        true
    }

    /// Takes the in-flight task `id` off the books.
    pub fn complete(&self, id: u64) -> Option<Inflight> {
        let done = lock(&self.inflight).remove(&id);
        if done.is_some() {
            self.metrics
                .active_workers
                .get_or_create(&self.metrics.controller(None))
                .dec();
        }
        done
    }

    /// The primary object of `key`, from the cache.
    pub fn primary(&self, key: &str) -> Option<Vec<u8>> {
        let reg = self.registered()?;
        let (ns, name) = match key.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => (String::new(), key.to_string()),
        };
        self.cache()
            .get(&(gvk_key(&reg.primary), ns, name))
            .map(|b| b.as_ref().clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks stays consistent even after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
