//! A read-only copy of the sidecar's slice cache in the operator's process,
//! so a reconcile's cache reads cost no round trip.
//!
//! The sidecar streams a snapshot and then every change (`WatchCache`),
//! each batch stamped with the cache's sequence number. Every task carries
//! the sequence number at which it went out; before a reconcile starts, the
//! controller waits until the copy has applied at least that much, so the
//! copy is never older than what the sidecar held when it handed the task
//! out. Where the copy cannot be trusted (an older sidecar without
//! `WatchCache`, the feed broken, or a wait that timed out) reads go to the
//! sidecar as before.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opmesh_proto::v1::{
    CacheUpdates, WatchCacheRequest, runtime_service_client::RuntimeServiceClient,
};
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;

/// How long a reconcile waits for the copy to catch up with its task
/// before reads fall back to the sidecar.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How long to wait before feeding the copy again after the feed broke.
const RETRY: Duration = Duration::from_millis(500);

/// `(gvk key, namespace, name)`.
type ObjRef = (String, String, String);

#[derive(Debug)]
struct Entry {
    object: Arc<[u8]>,
    owner_uids: Vec<String>,
}

/// The copy; see the module docs.
#[derive(Debug)]
pub(crate) struct LocalCache {
    objects: RwLock<HashMap<ObjRef, Entry>>,
    /// The sequence number applied so far.
    applied: watch::Sender<u64>,
    /// True while the copy is fed and current enough to read.
    live: AtomicBool,
    /// Whether the sidecar serves `WatchCache` (and so `CompleteStream`):
    /// unknown until its first answer.
    supported: watch::Sender<Option<bool>>,
    /// Asks the feed to start over with a fresh snapshot.
    resync: Notify,
}

// === impl LocalCache ===

impl LocalCache {
    /// A copy fed from `client`'s sidecar for as long as it is in use.
    pub(crate) fn start(client: RuntimeServiceClient<Channel>) -> Arc<Self> {
        let local = Arc::new(Self {
            objects: RwLock::default(),
            applied: watch::channel(0).0,
            live: AtomicBool::new(false),
            supported: watch::channel(None).0,
            resync: Notify::new(),
        });
        tokio::spawn(feed(Arc::downgrade(&local), client));
        local
    }

    /// True when reads may be served from the copy.
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Whether the sidecar feeds copies, once it has answered.
    pub(crate) async fn supported(&self) -> bool {
        let mut rx = self.supported.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Waits until the copy has applied `seq`. If it cannot within
    /// [`CATCH_UP`], reads go to the sidecar until a fresh snapshot has
    /// arrived.
    pub(crate) async fn catch_up(&self, seq: u64) {
        if !self.is_live() || *self.applied.borrow() >= seq {
            return;
        }
        let mut rx = self.applied.subscribe();
        let caught = tokio::time::timeout(CATCH_UP, rx.wait_for(|s| *s >= seq)).await;
        if !matches!(caught, Ok(Ok(_))) && self.live.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                seq,
                "the cache copy did not catch up with a task; reading from the sidecar until it \
                 is fed again"
            );
            self.resync.notify_one();
        }
    }

    /// One object's JSON.
    pub(crate) fn get(&self, gvk: &str, namespace: &str, name: &str) -> Option<Arc<[u8]>> {
        let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
        objects
            .get(&(gvk.to_string(), namespace.to_string(), name.to_string()))
            .map(|e| e.object.clone())
    }

    /// The JSON of every object of type `gvk`, optionally only in
    /// `namespace` and only those with an ownerReference to `owner_uid`,
    /// in namespace/name order.
    pub(crate) fn list(&self, gvk: &str, namespace: &str, owner_uid: &str) -> Vec<Arc<[u8]>> {
        let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(&ObjRef, Arc<[u8]>)> = objects
            .iter()
            .filter(|((g, ns, _), e)| {
                g == gvk
                    && (namespace.is_empty() || ns == namespace)
                    && (owner_uid.is_empty() || e.owner_uids.iter().any(|u| u == owner_uid))
            })
            .map(|(r, e)| (r, e.object.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.into_iter().map(|(_, o)| o).collect()
    }

    /// Applies one batch; returns true once a whole snapshot is in.
    fn apply(&self, batch: CacheUpdates) -> bool {
        {
            let mut objects = self.objects.write().unwrap_or_else(|e| e.into_inner());
            if batch.reset {
                objects.clear();
            }
            for o in batch.objects {
                let obj = (o.gvk, o.namespace, o.name);
                if o.object.is_empty() {
                    objects.remove(&obj);
                } else {
                    objects.insert(
                        obj,
                        Entry {
                            object: Arc::from(o.object),
                            owner_uids: o.owner_uids,
                        },
                    );
                }
            }
        }
        if batch.seq > 0 {
            self.applied.send_if_modified(|s| {
                let newer = batch.seq > *s;
                *s = (*s).max(batch.seq);
                newer
            });
        }
        batch.seq > 0
    }

    fn clear(&self) {
        self.live.store(false, Ordering::Release);
        self.objects
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Feeds `local` until it is dropped: a snapshot, then every change; on a
/// broken feed (or a resync), it starts over.
async fn feed(local: Weak<LocalCache>, mut client: RuntimeServiceClient<Channel>) {
    loop {
        let stream = client.watch_cache(WatchCacheRequest {}).await;
        let Some(copy) = local.upgrade() else { return };
        let mut stream = match stream {
            Ok(s) => {
                copy.supported.send_replace(Some(true));
                s.into_inner()
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                // An older sidecar: every read goes to it.
                copy.supported.send_replace(Some(false));
                return;
            }
            Err(status) => {
                tracing::debug!(error = %status, "cannot feed the cache copy; retrying");
                drop(copy);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // The sequence numbers start over with each feed.
        copy.applied.send_replace(0);
        drop(copy);
        loop {
            let next = {
                let Some(copy) = local.upgrade() else { return };
                let resync = async move { copy.resync.notified().await };
                tokio::select! {
                    m = stream.message() => m,
                    () = resync => Ok(None),
                }
            };
            let Some(copy) = local.upgrade() else { return };
            match next {
                Ok(Some(batch)) => {
                    if copy.apply(batch) {
                        copy.live.store(true, Ordering::Release);
                    }
                }
                Ok(None) | Err(_) => {
                    copy.clear();
                    break;
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use opmesh_proto::v1::CachedObject;

    use super::*;

    fn local() -> LocalCache {
        LocalCache {
            objects: RwLock::default(),
            applied: watch::channel(0).0,
            live: AtomicBool::new(true),
            supported: watch::channel(Some(true)).0,
            resync: Notify::new(),
        }
    }

    fn obj(ns: &str, name: &str, json: &str, owners: &[&str]) -> CachedObject {
        CachedObject {
            gvk: "ConfigMap.v1".into(),
            namespace: ns.into(),
            name: name.into(),
            object: json.as_bytes().to_vec(),
            owner_uids: owners.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn a_task_waits_for_its_change_and_reads_see_it() {
        let l = Arc::new(local());
        l.apply(CacheUpdates {
            seq: 3,
            reset: true,
            objects: vec![obj("a", "x", "1", &["u"]), obj("b", "y", "2", &[])],
        });
        // Already current for a task at 3.
        l.catch_up(3).await;
        assert_eq!(l.get("ConfigMap.v1", "a", "x").as_deref(), Some(&b"1"[..]));
        // A task at 4 waits until change 4 is applied.
        let waiting = tokio::spawn({
            let l = l.clone();
            async move {
                l.catch_up(4).await;
                l.get("ConfigMap.v1", "a", "x")
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        l.apply(CacheUpdates {
            seq: 4,
            reset: false,
            objects: vec![obj("a", "x", "9", &["u"])],
        });
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&b"9"[..]));
        assert_eq!(l.list("ConfigMap.v1", "", "u").len(), 1);
        assert_eq!(l.list("ConfigMap.v1", "b", "").len(), 1);
        // An empty object is a removal.
        l.apply(CacheUpdates {
            seq: 5,
            reset: false,
            objects: vec![CachedObject {
                object: Vec::new(),
                ..obj("a", "x", "", &[])
            }],
        });
        assert!(l.get("ConfigMap.v1", "a", "x").is_none());
        assert!(l.is_live());
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_cannot_catch_up_stops_serving_reads() {
        let l = local();
        l.catch_up(7).await;
        assert!(!l.is_live());
    }
}
