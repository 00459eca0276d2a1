//! Watch inputs: objects of routed types, Namespaces and OperatorMeshes.

use std::sync::Arc;

use kube::ResourceExt as _;
use opmesh_proto::v1::object_event::Type as EventType;

use super::{Coordinator, placement::push_object};
use crate::{
    crd::OperatorMesh,
    id::MeshId,
    mesh::{Held, Mesh, ObjRef},
    object::RawObject,
    policy::Policy,
    watch::{NamespaceLabels, WatchEvent, name_of},
};

// === impl Coordinator ===

impl Coordinator {
    pub(super) fn on_object(&mut self, gvk: &str, event: WatchEvent<RawObject>) {
        self.dirty = true;
        let failed = match &event {
            WatchEvent::Failed(e) => Some(e.clone()),
            _ => None,
        };
        if failed.is_some() {
            self.metrics.watch_restarts.inc();
        }
        if let Some(w) = self.watches.get_mut(gvk) {
            w.error = failed;
        }
        match event {
            WatchEvent::Failed(_) => {}
            WatchEvent::Apply(obj) => self.object_changed(gvk, obj, false),
            WatchEvent::Delete(obj) => self.object_changed(gvk, obj, true),
            WatchEvent::Relisted(present) => {
                let gone: Vec<Arc<RawObject>> = self
                    .store
                    .get(gvk)
                    .into_iter()
                    .flat_map(|m| m.iter())
                    .filter(|(name, _)| !present.contains(*name))
                    .map(|(_, o)| o.clone())
                    .collect();
                for obj in gone {
                    self.object_changed(gvk, obj, true);
                }
                let newly_synced = self
                    .watches
                    .get_mut(gvk)
                    .is_some_and(|w| !std::mem::replace(&mut w.synced, true));
                if newly_synced {
                    // Meshes that declare the type route it from now on.
                    let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
                    for id in ids {
                        if self.adopt_declared(&id) {
                            self.reapportion(&id);
                        }
                    }
                    self.place_everywhere();
                }
            }
        }
    }

    fn object_changed(&mut self, gvk: &str, obj: Arc<RawObject>, deleted: bool) {
        self.metrics.routed_events.inc();
        let (namespace, name) = name_of(obj.as_ref());
        let store = self.store.entry(gvk.to_string()).or_default();
        if deleted {
            store.remove(&(namespace.clone(), name.clone()));
        } else {
            store.insert((namespace.clone(), name.clone()), obj.clone());
        }
        let objref = ObjRef {
            gvk: gvk.to_string(),
            namespace,
            name,
        };
        let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
        // A change the watch reports after its first list is live: its
        // time is when the object changed, near enough.
        let live = self.watches.get(gvk).is_some_and(|w| w.synced);
        for id in ids {
            let Some(mesh) = self.meshes.get_mut(&id) else {
                continue;
            };
            let key_of_obj = mesh.key_for(gvk, &obj);
            let new_key = key_of_obj.clone().filter(|_| !deleted);
            if mesh.primaries.contains_key(gvk)
                && let Some(key) = key_of_obj
            {
                let generation = obj.metadata.generation.filter(|_| !deleted);
                self.generations
                    .observe_generation(&id, &key, generation, live, unix_ms());
            }
            if new_key.is_none() && !mesh.index.contains(&objref) {
                continue;
            }
            let old_key = mesh.index.set(&objref, new_key.as_deref());
            if mesh.index.take_namespaces_changed() {
                self.reapportion(&id);
            }
            // Tell the holders; an object whose key changed is gone from the old key.
            let mut notify: Vec<(String, bool)> = Vec::new();
            if let Some(k) = old_key.filter(|k| new_key.as_ref() != Some(k)) {
                notify.push((k, false));
            }
            if let Some(k) = new_key {
                notify.push((k, true));
            }
            for (key, exists) in notify {
                let Some(mesh) = self.meshes.get_mut(&id) else {
                    break;
                };
                match mesh.own.holder(&key) {
                    Some(Held::Owned(holder)) => {
                        // A holder without a session gets the state when its
                        // keys are reassigned.
                        let holder = holder.clone();
                        if let Some(s) = self.session_of(&holder) {
                            let ty = if exists {
                                EventType::Applied
                            } else {
                                EventType::Deleted
                            };
                            let pending = s.pending.clone();
                            if let Some(mesh) = self.meshes.get(&id) {
                                push_object(&pending, &key, ty, &obj, gvk, mesh.gvk(gvk));
                            }
                        }
                    }
                    // The next owner gets the current state once the key is released.
                    Some(Held::Revoking(_)) => {}
                    None => {
                        if !mesh.index.forget_if_empty(&key) {
                            self.place(&id, &key);
                        }
                    }
                }
            }
        }
    }

    /// Indexes the objects already cached for `gvk` into mesh `id`: a mesh
    /// that starts using a watch another mesh runs sees what that watch has
    /// seen, not only what changes from now on.
    pub(super) fn index_cached(&mut self, id: &MeshId, gvk: &str) {
        let (Some(mesh), Some(store)) = (self.meshes.get_mut(id), self.store.get(gvk)) else {
            return;
        };
        for ((namespace, name), obj) in store {
            let objref = ObjRef {
                gvk: gvk.to_string(),
                namespace: namespace.clone(),
                name: name.clone(),
            };
            if mesh.index.contains(&objref) {
                continue;
            }
            if let Some(key) = mesh.key_for(gvk, obj) {
                mesh.index.set(&objref, Some(&key));
            }
        }
    }

    pub(super) fn on_namespace(&mut self, ev: WatchEvent<NamespaceLabels>) {
        self.dirty = true;
        if !matches!(ev, WatchEvent::Failed(_)) {
            self.namespaces_version += 1;
        }
        self.namespaces_error = match &ev {
            WatchEvent::Failed(e) => Some(e.clone()),
            _ => None,
        };
        let changed: Option<String> = match ev {
            WatchEvent::Failed(_) => None,
            WatchEvent::Apply(o) => {
                let ((_, name), labels) = o.as_ref();
                let old = Arc::make_mut(&mut self.namespaces).insert(name.clone(), labels.clone());
                (old.as_ref() != Some(labels)).then(|| name.clone())
            }
            WatchEvent::Delete(o) => {
                Arc::make_mut(&mut self.namespaces).remove(&o.0.1);
                None
            }
            WatchEvent::Relisted(present) => {
                Arc::make_mut(&mut self.namespaces)
                    .retain(|ns, _| present.contains(&(String::new(), ns.clone())));
                if !std::mem::replace(&mut self.namespaces_synced, true) {
                    self.reapportion_everywhere();
                    self.place_everywhere();
                }
                None
            }
        };
        // A namespace that appears, goes or changes labels can change which
        // namespaces the exact split divides.
        self.reapportion_everywhere();
        if let Some(ns) = changed {
            let prefix = format!("{ns}/");
            let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
            for id in ids {
                let keys: Vec<String> = self
                    .meshes
                    .get(&id)
                    .map(|m| {
                        m.keys()
                            .filter(|k| k.starts_with(&prefix))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for k in keys {
                    self.place(&id, &k);
                }
            }
        }
    }

    pub(super) fn on_mesh(&mut self, ev: WatchEvent<OperatorMesh>) {
        self.dirty = true;
        self.apply_mesh_event(ev);
        self.forget_undeclared();
    }

    fn apply_mesh_event(&mut self, ev: WatchEvent<OperatorMesh>) {
        match ev {
            WatchEvent::Apply(om) => {
                let id = MeshId::new(om.namespace().unwrap_or_default(), om.name_any());
                let not_before = self.deleted_meshes.remove(&id);
                let now = self.now;
                let mesh = self
                    .meshes
                    .entry(id.clone())
                    .or_insert_with(|| Mesh::new(not_before, now));
                mesh.generation = om.metadata.generation;
                mesh.drain = crate::mesh::parse_drain(
                    om.annotations()
                        .get(crate::mesh::DRAIN_ANNOTATION)
                        .map(String::as_str),
                );
                // Drains apply under the policy in force, even if the new
                // spec is refused.
                self.refresh_draining(&id);
                let Some(mesh) = self.meshes.get_mut(&id) else {
                    return;
                };
                // A rollout in progress sets the weights (see `rollout`).
                let effective = crate::rollout::effective_spec(&om);
                let fingerprint = serde_json::to_value(&effective).ok();
                if mesh.policy.is_some()
                    && fingerprint.is_some()
                    && fingerprint == mesh.spec_in_force
                {
                    // Only the status or metadata changed (or the spec came
                    // back to the one in force): every key stays where it is.
                    mesh.invalid = None;
                    return;
                }
                match Policy::compile(&effective) {
                    Ok(p) => {
                        mesh.policy = Some(Arc::new(p));
                        mesh.invalid = None;
                        mesh.spec_in_force = fingerprint;
                        // Its objects are listed before its first runtime
                        // comes, not after.
                        self.resolve_declared(&effective);
                        // Placed below.
                        self.adopt_declared(&id);
                    }
                    Err(e) => {
                        // The last valid policy stays in force.
                        tracing::warn!(mesh = %id, error = %e, "invalid OperatorMesh spec");
                        mesh.invalid = Some(e.to_string());
                        return;
                    }
                }
                self.reapportion(&id);
                self.place_all(&id);
            }
            WatchEvent::Delete(om) => {
                let id = MeshId::new(om.namespace().unwrap_or_default(), om.name_any());
                self.remove_mesh(&id);
            }
            // Logged by the watch; without it the manager cannot know any
            // mesh, so there is no status to report it in.
            WatchEvent::Failed(_) => {}
            WatchEvent::Relisted(present) => {
                let gone: Vec<MeshId> = self
                    .meshes
                    .keys()
                    .filter(|id| !present.contains(&(id.namespace.clone(), id.name.clone())))
                    .cloned()
                    .collect();
                for id in gone {
                    self.remove_mesh(&id);
                }
            }
        }
    }

    /// Drops a mesh and ends its sessions. Their runtimes drop their keys
    /// when their leases run out; until then a mesh re-created under the
    /// same name assigns nothing.
    fn remove_mesh(&mut self, id: &MeshId) {
        self.generations.forget_mesh(id);
        // A mesh that was itself waiting for an earlier one's leases passes
        // that wait on.
        let waited = self.meshes.remove(id).map(|m| m.not_before);
        let gone: Vec<_> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.mesh == *id)
            .map(|(p, _)| p.clone())
            .collect();
        let mut until = waited.unwrap_or(self.now).max(self.now);
        for pod in gone {
            if let Some(s) = self.sessions.remove(&pod) {
                s.pending.close();
                until = until.max(self.lease_deadline(s.contact.last()));
            }
        }
        // Sessions that ended earlier may still be running under their lease.
        for e in self.expiring.iter().filter(|e| e.mesh == *id) {
            until = until.max(e.deadline);
        }
        self.deleted_meshes.insert(id.clone(), until);
        self.expiring.retain(|e| e.mesh != *id);
    }
}

/// Now, in Unix milliseconds, as the runtimes' reports count time.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
