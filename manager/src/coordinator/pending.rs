//! The per-runtime pending set: what the manager still has to send to one
//! runtime, holding only the latest state of each object.
//!
//! Memory is O(objects), not O(events): a slow runtime gets coalesced updates.
//! Control messages (welcome, revoke, synced) keep their order relative to
//! object updates, and an update that replaces an older one keeps the older
//! one's place, so it is still sent before any later `Synced` marker. Lease
//! renewals jump the line, so a backlog cannot starve the lease.

use std::sync::Mutex;

use indexmap::IndexMap;
use opmesh_proto::v1::{ManagerMessage, manager_message::Msg};
use tokio::sync::Notify;

/// Identifies an entry: an object (coalesced) or a control message (not).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Slot {
    Object {
        key: String,
        gvk: String,
        namespace: String,
        name: String,
    },
    Control(u64),
}

#[derive(Default)]
struct Inner {
    items: IndexMap<Slot, ManagerMessage>,
    urgent: Option<ManagerMessage>,
    next_control: u64,
    closed: bool,
}

/// A coalescing queue of messages for one runtime, drained by its session's
/// writer task.
#[derive(Default)]
pub(crate) struct Pending {
    inner: Mutex<Inner>,
    notify: Notify,
}

// === impl Pending ===

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("len", &self.len()).finish()
    }
}

impl Pending {
    /// Queues the latest state of an object, replacing any queued older state
    /// in place.
    /// The slot includes the primary key, so an object that moves from one
    /// key to another keeps both its Deleted (old key) and Applied (new key).
    pub(crate) fn object(
        &self,
        key: &str,
        gvk: &str,
        namespace: &str,
        name: &str,
        msg: ManagerMessage,
    ) {
        let slot = Slot::Object {
            key: key.to_string(),
            gvk: gvk.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.with(|inner| {
            inner.items.insert(slot, msg);
        });
    }

    /// Queues a control message after everything queued so far.
    pub(crate) fn control(&self, msg: ManagerMessage) {
        self.with(|inner| {
            let seq = inner.next_control;
            inner.next_control += 1;
            inner.items.insert(Slot::Control(seq), msg);
        });
    }

    /// Queues a message ahead of everything else; a newer one replaces an
    /// unsent older one. Used for lease renewals.
    pub(crate) fn urgent(&self, msg: ManagerMessage) {
        self.with(|inner| inner.urgent = Some(msg));
    }

    /// Drops queued object updates whose primary key is in `keys`, before a
    /// revoke of those keys is queued.
    pub(crate) fn drop_keys(&self, keys: &std::collections::HashSet<&str>) {
        self.with(|inner| {
            inner.items.retain(|_, msg| match &msg.msg {
                Some(Msg::Event(ev)) => !keys.contains(ev.key.as_str()),
                _ => true,
            });
        });
    }

    /// Closes the queue: [`Pending::next_batch`] returns `None` from now on.
    pub(crate) fn close(&self) {
        self.with(|inner| inner.closed = true);
    }

    /// Number of queued messages.
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// True once [`Pending::close`] was called.
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// True when nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for messages and takes up to `max` of them, in order. Returns
    /// `None` once the queue is closed.
    pub(crate) async fn next_batch(&self, max: usize) -> Option<Vec<ManagerMessage>> {
        loop {
            // Register interest before checking, so a push between the check
            // and the await is not missed.
            let notified = self.notify.notified();
            {
                let mut inner = self.lock();
                if inner.closed {
                    return None;
                }
                let mut batch = Vec::new();
                if let Some(msg) = inner.urgent.take() {
                    batch.push(msg);
                }
                let n = max.min(inner.items.len());
                batch.extend(inner.items.drain(..n).map(|(_, m)| m));
                if !batch.is_empty() {
                    return Some(batch);
                }
            }
            notified.await;
        }
    }

    /// Takes everything queued without waiting, as [`Pending::next_batch`]
    /// would; `None` once closed.
    pub(crate) fn drain_now(&self) -> Option<Vec<ManagerMessage>> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        let mut batch: Vec<ManagerMessage> = inner.urgent.take().into_iter().collect();
        batch.extend(inner.items.drain(..).map(|(_, m)| m));
        Some(batch)
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.lock());
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use opmesh_proto::v1::{ObjectEvent, Synced};

    use super::*;

    fn event(key: &str, rv: &str) -> ManagerMessage {
        ManagerMessage {
            msg: Some(Msg::Event(ObjectEvent {
                key: key.into(),
                resource_version: rv.into(),
                ..Default::default()
            })),
        }
    }

    fn synced() -> ManagerMessage {
        ManagerMessage {
            msg: Some(Msg::Synced(Synced::default())),
        }
    }

    #[tokio::test]
    async fn updates_coalesce_in_place_before_later_markers() {
        let p = Pending::default();
        p.object("ns/a", "g", "ns", "a", event("ns/a", "1"));
        p.control(synced());
        p.object("ns/a", "g", "ns", "a", event("ns/a", "2"));
        p.object("ns/b", "g", "ns", "b", event("ns/b", "1"));
        let batch = p.next_batch(10).await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0], event("ns/a", "2"));
        assert_eq!(batch[1], synced());
        assert_eq!(batch[2], event("ns/b", "1"));
    }

    #[tokio::test]
    async fn dropped_keys_are_not_sent_and_close_ends_the_stream() {
        let p = Pending::default();
        p.object("ns/a", "g", "ns", "a", event("ns/a", "1"));
        p.object("ns/b", "g", "ns", "b", event("ns/b", "1"));
        p.drop_keys(&["ns/a"].into_iter().collect());
        assert_eq!(p.next_batch(10).await.unwrap(), vec![event("ns/b", "1")]);
        p.close();
        assert!(p.next_batch(10).await.is_none());
    }
}
