//! Reconciles handed to the operator: the operator connection, tasks in
//! flight, their completion and cancellation.

use std::{collections::HashSet, sync::atomic::Ordering};

use opmesh_proto::v1::Task;
use tokio::{
    runtime::Handle,
    sync::{OwnedSemaphorePermit, mpsc::error::TrySendError},
    time::Instant,
};

use super::{Runtime, TaskSender, lock};

/// A task handed to the operator and not yet completed.
#[derive(Debug)]
pub(crate) struct Inflight {
    /// The key.
    pub(crate) key: String,
    /// When it was handed out.
    pub(crate) started: Instant,
    /// How long it waited in the queue first.
    pub(crate) waited: std::time::Duration,
    /// The primary object's generation then (0 if it has none).
    pub(crate) generation: i64,
    /// The operator connection it went to.
    pub(crate) operator: u64,
    /// That connection's stream: its cancel goes there, even after another
    /// operator connection has replaced it.
    tx: TaskSender,
    _permit: OwnedSemaphorePermit,
}

// === impl Runtime ===

impl Runtime {
    /// Asks the operator to stop the running reconciles of `keys`.
    pub(crate) fn cancel_keys(&self, keys: &[String]) {
        let keys: HashSet<&String> = keys.iter().collect();
        self.cancel_where(|i| keys.contains(&i.key));
    }

    /// Asks the operator to stop every running reconcile.
    pub(crate) fn cancel_inflight(&self) {
        self.cancel_where(|_| true);
    }

    /// Asks the operator to stop the running reconciles `pick` selects,
    /// each on the connection that runs it.
    pub(crate) fn cancel_where(&self, pick: impl Fn(&Inflight) -> bool) {
        let picked: Vec<(u64, TaskSender)> = lock(&self.inflight)
            .iter()
            .filter(|(_, i)| pick(i))
            .map(|(id, i)| (*id, i.tx.clone()))
            .collect();
        for (id, tx) in picked {
            let cancel = Task {
                id,
                cancel: true,
                ..Default::default()
            };
            match tx.try_send(Ok(cancel)) {
                Ok(()) => {}
                // A cancel is never dropped: when the stream is full, wait
                // for room (after the tasks already queued, which it follows).
                Err(TrySendError::Full(cancel)) => match Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(async move {
                            let _ = tx.send(cancel).await;
                        });
                    }
                    Err(_) => tracing::warn!(task = id, "cannot send cancel to the operator"),
                },
                // The operator is gone; detaching it takes its work back.
                Err(TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Connects an operator's task stream, replacing any earlier one for
    /// new tasks. Tasks still running on the earlier one stay tracked until
    /// they complete or it closes, and can still be cancelled there.
    /// Returns the connection's id.
    pub(crate) fn attach_operator(&self, tx: TaskSender) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *lock(&self.operator) = Some((id, tx));
        self.operator_presence(true);
        // A new operator knows nothing: it gets the whole slice again.
        let owned: Vec<String> = self.session().owned.iter().cloned().collect();
        for key in owned {
            self.queue.add(&key);
        }
        self.bump();
        id
    }

    /// The operator connection `id` is gone: its unfinished tasks are retried.
    pub(crate) fn detach_operator(&self, id: u64) {
        {
            let mut op = lock(&self.operator);
            if op.as_ref().is_some_and(|(i, _)| *i == id) {
                *op = None;
                drop(op);
                self.operator_presence(false);
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

    /// Hands `key` with its primary object, read from the cache at
    /// `cache_seq`, to the operator. On failure the key goes back to the
    /// queue.
    pub(crate) fn hand_out(
        &self,
        key: String,
        object: Vec<u8>,
        cache_seq: u64,
        permit: OwnedSemaphorePermit,
        waited: std::time::Duration,
    ) -> bool {
        let Some((op_id, tx)) = lock(&self.operator).clone() else {
            self.queue.done(&key);
            self.queue.add(&key);
            return false;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (subset, runtime_id) = {
            // Checked and booked under the session lock, which a revoke
            // takes to drop the key: either the revoke's wait for the key
            // to drain sees this task, or this sees the key gone. Checking
            // earlier, outside the lock, let a revoke answer `Released` just
            // before the task went out.
            let s = self.session();
            let lease_valid = s.lease_until.is_some_and(|t| Instant::now() < t);
            if !s.owned.contains(&key) || !lease_valid {
                drop(s);
                self.queue.done(&key);
                return false;
            }
            lock(&self.inflight).insert(
                id,
                Inflight {
                    key: key.clone(),
                    started: Instant::now(),
                    waited,
                    generation: generation_of(&object),
                    operator: op_id,
                    tx: tx.clone(),
                    _permit: permit,
                },
            );
            (s.subset.clone(), s.runtime_id.clone())
        };
        let task = Task {
            id,
            key,
            object,
            subset,
            runtime_id,
            cancel: false,
            cache_seq,
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
    /// Reconciles running now.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Removes task `id` from the running ones and returns it.
    pub(crate) fn complete(&self, id: u64) -> Option<Inflight> {
        let done = lock(&self.inflight).remove(&id);
        if done.is_some() {
            self.metrics
                .active_workers
                .get_or_create(&self.metrics.controller(None))
                .dec();
        }
        done
    }
}

/// `metadata.generation` of a JSON object, or 0.
fn generation_of(object: &[u8]) -> i64 {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default)]
        generation: i64,
    }
    #[derive(serde::Deserialize)]
    struct Obj {
        metadata: Meta,
    }
    serde_json::from_slice::<Obj>(object)
        .map(|o| o.metadata.generation)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{Semaphore, mpsc};

    use crate::state::Runtime;

    /// A runtime that owns `keys` under a long lease.
    fn owning(keys: &[&str]) -> Runtime {
        use opmesh_proto::v1::{GroupVersionKind, ObjectEvent, Welcome, object_event::Type};

        let rt = Runtime::for_test(&[]);
        let welcome = Welcome {
            runtime_id: "ops/op-0".into(),
            subset: "v1".into(),
            lease_ttl_ms: 3_600_000,
        };
        rt.welcomed(&welcome, tokio::time::Instant::now(), &[]);
        for key in keys {
            let (ns, name) = key.split_once('/').unwrap();
            rt.on_event(ObjectEvent {
                key: key.to_string(),
                r#type: Type::Applied as i32,
                gvk: Some(GroupVersionKind {
                    version: "v1".into(),
                    kind: "ConfigMap".into(),
                    ..Default::default()
                }),
                namespace: ns.into(),
                name: name.into(),
                object: b"{}".to_vec(),
                ..Default::default()
            });
        }
        rt.on_synced();
        rt
    }

    #[tokio::test]
    async fn a_revoked_key_is_not_handed_out() {
        let rt = owning(&["ns/a"]);
        let (tx, mut rx) = mpsc::channel(8);
        rt.attach_operator(tx);
        // Dispatch decided to hand ns/a out; the revoke lands first.
        rt.revoke(&["ns/a".to_string()]);
        let permits = Arc::new(Semaphore::new(1));
        let permit = permits.clone().acquire_owned().await.unwrap();
        assert!(!rt.hand_out(
            "ns/a".into(),
            b"{}".to_vec(),
            0,
            permit,
            std::time::Duration::ZERO
        ));
        assert!(rx.try_recv().is_err(), "a revoked key went out");
        rt.drained(&["ns/a".to_string()]).await;
    }

    #[tokio::test]
    async fn a_second_operator_connection_does_not_orphan_running_work() {
        let rt = owning(&["ns/a", "ns/b"]);
        let (first, mut first_rx) = mpsc::channel(8);
        let first_id = rt.attach_operator(first);
        let permits = Arc::new(Semaphore::new(2));
        let permit = permits.clone().acquire_owned().await.unwrap();
        assert!(rt.hand_out(
            "ns/a".into(),
            b"{}".to_vec(),
            0,
            permit,
            std::time::Duration::ZERO
        ));
        let task = first_rx.recv().await.unwrap().unwrap();
        // A second connection takes over new work...
        let (second, mut second_rx) = mpsc::channel(8);
        rt.attach_operator(second);
        let permit = permits.clone().acquire_owned().await.unwrap();
        assert!(rt.hand_out(
            "ns/b".into(),
            b"{}".to_vec(),
            0,
            permit,
            std::time::Duration::ZERO
        ));
        assert_eq!(second_rx.recv().await.unwrap().unwrap().key, "ns/b");
        // ...but ns/a still runs on the first: its cancel must reach it.
        rt.cancel_keys(&["ns/a".to_string()]);
        let cancel = tokio::time::timeout(std::time::Duration::from_secs(5), first_rx.recv())
            .await
            .expect("the cancel never reached the connection running the task")
            .unwrap()
            .unwrap();
        assert!(cancel.cancel);
        assert_eq!(cancel.id, task.id);
        assert!(
            second_rx.try_recv().is_err(),
            "the cancel went to the wrong connection"
        );
        // When the first connection goes, its task is taken back.
        rt.detach_operator(first_id);
        assert!(rt.complete(task.id).is_none());
    }

    #[tokio::test]
    async fn a_cancel_is_not_dropped_when_the_operator_stream_is_full() {
        let rt = owning(&["ns/a"]);
        // Room for one message: the task fills it.
        let (tx, mut rx) = mpsc::channel(1);
        rt.attach_operator(tx);
        let permits = Arc::new(Semaphore::new(1));
        let permit = permits.clone().acquire_owned().await.unwrap();
        assert!(rt.hand_out(
            "ns/a".into(),
            b"{}".to_vec(),
            0,
            permit,
            std::time::Duration::ZERO
        ));
        rt.cancel_inflight();
        let task = rx.recv().await.unwrap().unwrap();
        assert!(!task.cancel);
        let cancel = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("the cancel was dropped")
            .unwrap()
            .unwrap();
        assert!(cancel.cancel);
        assert_eq!(cancel.id, task.id);
    }

    #[tokio::test]
    async fn a_revoked_reconcile_is_cancelled_when_the_stream_ends_before_released() {
        let rt = owning(&["ns/a", "ns/b"]);
        let (tx, mut rx) = mpsc::channel(8);
        rt.attach_operator(tx);
        let permits = Arc::new(Semaphore::new(2));
        for key in ["ns/a", "ns/b"] {
            let permit = permits.clone().acquire_owned().await.unwrap();
            assert!(rt.hand_out(
                key.into(),
                b"{}".to_vec(),
                0,
                permit,
                std::time::Duration::ZERO
            ));
        }
        let a = rx.recv().await.unwrap().unwrap();
        let b = rx.recv().await.unwrap().unwrap();
        // ns/a is revoked while it reconciles; then the stream breaks
        // before its Released could be sent.
        rt.revoke(std::slice::from_ref(&a.key));
        rt.session_ended();
        let cancel = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("the revoked reconcile was not cancelled")
            .unwrap()
            .unwrap();
        assert!(cancel.cancel);
        assert_eq!(cancel.id, a.id);
        // ns/b is still held under the lease and reported to the next
        // manager: its reconcile goes on.
        assert!(rx.try_recv().is_err(), "{b:?} was cancelled too");
    }
}
