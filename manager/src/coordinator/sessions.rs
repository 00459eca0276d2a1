//! Runtime sessions: connect, disconnect, released keys and lease expiry.

use std::sync::Arc;

use opmesh_proto::v1::{ControllerTypes, Hello, ManagerMessage, Welcome, manager_message::Msg};

use super::{Connected, Contact, Coordinator, Expiring, Pending, Session};
use crate::{
    error::Refusal,
    gvk::{Gvk, controller_keys},
    id::{Holder, MeshId, PodId, SessionId},
    policy::Labels,
};

// === impl Coordinator ===

impl Coordinator {
    pub(super) fn connect(
        &mut self,
        hello: &Hello,
        pod_labels: &Labels,
        pod_uid: &str,
    ) -> Result<Connected, Refusal> {
        self.dirty = true;
        let id = MeshId::new(&hello.mesh_namespace, &hello.mesh_name);
        let pod = PodId::new(&hello.pod_namespace, &hello.pod_name);
        let mesh = self
            .meshes
            .get_mut(&id)
            .ok_or_else(|| Refusal::UnknownMesh(id.to_string()))?;
        let policy = mesh.policy.clone().ok_or_else(|| Refusal::NoValidPolicy {
            mesh: id.to_string(),
            reason: mesh.invalid.clone().unwrap_or_default(),
        })?;
        let subset = policy
            .subset_for_pod(pod_labels)
            .map_err(|e| Refusal::NotAMember {
                pod: pod.to_string(),
                mesh: id.to_string(),
                reason: e.to_string(),
            })?;
        // The mesh, not the runtime, decides which types it routes.
        let controllers =
            ControllerTypes::declared(&hello.controllers, hello.primary.as_ref(), &hello.owns);
        let keys = controller_keys(&controllers);
        if let Some(reason) = policy.declared().undeclared(&keys) {
            return Err(Refusal::UndeclaredTypes {
                mesh: id.to_string(),
                reason,
            });
        }
        // Types this mesh declares for the first time: another mesh may
        // already watch them, so their cached objects are indexed below.
        let mut declared = Vec::new();
        for c in &controllers {
            let g = c.primary.as_ref().map(Gvk::from).ok_or_else(|| {
                Refusal::Malformed("a controller of the hello names no primary type".into())
            })?;
            if mesh.primaries.insert(g.key(), g.clone()).is_none() {
                declared.push(g.key());
            }
            for g in &c.owns {
                let g = Gvk::from(g);
                if mesh.owns.insert(g.key(), g.clone()).is_none() {
                    declared.push(g.key());
                }
            }
        }
        let wanted: Vec<Gvk> = mesh.types().cloned().collect();
        for g in &wanted {
            self.ensure_watch(g);
        }
        if !declared.is_empty() {
            // Objects of types declared before (owned ones waited for their
            // primary) as well as the new ones.
            self.index_all_cached(&id);
        }
        self.reapportion(&id);

        // A newer session from the same pod replaces the old one, whose keys
        // wait for its lease like any vanished session's.
        if let Some(old) = self.sessions.get(&pod) {
            let holder = old.holder.clone();
            let window = self.lease_ttl * 10;
            if self.notes.replaced(&id, &pod, self.now, window) {
                tracing::warn!(runtime = %pod, "two runtimes keep replacing each other's session under one pod name");
            }
            self.disconnect(&holder, false);
        }
        self.notes.joined(&pod);
        let holder = Holder {
            pod: pod.clone(),
            session: SessionId(self.next_session),
        };
        self.next_session += 1;
        let pending = Arc::new(Pending::default());
        let subset_name = policy.subsets()[subset].name.clone();
        pending.control(ManagerMessage {
            msg: Some(Msg::Welcome(Welcome {
                runtime_id: pod.to_string(),
                subset: subset_name.clone(),
                lease_ttl_ms: u32::try_from(self.lease_ttl.as_millis()).unwrap_or(u32::MAX),
            })),
        });
        let contact = Contact::new(self.now);
        self.sessions.insert(
            pod.clone(),
            Session {
                mesh: id.clone(),
                holder: holder.clone(),
                uid: pod_uid.to_string(),
                pending: pending.clone(),
                needs_sync: true,
                declared: keys
                    .into_iter()
                    .flat_map(|(p, owns)| std::iter::once(p).chain(owns))
                    .collect(),
                contact: contact.clone(),
                revoked: Default::default(),
                unreleased: Default::default(),
            },
        );
        if let Some(mesh) = self.meshes.get_mut(&id) {
            mesh.own.join(subset, &pod);
            for held in &hello.held {
                mesh.reported.insert(held.key.clone(), holder.clone());
            }
        }
        self.refresh_draining(&id);
        tracing::info!(mesh = %id, runtime = %pod, subset = %subset_name, held = hello.held.len(), "runtime joined");
        // Reported keys first: they can stay where they are without waiting.
        for held in &hello.held {
            self.place(&id, &held.key);
        }
        self.place_all(&id);
        Ok(Connected {
            holder,
            pending,
            contact,
            mesh: id,
            subset: subset_name,
        })
    }

    pub(super) fn disconnect(&mut self, holder: &Holder, graceful: bool) {
        if self.session_of(holder).is_none() {
            return;
        }
        let Some(session) = self.sessions.remove(&holder.pod) else {
            return;
        };
        self.dirty = true;
        session.pending.close();
        self.revokes.remove(holder);
        if let Some(mesh) = self.meshes.get_mut(&session.mesh) {
            mesh.own.leave(&holder.pod);
            // Keys it reported but that were not placed yet are still its own
            // until its lease runs out.
            let unplaced: Vec<String> = mesh
                .reported
                .iter()
                .filter(|(_, h)| *h == holder)
                .map(|(k, _)| k.clone())
                .collect();
            for k in unplaced {
                mesh.reported.remove(&k);
                if mesh.own.holder(&k).is_none() {
                    mesh.own.mark_revoking(&k, holder);
                }
            }
        }
        if graceful {
            tracing::info!(mesh = %session.mesh, runtime = %holder.pod, "runtime said goodbye; its keys move now");
            if let Some(mesh) = self.meshes.get_mut(&session.mesh) {
                mesh.own.free(holder);
            }
        } else {
            // It may still be reconciling until its lease runs out, which is at
            // most one TTL after the last heartbeat we heard.
            let deadline = self.lease_deadline(session.contact.last());
            tracing::info!(mesh = %session.mesh, runtime = %holder.pod, wait = ?deadline.saturating_duration_since(self.now), "runtime lost; its keys move when its lease has run out");
            self.expiring.push(Expiring {
                mesh: session.mesh.clone(),
                holder: holder.clone(),
                deadline,
            });
        }
        self.place_all(&session.mesh);
    }

    pub(super) fn released(&mut self, holder: &Holder, keys: Vec<String>) {
        let (now, metrics) = (self.now, self.metrics.clone());
        let Some(session) = self.session_of(holder) else {
            return;
        };
        for key in &keys {
            if let Some(at) = session.unreleased.remove(key) {
                metrics.handoffs.inc();
                metrics
                    .handoff_duration
                    .observe(now.saturating_duration_since(at).as_secs_f64());
            }
        }
        let id = session.mesh.clone();
        self.dirty = true;
        for key in keys {
            let freed = self
                .meshes
                .get_mut(&id)
                .is_some_and(|m| m.own.released(holder, &key));
            if freed {
                if let Some(m) = self.meshes.get_mut(&id) {
                    m.moves.1 += 1;
                }
                self.place(&id, &key);
            }
        }
    }

    /// Frees the keys of sessions whose lease has run out, and ends sessions
    /// that went silent.
    pub(super) fn expire(&mut self) {
        let now = self.now;
        if self.notes.expire(now) {
            self.dirty = true;
        }
        self.deleted_meshes.retain(|_, t| *t > now);
        let waking: Vec<MeshId> = self
            .meshes
            .iter_mut()
            .filter(|(_, m)| m.waiting && m.not_before <= now)
            .map(|(id, m)| {
                m.waiting = false;
                id.clone()
            })
            .collect();
        for id in waking {
            self.dirty = true;
            self.place_all(&id);
        }
        let silent: Vec<Holder> = self
            .sessions
            .values()
            .filter(|s| self.lease_deadline(s.contact.last()) < now)
            .map(|s| s.holder.clone())
            .collect();
        for holder in silent {
            tracing::warn!(runtime = %holder.pod, "no heartbeat for longer than the lease; ending the session");
            self.disconnect(&holder, false);
        }
        let deadline = super::revoke_deadline(self.lease_ttl);
        let mut stuck = Vec::new();
        for s in self.sessions.values_mut() {
            // Drop answered revokes from the front; the oldest left is due
            // first.
            while let Some((_, k)) = s.revoked.front() {
                if s.unreleased.contains_key(k) {
                    break;
                }
                s.revoked.pop_front();
            }
            if s.revoked
                .front()
                .is_some_and(|(at, _)| *at + deadline <= now)
            {
                stuck.push(s.holder.clone());
            }
        }
        for holder in stuck {
            tracing::warn!(runtime = %holder.pod, deadline = ?deadline, "a revoke was not answered in time; ending the session, so its keys move when its lease has run out");
            self.disconnect(&holder, false);
        }
        let (due, rest): (Vec<Expiring>, Vec<Expiring>) = std::mem::take(&mut self.expiring)
            .into_iter()
            .partition(|e| e.deadline <= now);
        self.expiring = rest;
        for e in due {
            self.dirty = true;
            if let Some(mesh) = self.meshes.get_mut(&e.mesh) {
                let freed = mesh.own.free(&e.holder);
                if !freed.is_empty() {
                    self.metrics.lease_expiries.inc();
                    tracing::info!(mesh = %e.mesh, holder = %e.holder, keys = freed.len(), "lease expired; reassigning");
                }
            }
            self.place_all(&e.mesh);
        }
    }

    /// Takes the mesh's drained pods (those its drain annotation names, with
    /// the UID of their live session) off their subsets' rings, so their
    /// keys move to the other replicas through the usual handoff. Returns
    /// true if that changed anything, after placing the keys again.
    pub(super) fn refresh_draining(&mut self, id: &MeshId) -> bool {
        let Some(mesh) = self.meshes.get(id) else {
            return false;
        };
        let draining: std::collections::BTreeSet<PodId> = mesh
            .drain
            .iter()
            .filter(|(pod, uid)| {
                self.sessions
                    .get(*pod)
                    .is_some_and(|s| s.mesh == *id && (uid.is_empty() || s.uid == **uid))
            })
            .map(|(pod, _)| pod.clone())
            .collect();
        let Some(mesh) = self.meshes.get_mut(id) else {
            return false;
        };
        if !mesh.own.set_draining(draining) {
            return false;
        }
        self.dirty = true;
        self.place_all(id);
        true
    }

    /// The session of `holder`, if it is still connected.
    pub(super) fn session_of(&mut self, holder: &Holder) -> Option<&mut Session> {
        self.sessions
            .get_mut(&holder.pod)
            .filter(|s| s.holder == *holder)
    }

    /// The holder the policy wants for `key` in `subset`: the session of the
    /// pod the subset's ring picks.
    pub(super) fn desired_holder(&self, id: &MeshId, subset: usize, key: &str) -> Option<Holder> {
        let pod = self.meshes.get(id)?.own.pick(subset, key)?;
        self.sessions.get(pod).map(|s| s.holder.clone())
    }
}
