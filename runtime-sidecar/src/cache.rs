//! The slice cache: the objects of the keys this runtime owns, as the
//! manager sent them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use serde::Deserialize;

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
}

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
        self.objects.insert(
            obj,
            Entry {
                key: key.to_string(),
                object: Arc::new(bytes),
                owner_uids,
            },
        );
    }

    /// Removes an object.
    pub(crate) fn delete(&mut self, obj: &ObjRef) {
        if let Some(e) = self.objects.remove(obj)
            && let Some(set) = self.by_key.get_mut(&e.key)
        {
            set.remove(obj);
            if set.is_empty() {
                self.by_key.remove(&e.key);
            }
        }
    }

    /// Removes every object of `key` (on revoke).
    pub(crate) fn drop_key(&mut self, key: &str) {
        for obj in self.by_key.remove(key).into_iter().flatten() {
            self.objects.remove(&obj);
        }
    }

    /// Removes everything (on session loss).
    pub(crate) fn clear(&mut self) {
        self.objects.clear();
        self.by_key.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn r(g: &str, ns: &str, n: &str) -> ObjRef {
        (g.into(), ns.into(), n.into())
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
