//! Hands queued keys to the operator, at most `max_concurrent_reconciles` at
//! once, and only while the runtime may reconcile.

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::state::Runtime;

/// Runs until the queue shuts down or `shutdown` fires.
pub(crate) async fn run(rt: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    // The limit is known once the operator has registered.
    let mut registration = rt.registration.subscribe();
    let max = tokio::select! {
        r = registration.wait_for(Option::is_some) => match r {
            Ok(reg) => reg.as_ref().map_or(1, |r| r.max_concurrent(rt.config.max_concurrent_reconciles)),
            Err(_) => return,
        },
        _ = shutdown.wait_for(|s| *s) => return,
    };
    let max = max as usize;
    tracing::info!(max, "reconciles at once");
    rt.metrics
        .max_concurrent
        .get_or_create(&rt.metrics.controller(None))
        .set(i64::try_from(max).unwrap_or(i64::MAX));
    let permits = Arc::new(Semaphore::new(max));
    let mut changed = rt.changed.subscribe();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        // Wait until a reconcile may start.
        while !rt.can_dispatch() {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                // The lease can lapse without any event; look again soon.
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let item = tokio::select! {
            i = rt.queue.get() => match i { Some(i) => i, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        rt.metrics
            .queue_duration
            .get_or_create(rt.metrics.queue())
            .observe(item.waited.as_secs_f64());
        rt.metrics
            .depth
            .get_or_create(rt.metrics.queue())
            .set(i64::try_from(rt.queue.len()).unwrap_or(i64::MAX));
        let (key, waited) = (item.key, item.waited);
        let (owned, _) = rt.owns(&key);
        if !owned {
            // Revoked while queued.
            rt.queue.done(&key);
            continue;
        }
        if !rt.can_dispatch() {
            // The gate closed while we waited; put the key back for later.
            rt.queue.done(&key);
            rt.queue.add(&key);
            continue;
        }
        let Some((object, cache_seq)) = rt.primary(&key) else {
            // The primary object is gone: like kube-runtime, there is nothing
            // to reconcile (use finalizers for cleanup).
            rt.queue.forget(&key);
            rt.queue.done(&key);
            continue;
        };
        let _span = tracing::debug_span!("dispatch", key = %key).entered();
        rt.hand_out(key, object, cache_seq, permit, waited);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opmesh_proto::v1::{
        ControllerTypes, GroupVersionKind, ObjectEvent, Task, Welcome, object_event::Type,
    };
    use tokio::sync::mpsc;

    use super::*;
    use crate::state::Registration;

    #[test]
    fn the_operator_chooses_its_concurrency_within_the_flag() {
        let reg = |concurrency| Registration {
            operator_version: String::new(),
            controllers: Vec::new(),
            concurrency,
        };
        assert_eq!(reg(0).max_concurrent(None), 1);
        assert_eq!(reg(8).max_concurrent(None), 8);
        assert_eq!(reg(0).max_concurrent(Some(4)), 4);
        assert_eq!(reg(8).max_concurrent(Some(4)), 4);
        assert_eq!(reg(2).max_concurrent(Some(4)), 2);
    }

    /// The next task within 5 s (of paused time), if any.
    async fn next(rx: &mut mpsc::Receiver<Result<Task, tonic::Status>>) -> Option<Task> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .ok()
            .flatten()
            .map(|t| t.expect("a task, not an error"))
    }

    #[tokio::test(start_paused = true)]
    async fn never_hands_out_more_than_the_concurrency_limit() {
        let rt = Arc::new(Runtime::for_test(&["--max-concurrent-reconciles", "2"]));
        let gvk = GroupVersionKind {
            version: "v1".into(),
            kind: "ConfigMap".into(),
            ..Default::default()
        };
        rt.registration.send_replace(Some(Registration {
            operator_version: String::new(),
            controllers: vec![ControllerTypes {
                primary: Some(gvk.clone()),
                owns: Vec::new(),
            }],
            concurrency: 8,
        }));
        let (tx, mut rx) = mpsc::channel(16);
        rt.attach_operator(tx);
        let welcome = Welcome {
            runtime_id: "ops/op-0".into(),
            subset: "v1".into(),
            lease_ttl_ms: 3_600_000,
        };
        rt.welcomed(&welcome, tokio::time::Instant::now(), &[]);
        for i in 0..5 {
            rt.on_event(ObjectEvent {
                key: opmesh_proto::mesh_key("", "v1", "ConfigMap", Some("ns"), &format!("k{i}")),
                r#type: Type::Applied as i32,
                gvk: Some(gvk.clone()),
                namespace: "ns".into(),
                name: format!("k{i}"),
                object: b"{}".to_vec(),
                ..Default::default()
            });
        }
        rt.on_synced();
        let (_stop, stop) = watch::channel(false);
        let dispatch = tokio::spawn(run(rt.clone(), stop));

        let first = next(&mut rx).await.expect("a first task");
        let second = next(&mut rx).await.expect("a second task");
        // With the clock paused, the timeout only fires once everything is
        // idle: a third task would have arrived by then.
        assert!(
            next(&mut rx).await.is_none(),
            "a third reconcile started while two ran"
        );
        // One finishes: exactly one more starts.
        assert!(rt.complete(first.id).is_some());
        rt.queue.forget(&first.key);
        rt.queue.done(&first.key);
        rt.bump();
        let third = next(&mut rx).await.expect("a task after one finished");
        assert_ne!(third.key, second.key);
        assert!(
            next(&mut rx).await.is_none(),
            "two started after one finished"
        );
        dispatch.abort();
    }
}
