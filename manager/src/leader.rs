//! Leader election through a Kubernetes Lease, and this manager's authority
//! bounded by its own clock.
//!
//! A leader that cannot reach the apiserver must not go on believing it
//! leads: the Lease is taken over by another manager once it has not been
//! renewed for its duration, whatever this one thinks. So leadership here
//! is a deadline, not a flag: after each successful renewal, this manager
//! leads until `sent + duration - margin`, where `sent` is when it *sent*
//! the renewal. It stops routing, renewing runtime leases and accepting
//! sessions at that instant, whether or not it can reach the apiserver.
//!
//! # Timing argument
//!
//! - Let `D` be the Lease duration and `m = max(D/10, 500 ms)` the margin.
//!   This manager's renewal is written at some time after `sent`; another
//!   manager takes over only after it has seen the same record unchanged
//!   for `D` on its own clock, starting after it first read that record. So
//!   takeover happens after `sent + D·(1-ρ)`, where `ρ` is the bound on how
//!   much faster the other manager's clock runs. With `ρ ≤ m/D` (10% for
//!   the default 15 s), the takeover comes after this manager's deadline
//!   `sent + D - m`. Clock *offsets* do not matter: only durations on each
//!   machine's monotonic clock are compared.
//! - A runtime lease this manager renewed at `t ≤ deadline` lasts until
//!   `t + ttl` at most (the runtime counts from when it sent the heartbeat,
//!   before `t`). A new leader assigns no unreported key before `ttl` plus
//!   a margin after it starts, which is after the takeover, after the
//!   deadline. So no runtime lease of the old leader is alive when the new
//!   leader hands out a key.
//! - Runtime leases are also renewed only while the coordinator runs: the
//!   driver ticks every 50 ms, and a heartbeat is answered only if it ticked
//!   within half a runtime TTL. A stalled or dead coordinator cannot keep
//!   leases alive.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;

use crate::{config::Config, task::Task};

/// May this manager act as the leader right now? Shared by the election,
/// the coordinator's driver and the gRPC edge.
#[derive(Debug)]
pub(crate) struct Authority {
    /// False when there is no election: this manager is the only one.
    elected: bool,
    /// With an election: this manager leads until this instant.
    until: watch::Sender<Option<Instant>>,
    /// When the coordinator's driver last ran.
    coordinator_seen: Mutex<Option<Instant>>,
}

// === impl Authority ===

impl Authority {
    /// The authority of a manager that leads by election (`elected`) or
    /// alone.
    pub(crate) fn new(elected: bool) -> Self {
        Self {
            elected,
            until: watch::channel(None).0,
            coordinator_seen: Mutex::new(None),
        }
    }

    /// True if this manager leads at `now`, by its own clock.
    pub(crate) fn leading(&self, now: Instant) -> bool {
        !self.elected || self.until.borrow().is_some_and(|until| now < until)
    }

    /// Waits until this manager leads.
    pub(crate) async fn wait_leading(&self) {
        let mut rx = self.until.subscribe();
        loop {
            if self.leading(Instant::now()) {
                return;
            }
            if rx.changed().await.is_err() {
                // The election is gone; this manager will never lead.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The coordinator's driver ran at `now`.
    pub(crate) fn coordinator_ran(&self, now: Instant) {
        *lock(&self.coordinator_seen) = Some(now);
    }

    /// True if a runtime's heartbeat may renew its lease of `ttl` at `now`:
    /// this manager leads and its coordinator ran within half a TTL.
    pub(crate) fn may_renew(&self, now: Instant, ttl: Duration) -> bool {
        self.leading(now)
            && lock(&self.coordinator_seen)
                .is_some_and(|seen| now.saturating_duration_since(seen) < ttl / 2)
    }

    fn lead_until(&self, until: Option<Instant>) -> bool {
        let was = self.leading(Instant::now());
        self.until.send_replace(until);
        was
    }
}

/// The margin by which a leader stops before its Lease could be taken over.
pub(crate) fn margin(duration: Duration) -> Duration {
    (duration / 10).max(Duration::from_millis(500))
}

/// Starts competing for the Lease named in `config`, recording in
/// `authority` until when this manager leads. Dropping the task stops
/// competing (the Lease then lapses on its own).
pub(crate) async fn elect(
    client: Client,
    config: &Config,
    authority: std::sync::Arc<Authority>,
) -> anyhow::Result<Task> {
    let identity = identity(config);
    let api: Api<Lease> = Api::namespaced(client, &config.lease_namespace);
    let name = config.lease_name.clone();
    // Fail fast with what to fix when the Lease cannot be read at all.
    api.get_opt(&name).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read Lease {}/{} for --leader-election ({e}); the manager needs get, create \
             and update on leases.coordination.k8s.io in --lease-namespace",
            config.lease_namespace,
            name
        )
    })?;
    let duration = Duration::from_secs(config.leader_lease_seconds);
    tracing::info!(identity = %identity, lease = %name, "competing for the lead");
    Ok(Task::spawn(async move {
        let mut election = Election {
            api,
            name,
            identity,
            duration,
            observed: Observed::new(),
        };
        // Renew three times per duration, and try as often to take over.
        let period = duration / 3;
        loop {
            let sent = Instant::now();
            match tokio::time::timeout(period, election.attempt()).await {
                Ok(Ok(true)) => {
                    let until = sent + duration - margin(duration);
                    if !authority.lead_until(Some(until)) {
                        tracing::info!(identity = %election.identity, "leading");
                    }
                    tracing::debug!(
                        sent_ms_ago = sent.elapsed().as_millis() as u64,
                        leads_for_ms =
                            until.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "renewed the leader Lease"
                    );
                }
                Ok(Ok(false)) => {
                    if authority.lead_until(None) {
                        tracing::warn!("another manager holds the leader Lease");
                    }
                }
                // Leadership, if held, lapses by itself at its deadline.
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew or acquire the leader Lease")
                }
                Err(_) => tracing::warn!("renewing the leader Lease timed out"),
            }
            tokio::time::sleep(period.saturating_sub(sent.elapsed())).await;
        }
    }))
}

/// This manager's name in the Lease: `--identity`, or the host name (the
/// pod name in a cluster) with a random suffix, so that two managers
/// started without one never share it.
fn identity(config: &Config) -> String {
    if !config.identity.is_empty() {
        return config.identity.clone();
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "opmesh-manager".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}-{}-{nonce:08x}", std::process::id())
}

struct Election {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Another holder's record, and when this manager first saw it.
    observed: Observed<(String, Option<MicroTime>)>,
}

/// Another manager's Lease record, and when this manager first read it.
///
/// The holder's renewal was written before this manager's read returned, so
/// counting a record's age from when the read *returned* never starts
/// before the renewal did. Counting from when the read was *sent* would: a
/// read delayed in flight past the holder's last renewal would start the
/// wait early, and a takeover could come while the holder still leads by
/// its own clock (the leader model test in `leader/tests.rs` finds this).
#[derive(Debug)]
pub(crate) struct Observed<R> {
    seen: Option<(R, Instant)>,
}

impl<R: PartialEq> Observed<R> {
    /// Nothing observed yet.
    pub(crate) fn new() -> Self {
        Self { seen: None }
    }

    /// `record` was read by a request that returned at `read_at`: true once
    /// the same record has been seen unchanged for `held_for`.
    pub(crate) fn expired(&mut self, record: R, read_at: Instant, held_for: Duration) -> bool {
        let since = match &self.seen {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.seen = Some((record, read_at));
                read_at
            }
        };
        read_at >= since + held_for
    }
}

// === impl Election ===

impl Election {
    /// One try to acquire or renew: true if this manager holds the Lease
    /// afterwards. The caller counts its authority from before the call.
    async fn attempt(&mut self) -> kube::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        // The record was read at the latest now: counting from here, not
        // from `sent`, is what keeps a slow read from starting the wait
        // before the holder's last renewal (see `Observed`).
        let read_at = Instant::now();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity && !holder.is_empty() {
            let record = (holder.clone(), spec.renew_time.clone());
            let held_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            if !self.observed.expired(record, read_at, held_for) {
                return Ok(false);
            }
            tracing::info!(previous = %holder, "the leader Lease expired; taking over");
        }
        if holder != self.identity {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // The resourceVersion makes this a compare-and-swap.
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }
}

/// A write that lost a race (409) means another manager holds the Lease.
fn conflict_is_false(result: kube::Result<Lease>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data; a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
