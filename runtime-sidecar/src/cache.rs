//! The slice cache: the objects of the keys this runtime owns, as the
//! manager sent them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use opmesh_proto::v1::{CacheUpdates, CachedObject};
use serde::Deserialize;
use tokio::sync::mpsc;

/// Identifies a cached object: `(gvk key, namespace, name)`.
pub(crate) type ObjRef = (String, String, String);

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    object: Arc<Vec<u8>>,
    owner_uids: Vec<String>,
}

/// Cached objects, indexed by object and by owning primary key.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    objects: HashMap<ObjRef, Entry>,
    by_key: HashMap<String, HashSet<ObjRef>>,
    /// Bumped by every change.
    seq: u64,
    /// Copies in operator processes (`WatchCache`), fed every change.
    watchers: Vec<mpsc::UnboundedSender<CacheUpdates>>,
}

/// About how much one snapshot page carries, far below gRPC's 4 MiB
/// message limit.
const SNAPSHOT_PAGE_BYTES: usize = 1024 * 1024;

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    metadata: MetaInner,
}

#[derive(Deserialize, Default)]
struct MetaInner {
    #[serde(default, rename = "ownerReferences")]
    owner_references: Vec<OwnerRef>,
}

#[derive(Deserialize)]
struct OwnerRef {
    uid: String,
}

// === impl Cache ===

impl Cache {
    /// Stores the latest state of an object that belongs to `key`.
    pub(crate) fn apply(&mut self, key: &str, obj: ObjRef, bytes: Vec<u8>) {
        let owner_uids = serde_json::from_slice::<Meta>(&bytes)
            .map(|m| {
                m.metadata
                    .owner_references
                    .into_iter()
                    .map(|o| o.uid)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(old) = self.objects.get(&obj)
            && old.key != key
            && let Some(set) = self.by_key.get_mut(&old.key)
        {
            set.remove(&obj);
        }
        self.by_key
            .entry(key.to_string())
            .or_default()
            .insert(obj.clone());
        let entry = Entry {
            key: key.to_string(),
            object: Arc::new(bytes),
            owner_uids,
        };
        if !self.watchers.is_empty() {
            let change = cached(&obj, &entry);
            self.publish(false, vec![change]);
        } else {
            self.seq += 1;
        }
        self.objects.insert(obj, entry);
    }

    /// Removes an object.
    pub(crate) fn delete(&mut self, obj: &ObjRef) {
        if let Some(e) = self.objects.remove(obj) {
            if let Some(set) = self.by_key.get_mut(&e.key) {
                set.remove(obj);
                if set.is_empty() {
                    self.by_key.remove(&e.key);
                }
            }
            self.publish(false, vec![removed(obj)]);
        }
    }

    /// Removes every object of `key` (on revoke).
    pub(crate) fn drop_key(&mut self, key: &str) {
        let gone: Vec<CachedObject> = self
            .by_key
            .remove(key)
            .into_iter()
            .flatten()
            .filter(|obj| self.objects.remove(obj).is_some())
            .map(|obj| removed(&obj))
            .collect();
        if !gone.is_empty() {
            self.publish(false, gone);
        }
    }

    /// Removes everything (on session loss).
    pub(crate) fn clear(&mut self) {
        self.objects.clear();
        self.by_key.clear();
        self.publish(true, Vec::new());
    }

    /// The sequence number of the latest change.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// A new copy's feed: the snapshot's pages are already in it, then
    /// every change follows, in order.
    pub(crate) fn watch(&mut self) -> mpsc::UnboundedReceiver<CacheUpdates> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut page = CacheUpdates {
            seq: 0,
            reset: true,
            objects: Vec::new(),
        };
        let mut bytes = 0;
        for (obj, e) in &self.objects {
            if bytes + e.object.len() > SNAPSHOT_PAGE_BYTES && !page.objects.is_empty() {
                let _ = tx.send(std::mem::take(&mut page));
                bytes = 0;
            }
            bytes += e.object.len();
            page.objects.push(cached(obj, e));
        }
        // The last page carries a sequence number above 0, even for a cache
        // that never changed, so the copy knows the snapshot is whole.
        self.seq += 1;
        page.seq = self.seq;
        let _ = tx.send(page);
        self.watchers.push(tx);
        rx
    }

    /// Bumps the sequence number and sends `objects` to every copy.
    fn publish(&mut self, reset: bool, objects: Vec<CachedObject>) {
        self.seq += 1;
        if self.watchers.is_empty() {
            return;
        }
        let update = CacheUpdates {
            seq: self.seq,
            reset,
            objects,
        };
        self.watchers.retain(|w| w.send(update.clone()).is_ok());
    }

    /// One object's JSON.
    pub(crate) fn get(&self, obj: &ObjRef) -> Option<Arc<Vec<u8>>> {
        self.objects.get(obj).map(|e| e.object.clone())
    }

    /// Objects of type `gvk`, optionally only in `namespace` and only those
    /// with an ownerReference to `owner_uid`.
    #[cfg(test)]
    pub(crate) fn list(&self, gvk: &str, namespace: &str, owner_uid: &str) -> Vec<Arc<Vec<u8>>> {
        self.list_page(gvk, namespace, owner_uid, "", usize::MAX).0
    }

    /// One page of [`Cache::list`]'s objects: those after `after` (a
    /// previous page's token, `namespace/name`; empty for the first page),
    /// in namespace/name order, up to about `max_bytes`, and the token of
    /// the next page if more follow. A page holds at least one object.
    pub(crate) fn list_page(
        &self,
        gvk: &str,
        namespace: &str,
        owner_uid: &str,
        after: &str,
        max_bytes: usize,
    ) -> (Vec<Arc<Vec<u8>>>, Option<String>) {
        let after = after.split_once('/');
        let mut out: Vec<(&ObjRef, Arc<Vec<u8>>)> = self
            .objects
            .iter()
            .filter(|((g, ns, name), e)| {
                g == gvk
                    && (namespace.is_empty() || ns == namespace)
                    && (owner_uid.is_empty() || e.owner_uids.iter().any(|u| u == owner_uid))
                    && after
                        .is_none_or(|(a_ns, a_name)| (ns.as_str(), name.as_str()) > (a_ns, a_name))
            })
            .map(|(r, e)| (r, e.object.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        let mut page = Vec::new();
        let mut bytes = 0usize;
        let mut last: Option<&ObjRef> = None;
        for (i, (r, o)) in out.iter().enumerate() {
            if !page.is_empty() && bytes + o.len() > max_bytes {
                let next = last.map(|(_, ns, name)| format!("{ns}/{name}"));
                debug_assert!(i > 0);
                return (page, next);
            }
            bytes += o.len();
            page.push(o.clone());
            last = Some(r);
        }
        (page, None)
    }

    /// Number of cached objects.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.objects.len()
    }
}

/// `obj` as a copy receives it.
fn cached(obj: &ObjRef, e: &Entry) -> CachedObject {
    CachedObject {
        gvk: obj.0.clone(),
        namespace: obj.1.clone(),
        name: obj.2.clone(),
        object: e.object.as_ref().clone(),
        owner_uids: e.owner_uids.clone(),
    }
}

/// The removal of `obj`, as a copy receives it.
fn removed(obj: &ObjRef) -> CachedObject {
    CachedObject {
        gvk: obj.0.clone(),
        namespace: obj.1.clone(),
        name: obj.2.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(g: &str, ns: &str, n: &str) -> ObjRef {
        (g.into(), ns.into(), n.into())
    }

    /// Applies `updates` to a copy the way the SDK does.
    fn replay(
        copy: &mut std::collections::BTreeMap<ObjRef, Vec<u8>>,
        seq: &mut u64,
        rx: &mut mpsc::UnboundedReceiver<CacheUpdates>,
    ) {
        while let Ok(u) = rx.try_recv() {
            if u.reset {
                copy.clear();
            }
            for o in u.objects {
                let obj = (o.gvk, o.namespace, o.name);
                if o.object.is_empty() {
                    copy.remove(&obj);
                } else {
                    copy.insert(obj, o.object);
                }
            }
            *seq = (*seq).max(u.seq);
        }
    }

    #[test]
    fn a_copy_fed_by_watch_matches_the_cache_at_every_seq() {
        let mut c = Cache::default();
        let big = "x".repeat(SNAPSHOT_PAGE_BYTES / 3);
        for i in 0..5 {
            let obj = format!(r#"{{"metadata":{{"name":"o{i}"}},"data":"{big}"}}"#);
            c.apply(
                &format!("a/o{i}"),
                r("g", "a", &format!("o{i}")),
                obj.into_bytes(),
            );
        }
        let mut rx = c.watch();
        assert!(rx.len() > 1, "a snapshot this big comes in pages");
        let (mut copy, mut seq) = (std::collections::BTreeMap::new(), 0);
        let whole = |c: &Cache| {
            c.objects
                .iter()
                .map(|(k, e)| (k.clone(), e.object.as_ref().clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        replay(&mut copy, &mut seq, &mut rx);
        assert_eq!((copy.clone(), seq), (whole(&c), c.seq()));
        // Changes, removals, a dropped key and a clear all reach the copy.
        c.apply(
            "a/o0",
            r("g", "a", "o0"),
            br#"{"metadata":{"name":"o0"}}"#.to_vec(),
        );
        c.apply("a/o9", r("h", "a", "o9"), br#"{"metadata":{}}"#.to_vec());
        c.delete(&r("g", "a", "o1"));
        c.drop_key("a/o2");
        replay(&mut copy, &mut seq, &mut rx);
        assert_eq!((copy.clone(), seq), (whole(&c), c.seq()));
        assert_eq!(copy.len(), 4);
        c.clear();
        replay(&mut copy, &mut seq, &mut rx);
        assert!(copy.is_empty());
        assert_eq!(seq, c.seq());
        // A copy that went away is no longer fed.
        drop(rx);
        c.apply("a/o0", r("g", "a", "o0"), b"{}".to_vec());
        assert!(c.watchers.is_empty());
    }

    #[test]
    fn pages_together_are_the_whole_list() {
        let mut c = Cache::default();
        for ns in ["a", "b"] {
            for i in 0..5 {
                let obj = format!(
                    r#"{{"metadata":{{"name":"o{i}","namespace":"{ns}"}},"data":"{}"}}"#,
                    "x".repeat(i * 10)
                );
                c.apply(
                    &format!("{ns}/o{i}"),
                    ("g".into(), ns.into(), format!("o{i}")),
                    obj.into_bytes(),
                );
            }
        }
        let all = c.list("g", "", "");
        assert_eq!(all.len(), 10);
        let mut paged = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let (page, next) = c.list_page("g", "", "", &token, 150);
            assert!(!page.is_empty());
            paged.extend(page);
            pages += 1;
            match next {
                Some(t) => token = t,
                None => break,
            }
        }
        assert!(pages > 2, "{pages} pages");
        assert_eq!(paged, all);
    }

    #[test]
    fn list_by_namespace_and_owner_and_drop_by_key() {
        let mut c = Cache::default();
        c.apply(
            "a/x",
            r("G", "a", "x"),
            br#"{"metadata":{"uid":"u1"}}"#.to_vec(),
        );
        c.apply(
            "a/x",
            r("C", "a", "x-cm"),
            br#"{"metadata":{"ownerReferences":[{"uid":"u1"}]}}"#.to_vec(),
        );
        c.apply("b/y", r("C", "b", "other"), br#"{"metadata":{}}"#.to_vec());
        assert_eq!(c.list("C", "", "").len(), 2);
        assert_eq!(c.list("C", "a", "").len(), 1);
        assert_eq!(c.list("C", "", "u1").len(), 1);
        c.drop_key("a/x");
        assert!(c.get(&r("G", "a", "x")).is_none());
        assert_eq!(c.len(), 1);
    }
}
