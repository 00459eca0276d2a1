//! The coordinator's task: feeds it watch events, sessions and the clock,
//! carries out its effects (starting watches), and publishes its snapshots.
//! All the I/O around the pure [`Coordinator`] is here.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use kube::Client;
use tokio::sync::mpsc;

use crate::{
    coordinator::{Coordinator, Effect, Input},
    leader::Authority,
    snapshot::Published,
    task::Task,
    watch,
};

/// How often leases and silent runtimes are checked.
const LEASE_EVERY: Duration = Duration::from_millis(50);
/// How often the snapshot is refreshed when something changed.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);
/// The longest wait between two looks for a type a mesh declares that
/// discovery does not know (its CRD may be installed after the mesh).
const RESOLVE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long a slow snapshot build may hold off the next one, unless the
/// build itself took longer than a third of it.
const STALE_AT_MOST: Duration = Duration::from_secs(5);

/// What the driver needs besides its inputs.
pub(crate) struct Driver {
    /// Talks to the API server for the watches.
    pub(crate) client: Client,
    /// Only meshes in this namespace, when set.
    pub(crate) mesh_namespace: Option<String>,
    /// The lease TTL granted to runtimes.
    pub(crate) lease_ttl: Duration,
    /// Where snapshots go.
    pub(crate) published: Arc<Published>,
    /// Whether this manager may still lead.
    pub(crate) authority: Arc<Authority>,
    /// What the coordinator counts.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Where primary objects' generations go.
    pub(crate) outcomes: Arc<crate::outcomes::Outcomes>,
}

// === impl Driver ===

impl Driver {
    /// Runs the coordinator on `inputs` until this manager stops leading (by
    /// its own clock) or the task is stopped; every session is closed then.
    /// `tx` is the sender of `inputs`, for the watches the driver starts.
    pub(crate) async fn run(self, tx: mpsc::Sender<Input>, mut inputs: mpsc::Receiver<Input>) {
        let mut coordinator = Coordinator::new(self.lease_ttl, Instant::now())
            .with_metrics(self.metrics.clone())
            .with_generations(self.outcomes.clone())
            .with_progress(self.authority.clone());
        // The watches live as long as this task.
        let mut watches = vec![
            forward(
                watch::namespaces(self.client.clone()),
                tx.clone(),
                Input::Namespace,
            ),
            forward(
                watch::meshes(self.client.clone(), self.mesh_namespace.as_deref()),
                tx.clone(),
                Input::Mesh,
            ),
        ];
        // Lookups of declared types in discovery, by type key.
        let mut resolvers: std::collections::HashMap<String, Task> = Default::default();
        let mut leases = tokio::time::interval(LEASE_EVERY);
        let mut publish = tokio::time::interval(PUBLISH_EVERY);
        // Building a snapshot stops routing for as long as it takes: see
        // `next_publish`.
        let mut publish_after = Instant::now();
        loop {
            let effects = tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    let (kind, began) = (input.kind(), Instant::now());
                    let effects = coordinator.step(input, began);
                    slow(kind, began, self.lease_ttl);
                    effects
                }
                _ = leases.tick() => {
                    let now = Instant::now();
                    if !self.authority.leading(now) {
                        tracing::warn!("this manager's leader Lease may be taken over by now, by its own clock; closing every session and stopping");
                        break;
                    }
                    self.authority.coordinator_ran(now);
                    let effects = coordinator.step(Input::Tick, now);
                    slow("tick", now, self.lease_ttl);
                    effects
                }
                _ = publish.tick() => {
                    let began = Instant::now();
                    if began >= publish_after && coordinator.take_dirty() {
                        self.published.publish(coordinator.snapshot());
                        publish_after = next_publish(began, began.elapsed());
                        slow("snapshot", began, self.lease_ttl);
                    }
                    continue;
                }
            };
            for effect in effects {
                match effect {
                    Effect::Resolve(t) => {
                        let task = Task::spawn(resolve(self.client.clone(), t.clone(), tx.clone()));
                        resolvers.insert(t.key(), task);
                    }
                    Effect::StopResolving(key) => {
                        resolvers.remove(&key);
                    }
                    Effect::Watch(gvk) => {
                        let key = gvk.key();
                        watches.push(forward(
                            watch::objects(self.client.clone(), &gvk),
                            tx.clone(),
                            move |event| Input::Object {
                                gvk: key.clone(),
                                event,
                            },
                        ));
                    }
                }
            }
        }
        coordinator.close();
    }
}

/// Looks `t` up in discovery until it is found, and hands it to the
/// coordinator; says why each time it is not there.
async fn resolve(client: kube::Client, t: crate::crd::TypeRef, tx: mpsc::Sender<Input>) {
    let key = t.key();
    let mut wait = Duration::from_secs(1);
    loop {
        let input = match watch::resolve(&client, &t).await {
            Ok(gvk) => {
                let _ = tx.send(Input::Resolved(gvk)).await;
                return;
            }
            Err(e) => {
                tracing::info!(gvk = %key, error = %e, retry_in = ?wait, "a type a mesh declares is not in the API server's discovery (yet)");
                let what = format!("{} {}", t.api_version, t.kind);
                let not_served = match &e {
                    kube::Error::Discovery(_) => true,
                    kube::Error::Api(status) => status.code == 404,
                    _ => false,
                };
                Input::Unresolved {
                    key: key.clone(),
                    error: if not_served {
                        format!(
                            "{what} is not served by the API server ({e}); install its CRD, or \
                             fix spec.controllers"
                        )
                    } else {
                        format!("cannot look {what} up in the API server's discovery: {e}")
                    },
                }
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESOLVE_BACKOFF_MAX);
    }
}

/// When the next snapshot may be built, after one that began at `began`
/// and took `took`. A build stops routing for as long as it takes (most
/// reuse what the last one built and take microseconds; a full one after a
/// large sync takes seconds at 100,000 keys), so the next waits ten times
/// that: the coordinator spends at most a tenth of its time on snapshots.
/// But the admin API, `/readyz` and rollout analysis read the snapshot, so
/// the wait is capped at [`STALE_AT_MOST`], or three times the build when
/// that is longer (a third of the time, and only while builds take over
/// 1.7 s).
fn next_publish(began: Instant, took: Duration) -> Instant {
    began + (took * 10).min(STALE_AT_MOST.max(took * 3))
}

/// Logs a coordinator step that held up everything else for long: a tenth
/// of the lease TTL. Runtimes' leases are renewed only while the
/// coordinator runs within half a TTL, so steps this long are what puts
/// them at risk.
fn slow(what: &str, began: Instant, ttl: Duration) {
    let took = began.elapsed();
    if took >= ttl / 10 {
        tracing::warn!(
            step = what,
            ?took,
            "the coordinator was busy for long on one step"
        );
    }
}

/// Feeds `stream` into the coordinator's inputs; a full channel slows the
/// watch down.
fn forward<T: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
    tx: mpsc::Sender<Input>,
    wrap: impl Fn(T) -> Input + Send + 'static,
) -> Task {
    Task::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(wrap(item)).await.is_err() {
                return; // the coordinator is gone; so is the manager
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_snapshot_holds_off_the_next_for_ten_times_as_long_within_a_cap() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Cheap builds: ten times their cost.
        assert_eq!(next_publish(t, ms(1)), t + ms(10));
        assert_eq!(next_publish(t, ms(400)), t + ms(4_000));
        // Slower: the cap bounds how stale readers get.
        assert_eq!(next_publish(t, ms(2_700)), t + ms(8_100));
        assert_eq!(next_publish(t, ms(1_000)), t + STALE_AT_MOST);
        assert_eq!(next_publish(t, ms(6_000)), t + ms(18_000));
    }
}
