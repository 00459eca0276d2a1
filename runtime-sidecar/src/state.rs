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

use opmesh_proto::v1::{
    ControllerTypes, GroupVersionKind, ObjectEvent, ReconcileReport, Task, Welcome,
    object_event::Type,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::Status;

use crate::{
    cache::{Cache, ObjRef},
    config::Config,
    metrics::Metrics,
    queue::Queue,
};

/// The sending half of an operator's task stream.
pub(crate) type TaskSender = mpsc::Sender<Result<Task, Status>>;

/// What the operator declared through `Register`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Registration {
    /// The operator's controllers: each a primary type and its owned types.
    pub(crate) controllers: Vec<ControllerTypes>,
    /// How many reconciles the operator asked for at once (0: no
    /// preference).
    pub(crate) concurrency: u32,
    /// The operator's version, reported with each outcome.
    pub(crate) operator_version: String,
}

impl Registration {
    /// The primary type keys, sorted: what tells one registration from
    /// another.
    pub(crate) fn primaries(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .controllers
            .iter()
            .filter_map(|c| c.primary.as_ref().map(GroupVersionKind::key))
            .collect();
        keys.sort();
        keys
    }

    /// How many reconciles run at once: the operator's choice, capped by
    /// the flag; the flag alone; or 1.
    pub(crate) fn max_concurrent(&self, flag: Option<u32>) -> u32 {
        let asked = (self.concurrency > 0).then_some(self.concurrency);
        match (flag, asked) {
            (Some(f), Some(a)) => f.min(a),
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => 1,
        }
    }
}

/// The current session with the manager.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// Set once welcomed.
    pub(crate) runtime_id: String,
    /// The subset the manager resolved.
    pub(crate) subset: String,
    /// True once the first `Synced` arrived.
    pub(crate) synced: bool,
    /// Keys owned and synced: their events are queued.
    pub(crate) owned: HashSet<String>,
    /// Keys assigned since the last `Synced`: not yet dispatched.
    pub(crate) unsynced: HashSet<String>,
    /// When the lease ends, if there is one.
    pub(crate) lease_until: Option<Instant>,
    /// Keys owned when the last session ended, while that lease lasts: they
    /// are reported in the next hello so a new manager can keep them here.
    /// Nothing is dispatched for them until the manager re-sends them.
    pub(crate) held: HashSet<String>,
    /// Keys revoked but not yet `Released`: the manager gives them to no one
    /// before that (or before the revoke's deadline), so a reconcile still
    /// running on one may go on writing; none starts.
    pub(crate) releasing: HashSet<String>,
}

/// Shared state of one runtime.
pub(crate) struct Runtime {
    /// The settings.
    pub(crate) config: Config,
    /// The work queue.
    pub(crate) queue: Queue,
    /// The metrics.
    pub(crate) metrics: Metrics,
    cache: Mutex<Cache>,
    session: Mutex<Session>,
    inflight: Mutex<HashMap<u64, Inflight>>,
    operator: Mutex<Option<(u64, TaskSender)>>,
    next_id: AtomicU64,
    /// True while shutting down: no new reconciles start.
    draining: std::sync::atomic::AtomicBool,
    /// The operator said it is stopping; cleared when one attaches.
    operator_leaving: std::sync::atomic::AtomicBool,
    /// Since when no operator has been attached, once one was.
    operator_absent_since: Mutex<Option<Instant>>,
    /// The registration, announced to the session task.
    pub(crate) registration: watch::Sender<Option<Registration>>,
    /// Bumped whenever dispatch conditions or in-flight work change.
    pub(crate) changed: watch::Sender<u64>,
    /// Reconcile outcomes not yet sent to the manager, and how many were
    /// dropped because the buffer was full.
    reports: Mutex<(Vec<ReconcileReport>, u64)>,
}

/// The most outcomes buffered between two batches; older ones are dropped
/// (and counted) beyond it.
const MAX_REPORTS: usize = 10_000;

mod inflight;
mod operator;

pub(crate) use inflight::Inflight;

// === impl Runtime ===

impl Runtime {
    /// Fresh state for `config`.
    pub(crate) fn new(config: Config) -> Self {
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
            operator_leaving: std::sync::atomic::AtomicBool::new(false),
            operator_absent_since: Mutex::new(None),
            registration: watch::channel(None).0,
            changed: watch::channel(0).0,
            reports: Mutex::default(),
        }
    }

    /// Buffers one reconcile's outcome for the next batch to the manager.
    pub(crate) fn report(&self, report: ReconcileReport) {
        let mut r = lock(&self.reports);
        if r.0.len() >= MAX_REPORTS {
            r.0.remove(0);
            r.1 += 1;
        }
        r.0.push(report);
    }

    /// The buffered outcomes, oldest first, and how many were dropped;
    /// empties the buffer.
    pub(crate) fn take_reports(&self) -> (Vec<ReconcileReport>, u64) {
        std::mem::take(&mut *lock(&self.reports))
    }

    /// Locks the cache.
    pub(crate) fn cache(&self) -> MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    /// Locks the session.
    pub(crate) fn session(&self) -> MutexGuard<'_, Session> {
        lock(&self.session)
    }

    /// Wakes everyone waiting on [`Runtime::changed`].
    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The registration, if the operator registered.
    pub(crate) fn registered(&self) -> Option<Registration> {
        self.registration.borrow().clone()
    }

    /// The registered operator's version, without copying the rest of the
    /// registration (it is read for every reconcile's report).
    pub(crate) fn operator_version(&self) -> String {
        self.registration
            .borrow()
            .as_ref()
            .map(|r| r.operator_version.clone())
            .unwrap_or_default()
    }

    /// True when a reconcile may start now: welcomed, synced, lease valid
    /// and an operator connected.
    pub(crate) fn can_dispatch(&self) -> bool {
        if self.draining.load(Ordering::Relaxed) || self.operator_leaving.load(Ordering::Relaxed) {
            return false;
        }
        let s = self.session();
        s.synced
            && s.lease_until.is_some_and(|t| Instant::now() < t)
            && lock(&self.operator).is_some()
    }

    /// True when an operator is attached and not stopping, the session is
    /// established and the slice synced (readiness).
    pub(crate) fn ready(&self) -> bool {
        if !self.operator_present() {
            return false;
        }
        let s = self.session();
        s.synced && s.lease_until.is_some_and(|t| Instant::now() < t)
    }

    /// True when `key` is owned and synced and the lease is valid.
    pub(crate) fn owns(&self, key: &str) -> (bool, bool) {
        let s = self.session();
        (
            s.owned.contains(key),
            s.lease_until.is_some_and(|t| Instant::now() < t),
        )
    }

    /// True when a running reconcile of `key` may write: the key is owned,
    /// held under the lease after a session blip, or revoked but not yet
    /// released. The lease is checked separately.
    pub(crate) fn may_write(&self, key: &str) -> bool {
        let s = self.session();
        s.owned.contains(key) || s.held.contains(key) || s.releasing.contains(key)
    }

    /// The revoked `keys` are about to be reported `Released`: from now on
    /// their writes are refused.
    pub(crate) fn releasing_done(&self, keys: &[String]) {
        let mut s = self.session();
        for k in keys {
            s.releasing.remove(k);
        }
    }

    /// How long the lease lasts from now; zero once it has run out.
    pub(crate) fn lease_remaining(&self) -> std::time::Duration {
        self.session()
            .lease_until
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    // --- session events ---

    /// A session was accepted; `hello_sent` starts the first lease.
    pub(crate) fn welcomed(&self, w: &Welcome, hello_sent: Instant, reported: &[String]) {
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
    pub(crate) fn renewed(&self, until: Instant) {
        let mut s = self.session();
        if s.lease_until.is_none_or(|t| t < until) {
            s.lease_until = Some(until);
        }
        drop(s);
        self.bump();
    }

    /// An object of an owned (or newly assigned) key changed.
    pub(crate) fn on_event(&self, ev: ObjectEvent) {
        let Some(gvk) = ev.gvk.as_ref() else { return };
        let obj: ObjRef = (gvk.key(), ev.namespace.clone(), ev.name.clone());
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
    pub(crate) fn on_synced(&self) {
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
    pub(crate) fn revoke(&self, keys: &[String]) {
        {
            let mut s = self.session();
            for k in keys {
                let had = s.owned.remove(k) | s.held.remove(k);
                s.unsynced.remove(k);
                if had {
                    s.releasing.insert(k.clone());
                }
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
    pub(crate) async fn drained(&self, keys: &[String]) {
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
    pub(crate) fn session_lost(&self) {
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
    pub(crate) fn session_ended(&self) {
        let mut s = self.session();
        if s.lease_until.is_none_or(|t| Instant::now() >= t) {
            drop(s);
            self.session_lost();
            return;
        }
        let owned: Vec<String> = s.owned.drain().collect();
        s.held.extend(owned);
        s.unsynced.clear();
        // Their Released is lost with the stream; their reconciles are
        // cancelled below and may write no more.
        s.releasing.clear();
        s.synced = false;
        let held = s.held.clone();
        self.queue.clear();
        self.cache().clear();
        drop(s);
        // Revoked keys still draining lost their Released with the stream:
        // the manager frees them when this session's lease ends, even if a
        // new session renews the lease meanwhile, so their reconciles stop
        // now.
        self.cancel_where(|i| !held.contains(&i.key));
        self.metrics.owned_keys.set(0);
        self.bump();
    }

    /// Drops everything if the lease has run out. Checked under the session
    /// lock, so a welcome that renewed the lease wins the race.
    pub(crate) fn expire_lease(&self) {
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
    pub(crate) fn held_keys(&self) -> Vec<String> {
        self.expire_lease();
        // The manager refuses a longer list; keys not reported are let go
        // (see `welcomed`) and wait out the lease there.
        self.session()
            .held
            .iter()
            .take(opmesh_proto::MAX_HELD_KEYS)
            .cloned()
            .collect()
    }

    /// Stops starting reconciles, for a graceful shutdown.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.bump();
    }

    /// Waits until no reconcile is running.
    pub(crate) async fn drained_all(&self) {
        let mut changed = self.changed.subscribe();
        while !lock(&self.inflight).is_empty() {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// When the lease ends, if there is one.
    pub(crate) fn lease_until(&self) -> Option<Instant> {
        self.session().lease_until
    }

    /// The primary object of `key`, from the cache, and the cache's
    /// sequence number it was read at. The key names the object and its
    /// type.
    pub(crate) fn primary(&self, key: &str) -> Option<(Vec<u8>, u64)> {
        let (object, gvk) = opmesh_proto::parse_key(key);
        let (ns, name) = match object.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => (String::new(), object.to_string()),
        };
        let cache = self.cache();
        let bytes = cache.get(&(gvk?, ns, name))?;
        Some((bytes.as_ref().clone(), cache.seq()))
    }
}

#[cfg(test)]
impl Runtime {
    /// A runtime as its flags (plus `extra`) would make it, not connected
    /// to any manager.
    pub(crate) fn for_test(extra: &[&str]) -> Self {
        use clap::Parser as _;
        let mut args = vec![
            "opmesh-runtime",
            "--mesh",
            "ops/mesh",
            "--pod-namespace",
            "ops",
            "--pod-name",
            "op-0",
        ];
        args.extend_from_slice(extra);
        Self::new(Config::try_parse_from(args).expect("test flags parse"))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks stays consistent even after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_runtime_reports_no_more_held_keys_than_a_hello_may_carry() {
        let rt = Runtime::for_test(&[]);
        {
            let mut s = rt.session();
            s.lease_until = Some(Instant::now() + std::time::Duration::from_secs(3600));
            s.held = (0..opmesh_proto::MAX_HELD_KEYS + 10)
                .map(|i| format!("ns/k{i}@ConfigMap.v1"))
                .collect();
        }
        let reported = rt.held_keys();
        assert_eq!(reported.len(), opmesh_proto::MAX_HELD_KEYS);
        // Those not reported are let go once welcomed.
        let welcome = Welcome {
            runtime_id: "ops/op-0".into(),
            subset: "v1".into(),
            lease_ttl_ms: 3_600_000,
        };
        rt.welcomed(&welcome, Instant::now(), &reported);
        assert_eq!(rt.session().unsynced.len(), opmesh_proto::MAX_HELD_KEYS);
        assert!(rt.session().held.is_empty());
    }
}
