//! Placement: moves each key one step towards its policy owner, and sends
//! the batched revokes and `Synced` markers.

use std::collections::HashSet;

use kube::ResourceExt as _;
use opmesh_proto::v1::{
    ManagerMessage, ObjectEvent, Revoke, Synced, manager_message::Msg,
    object_event::Type as EventType,
};

use super::{Coordinator, Pending};
use crate::{
    gvk::Gvk,
    id::{Holder, MeshId},
    mesh::{Held, Mesh, Move},
    object::RawObject,
    policy::Labels,
};

// === impl Coordinator ===

impl Coordinator {
    /// Places every key of every mesh.
    pub(super) fn place_everywhere(&mut self) {
        let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
        for id in ids {
            self.place_all(&id);
        }
    }

    /// Places every key of mesh `id`.
    pub(super) fn place_all(&mut self, id: &MeshId) {
        let keys: Vec<String> = match self.meshes.get(id) {
            Some(m) => m.keys().cloned().collect(),
            None => return,
        };
        for k in keys {
            self.place(id, &k);
        }
    }

    /// True when the mesh's view of the cluster is complete enough to route.
    fn synced(&self, mesh: &Mesh) -> bool {
        self.namespaces_synced
            && mesh.policy.is_some()
            && !mesh.primaries.is_empty()
            && mesh
                .types()
                .all(|g| self.watches.get(&g.key()).is_some_and(|w| w.synced))
    }

    /// Recomputes mesh `id`'s exact split of the namespaces that exist, and
    /// places its keys again if it changed.
    pub(super) fn reapportion(&mut self, id: &MeshId) {
        let Some(mesh) = self.meshes.get(id) else {
            return;
        };
        let Some(policy) = &mesh.policy else {
            return;
        };
        // A namespace not seen yet is left out until its labels are known.
        let apportionment = policy.apportion(
            mesh.index
                .namespaces()
                .filter_map(|ns| self.namespaces.get_key_value(ns)),
        );
        let Some(mesh) = self.meshes.get_mut(id) else {
            return;
        };
        if *mesh.apportionment != apportionment {
            mesh.apportionment = std::sync::Arc::new(apportionment);
            self.place_all(id);
        }
    }

    /// Recomputes every mesh's exact split.
    pub(super) fn reapportion_everywhere(&mut self) {
        let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
        for id in ids {
            self.reapportion(&id);
        }
    }

    /// The labels of the namespace of `key`.
    pub(super) fn namespace_labels(&self, key: &str) -> &Labels {
        static EMPTY: Labels = Labels::new();
        let ns = key.split_once('/').map(|(ns, _)| ns).unwrap_or("");
        self.namespaces.get(ns).unwrap_or(&EMPTY)
    }

    /// Moves `key` of mesh `id` one step towards its policy owner.
    pub(super) fn place(&mut self, id: &MeshId, key: &str) {
        self.placed_one();
        let Some(mesh) = self.meshes.get(id) else {
            return;
        };
        if !self.synced(mesh) {
            return;
        }
        let Some(policy) = mesh.policy.clone() else {
            return;
        };
        let has_objects = mesh.index.has_objects(key);
        let desired = if has_objects {
            policy
                .route(key, self.namespace_labels(key), &mesh.apportionment)
                .and_then(|s| self.desired_holder(id, s, key))
        } else {
            None
        };
        let not_before = self.assign_after.max(mesh.not_before);
        let Some(mesh) = self.meshes.get_mut(id) else {
            return;
        };
        if let Some(reporter) = mesh.reported.remove(key) {
            if let Some(Held::Owned(h) | Held::Revoking(h)) = mesh.own.holder(key)
                && h.pod != reporter.pod
            {
                // Another runtime holds it: the reporter must let go.
                tracing::warn!(key, holder = %h, reporter = %reporter, "reported key is held elsewhere; revoking it from the reporter");
                self.revokes
                    .entry(reporter)
                    .or_default()
                    .push(key.to_string());
                return;
            }
            // Unowned, or held by an earlier session of the same pod, which
            // the reporter now is: keep it there if the policy agrees, without
            // waiting for leases; otherwise take it back through a revoke.
            let keep = desired.as_ref() == Some(&reporter) || (policy.paused() && has_objects);
            if keep {
                mesh.own.adopt(key, &reporter);
                self.send_key(id, &reporter, key);
            } else {
                mesh.own.mark_revoking(key, &reporter);
                self.revokes
                    .entry(reporter)
                    .or_default()
                    .push(key.to_string());
            }
            return;
        }
        // Anything else waits until no lease from an earlier manager (or
        // an earlier mesh of this name) can still be running.
        if self.now < not_before {
            return;
        }
        match mesh.own.place(key, desired.as_ref(), policy.paused()) {
            Some(Move::Assign(holder, key)) => self.send_key(id, &holder, &key),
            Some(Move::Revoke(holder, key)) => {
                self.revokes.entry(holder).or_default().push(key);
            }
            None => {}
        }
    }

    /// Sends every object of `key` to `holder`'s session, to be closed by a
    /// `Synced` marker at the next flush.
    fn send_key(&mut self, id: &MeshId, holder: &Holder, key: &str) {
        let Some(mesh) = self.meshes.get(id) else {
            return;
        };
        let Some(session) = self
            .sessions
            .get_mut(&holder.pod)
            .filter(|s| s.holder == *holder)
        else {
            return;
        };
        for obj in mesh.index.objects(key) {
            if let Some(o) = self
                .store
                .get(&obj.gvk)
                .and_then(|m| m.get(&(obj.namespace.clone(), obj.name.clone())))
            {
                push_object(
                    &session.pending,
                    key,
                    EventType::Applied,
                    o,
                    &obj.gvk,
                    mesh.gvk(&obj.gvk),
                );
            }
        }
        session.needs_sync = true;
    }

    /// Sends the batched revokes and the `Synced` markers that close each
    /// assignment batch.
    pub(super) fn flush(&mut self) {
        let revokes: Vec<(Holder, Vec<String>)> = self.revokes.drain().collect();
        for (holder, keys) in revokes {
            let now = self.now;
            if let Some(mesh) = self
                .sessions
                .get(&holder.pod)
                .and_then(|s| self.meshes.get_mut(&s.mesh))
            {
                mesh.moves.0 += keys.len() as u64;
            }
            if let Some(s) = self.session_of(&holder) {
                for k in &keys {
                    if s.unreleased.insert(k.clone(), now).is_none() {
                        s.revoked.push_back((now, k.clone()));
                    }
                }
                let dropped: HashSet<&str> = keys.iter().map(String::as_str).collect();
                s.pending.drop_keys(&dropped);
                s.pending.control(ManagerMessage {
                    msg: Some(Msg::Revoke(Revoke { keys })),
                });
            }
        }
        for s in self.sessions.values_mut() {
            if std::mem::take(&mut s.needs_sync) {
                s.pending.control(ManagerMessage {
                    msg: Some(Msg::Synced(Synced {})),
                });
            }
        }
    }
}

/// Queues the state of `obj`, of type `gvk` (whose key is `gvk_key`), for
/// the holder of `key`.
pub(super) fn push_object(
    pending: &Pending,
    key: &str,
    ty: EventType,
    obj: &RawObject,
    gvk_key: &str,
    gvk: Option<&Gvk>,
) {
    let Some(gvk) = gvk else { return };
    // The JSON as the API server sent it (the watch added the type list
    // items lack): copied, not encoded again.
    let bytes = obj.json().as_bytes().to_vec();
    let (ns, nm) = (
        obj.metadata.namespace.as_deref().unwrap_or_default(),
        obj.metadata.name.as_deref().unwrap_or_default(),
    );
    let (namespace, name) = (ns.to_string(), nm.to_string());
    pending.object(
        key,
        gvk_key,
        ns,
        nm,
        ManagerMessage {
            msg: Some(Msg::Event(ObjectEvent {
                key: key.to_string(),
                r#type: ty as i32,
                resource_version: obj.resource_version().unwrap_or_default(),
                object: bytes,
                gvk: Some(gvk.into()),
                namespace,
                name,
            })),
        },
    );
}
