//! Builds the typed [`Snapshot`] the coordinator publishes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::Coordinator;
use crate::{
    id::{Holder, MeshId},
    mesh::{Held, Mesh, Routed, ViewCache},
    snapshot::{KeyView, MeshView, ReplicaView, RoutingView, Snapshot, SubsetView},
};

// === impl Coordinator ===

impl Coordinator {
    /// What readers may know, as of the last step. The per-key parts (every
    /// held key; where the policy routes every key) are reused from the last
    /// snapshot while what they were computed from is unchanged, so a
    /// steady mesh costs a snapshot nothing per key: building one stops the
    /// routing of events while it runs.
    pub(crate) fn snapshot(&mut self) -> Snapshot {
        let ids: Vec<MeshId> = self.meshes.keys().cloned().collect();
        let mut meshes = BTreeMap::new();
        for id in ids {
            let Some(mut cache) = self
                .meshes
                .get_mut(&id)
                .map(|m| std::mem::take(&mut m.view))
            else {
                continue;
            };
            if let Some(mesh) = self.meshes.get(&id) {
                let view = self.mesh_view(&id, mesh, &mut cache);
                meshes.insert(id.clone(), view);
            }
            if let Some(mesh) = self.meshes.get_mut(&id) {
                mesh.view = cache;
            }
        }
        Snapshot {
            meshes,
            synced: self.started && self.namespaces_synced,
        }
    }

    fn mesh_view(&self, id: &MeshId, mesh: &Mesh, cache: &mut ViewCache) -> MeshView {
        let version = mesh.own.version();
        let (keys, owned) = match &cache.keys {
            Some((v, keys, owned)) if *v == version => (keys.clone(), owned.clone()),
            _ => {
                let keys: BTreeMap<String, KeyView> = mesh
                    .own
                    .iter()
                    .enumerate()
                    .map(|(i, (k, h))| {
                        if (i as u64 + 1).is_multiple_of(super::PROGRESS_EVERY) {
                            self.still_running();
                        }
                        let (holder, moving) = match h {
                            Held::Owned(h) => (h.clone(), false),
                            Held::Revoking(h) => (h.clone(), true),
                        };
                        (k.clone(), KeyView { holder, moving })
                    })
                    .collect();
                let mut owned: HashMap<Holder, u64> = HashMap::new();
                for k in keys.values().filter(|k| !k.moving) {
                    *owned.entry(k.holder.clone()).or_default() += 1;
                }
                let keys = Arc::new(keys);
                cache.keys = Some((version, keys.clone(), owned.clone()));
                (keys, owned)
            }
        };
        let mut subsets = Vec::new();
        let mut unowned = 0;
        if let Some(policy) = &mesh.policy {
            // Where the policy sends each key that has objects.
            let fresh = cache.routed.as_ref().filter(|r| {
                r.index == mesh.index.version()
                    && r.own == version
                    && r.namespaces == self.namespaces_version
                    && Arc::ptr_eq(&r.policy, policy)
                    && Arc::ptr_eq(&r.apportionment, &mesh.apportionment)
            });
            let routed = match fresh {
                Some(r) => {
                    unowned = r.unowned;
                    r.counts.clone()
                }
                None => {
                    let mut routed = vec![0u64; policy.subsets().len()];
                    for (i, k) in mesh
                        .index
                        .keys()
                        .filter(|k| mesh.index.has_objects(k))
                        .enumerate()
                    {
                        if (i as u64 + 1).is_multiple_of(super::PROGRESS_EVERY) {
                            self.still_running();
                        }
                        let Some(subset) =
                            policy.route(k, self.namespace_labels(k), &mesh.apportionment)
                        else {
                            continue;
                        };
                        routed[subset] += 1;
                        if mesh.own.holder(k).is_none() {
                            unowned += 1;
                        }
                    }
                    cache.routed = Some(Routed {
                        index: mesh.index.version(),
                        own: version,
                        namespaces: self.namespaces_version,
                        policy: policy.clone(),
                        apportionment: mesh.apportionment.clone(),
                        counts: routed.clone(),
                        unowned,
                    });
                    routed
                }
            };
            let shares = policy.shares();
            for (i, s) in policy.subsets().iter().enumerate() {
                let replicas = mesh
                    .own
                    .members(i)
                    .filter_map(|pod| self.sessions.get(pod))
                    .map(|s| {
                        let last_contact = s.contact.last();
                        ReplicaView {
                            holder: s.holder.clone(),
                            ready: s.pending.is_empty(),
                            pending: s.pending.len(),
                            draining: mesh.own.is_draining(&s.holder.pod),
                            load: s.contact.load(),
                            owned_keys: owned.get(&s.holder).copied().unwrap_or(0),
                            last_contact,
                            lease_until: last_contact + self.lease_ttl,
                        }
                    })
                    .collect();
                subsets.push(SubsetView {
                    name: s.name.clone(),
                    replicas,
                    configured_share: shares[i],
                    routed_keys: routed[i],
                });
            }
        }
        let mut watch_errors: Vec<(String, String)> = mesh
            .types()
            .filter_map(|g| {
                let key = g.key();
                let err = self.watches.get(&key)?.error.clone()?;
                Some((key, err))
            })
            .collect();
        // Declared types the manager cannot watch yet, for lack of them in
        // discovery.
        if let Some(policy) = &mesh.policy {
            for key in policy.declared().types() {
                if let Some(e) = self.unresolved.get(key) {
                    watch_errors.push((key.clone(), e.clone()));
                }
            }
        }
        if let Some(e) = &self.namespaces_error {
            watch_errors.push(("/v1/Namespace".into(), e.clone()));
        }
        MeshView {
            generation: mesh.generation,
            invalid: mesh.invalid.clone(),
            has_policy: mesh.policy.is_some(),
            declared: mesh.policy.as_ref().map(|p| p.declared().clone()),
            runtime_namespaces: mesh
                .policy
                .as_ref()
                .map(|p| p.runtime_namespaces().to_vec())
                .unwrap_or_default(),
            weights: mesh
                .policy
                .as_ref()
                .map(|p| p.weights_summary())
                .unwrap_or_default(),
            subsets,
            keys,
            unowned,
            watch_errors,
            notes: self.notes.for_mesh(id),
            moves: mesh.moves,
            routing: mesh.policy.as_ref().map(|policy| RoutingView {
                policy: policy.clone(),
                apportionment: mesh.apportionment.clone(),
                namespaces: self.namespaces.clone(),
            }),
        }
    }
}
