//! Which objects belong to which primary key, in both directions.

use std::collections::{HashMap, HashSet};

/// One object of one type: the type's key, namespace (empty when
/// cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ObjRef {
    /// The type's [`opmesh_proto::gvk_key`].
    pub(crate) gvk: String,
    /// The namespace.
    pub(crate) namespace: String,
    /// The name.
    pub(crate) name: String,
}

/// The objects of each key and the key of each object.
#[derive(Debug, Default)]
pub(crate) struct Index {
    objects: HashMap<String, HashSet<ObjRef>>,
    key_of: HashMap<ObjRef, String>,
    /// Keys with objects, per namespace.
    namespaces: HashMap<String, usize>,
    /// True when a namespace gained its first key or lost its last since
    /// [`Index::take_namespaces_changed`].
    namespaces_changed: bool,
    /// Changes whenever a key gains its first object or loses its last.
    version: u64,
}

// === impl Index ===

impl Index {
    /// Files `obj` under `key` (or under no key), and returns the key it was
    /// filed under before.
    pub(crate) fn set(&mut self, obj: &ObjRef, key: Option<&str>) -> Option<String> {
        // Most events change an object, not the key it belongs to.
        if let Some(k) = key
            && self.key_of.get(obj).is_some_and(|old| old == k)
        {
            return Some(k.to_string());
        }
        let old = self.key_of.remove(obj);
        if let Some(k) = &old
            && let Some(set) = self.objects.get_mut(k)
            && set.remove(obj)
            && set.is_empty()
        {
            self.count(k, false);
        }
        if let Some(k) = key {
            let set = self.objects.entry(k.to_string()).or_default();
            if set.insert(obj.clone()) && set.len() == 1 {
                self.count(k, true);
            }
            self.key_of.insert(obj.clone(), k.to_string());
        }
        old
    }

    /// Counts a key that gained its first object, or lost its last.
    fn count(&mut self, key: &str, gained: bool) {
        self.version += 1;
        let Some((ns, _)) = key.split_once('/') else {
            return;
        };
        if gained {
            let n = self.namespaces.entry(ns.to_string()).or_default();
            *n += 1;
            self.namespaces_changed |= *n == 1;
        } else if let Some(n) = self.namespaces.get_mut(ns) {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(ns);
                self.namespaces_changed = true;
            }
        }
    }

    /// Changes whenever the set of keys with objects changes.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// True if the set of [`Index::namespaces`] changed since the last call.
    pub(crate) fn take_namespaces_changed(&mut self) -> bool {
        std::mem::take(&mut self.namespaces_changed)
    }

    /// The namespaces that hold at least one key with objects.
    pub(crate) fn namespaces(&self) -> impl Iterator<Item = &String> {
        self.namespaces.keys()
    }

    /// True when `obj` is filed under some key.
    pub(crate) fn contains(&self, obj: &ObjRef) -> bool {
        self.key_of.contains_key(obj)
    }

    /// The objects of `key`.
    pub(crate) fn objects(&self, key: &str) -> impl Iterator<Item = &ObjRef> {
        self.objects.get(key).into_iter().flatten()
    }

    /// True when `key` has at least one object.
    pub(crate) fn has_objects(&self, key: &str) -> bool {
        self.objects.get(key).is_some_and(|s| !s.is_empty())
    }

    /// True when `key` is known, even with no object left.
    pub(crate) fn knows(&self, key: &str) -> bool {
        self.objects.contains_key(key)
    }

    /// Forgets `key` if it has no object left, so memory stays O(live keys).
    /// Returns true if it was forgotten.
    pub(crate) fn forget_if_empty(&mut self, key: &str) -> bool {
        if self.objects.get(key).is_some_and(|s| s.is_empty()) {
            self.objects.remove(key);
            true
        } else {
            false
        }
    }

    /// Every known key.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.objects.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str) -> ObjRef {
        ObjRef {
            gvk: "/v1/ConfigMap".into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn an_object_moves_between_keys_and_empty_keys_are_forgotten() {
        let mut index = Index::default();
        assert_eq!(index.set(&obj("a"), Some("ns/p")), None);
        assert_eq!(index.set(&obj("a"), Some("ns/q")), Some("ns/p".into()));
        assert!(!index.has_objects("ns/p"));
        assert!(index.forget_if_empty("ns/p"));
        assert!(!index.knows("ns/p"));
        assert_eq!(index.objects("ns/q").count(), 1);
        assert_eq!(index.namespaces().collect::<Vec<_>>(), ["ns"]);
        assert_eq!(index.set(&obj("a"), None), Some("ns/q".into()));
        assert!(!index.contains(&obj("a")));
        assert_eq!(index.namespaces().count(), 0);
    }
}
