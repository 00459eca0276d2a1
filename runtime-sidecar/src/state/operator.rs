//! Whether an operator is there to reconcile: a runtime whose operator is
//! stopping, or has been gone for longer than the grace period, gives its
//! keys back instead of sitting on them.

use std::{sync::atomic::Ordering, time::Duration};

use tokio::time::Instant;

use super::{Runtime, lock};

// === impl Runtime ===

impl Runtime {
    /// True when an operator is attached and has not said it is stopping.
    pub(crate) fn operator_present(&self) -> bool {
        lock(&self.operator).is_some() && !self.operator_leaving.load(Ordering::Relaxed)
    }

    /// The operator said it is stopping: start nothing more for it.
    pub(crate) fn operator_leaves(&self) {
        self.operator_leaving.store(true, Ordering::Relaxed);
        self.bump();
    }

    /// Notes that an operator attached (`true`) or that the last one went
    /// away (`false`).
    pub(super) fn operator_presence(&self, attached: bool) {
        let mut since = lock(&self.operator_absent_since);
        if attached {
            *since = None;
            self.operator_leaving.store(false, Ordering::Relaxed);
        } else if since.is_none() {
            *since = Some(Instant::now());
        }
    }

    /// Resolves, with the reason, once the operator has said it is stopping
    /// or has been gone for `grace`.
    pub(crate) async fn operator_gone(&self, grace: Duration) -> (bool, String) {
        let mut changed = self.changed.subscribe();
        loop {
            if self.operator_leaving.load(Ordering::Relaxed) {
                return (false, "the operator is stopping".into());
            }
            let since = *lock(&self.operator_absent_since);
            let wake = match since {
                Some(t) if t.elapsed() >= grace => {
                    return (
                        true,
                        format!("the operator has been gone for more than {grace:?}"),
                    );
                }
                Some(t) => Some(t + grace),
                None => None,
            };
            let sleep = tokio::time::sleep_until(wake.unwrap_or_else(|| Instant::now() + grace));
            tokio::select! {
                r = changed.changed() => if r.is_err() { std::future::pending::<()>().await },
                () = sleep, if wake.is_some() => {}
            }
        }
    }

    /// Waits until an operator is attached and not stopping.
    pub(crate) async fn operator_back(&self) {
        let mut changed = self.changed.subscribe();
        while !self.operator_present() {
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
