//! Hands queued keys to the operator, at most `max_concurrent_reconciles` at
//! once, and only while the runtime may reconcile.

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::state::Runtime;

/// Runs until the queue shuts down or `shutdown` fires.
pub(crate) async fn run(rt: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    let max = rt.config.max_concurrent_reconciles as usize;
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
        let key = item.key;
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
        let Some(object) = rt.primary(&key) else {
            // The primary object is gone: like kube-runtime, there is nothing
            // to reconcile (use finalizers for cleanup).
            rt.queue.forget(&key);
            rt.queue.done(&key);
            continue;
        };
        let _span = tracing::debug_span!("dispatch", key = %key).entered();
        rt.hand_out(key, object, permit);
    }
}
