//! What to do after a reconcile.

use std::time::Duration;

/// What the runtime does with a key after a reconcile, or after an error
/// (through the error policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AwaitChange,
    Requeue(Duration),
    Backoff,
}

// === impl Action ===

impl Action {
    /// Reconcile again after `duration` (and forget the failure count).
    pub fn requeue(duration: Duration) -> Self {
        Self {
            kind: Kind::Requeue(duration),
        }
    }

    /// Do nothing until the object (or an owned object) changes.
    pub fn await_change() -> Self {
        Self {
            kind: Kind::AwaitChange,
        }
    }

    /// From an error policy: retry with the per-key exponential backoff
    /// (5 ms doubling to 1000 s), as controller-runtime does. After a
    /// successful reconcile this is the same as [`Action::await_change`].
    pub fn backoff() -> Self {
        Self {
            kind: Kind::Backoff,
        }
    }

    /// The requeue delay, if this action requeues after a fixed delay.
    pub fn requeue_after(&self) -> Option<Duration> {
        match self.kind {
            Kind::Requeue(d) => Some(d),
            _ => None,
        }
    }

    /// True for [`Action::backoff`].
    pub fn is_backoff(&self) -> bool {
        self.kind == Kind::Backoff
    }
}

/// The error policy controller-runtime users expect: log, then retry with
/// per-key exponential backoff.
pub fn default_error_policy<K, E: std::fmt::Display, C>(
    _obj: std::sync::Arc<K>,
    error: &E,
    _ctx: std::sync::Arc<C>,
) -> Action {
    tracing::warn!(%error, "reconcile failed; backing off");
    Action::backoff()
}
