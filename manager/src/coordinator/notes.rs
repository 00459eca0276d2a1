//! What a mesh's status should say about particular pods: an operator that
//! stayed gone past its grace period, or two runtimes that keep replacing
//! each other's session under one pod's name.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use crate::{
    id::{MeshId, PodId},
    snapshot::PodNote,
};

/// How long an operator-gone note stays without the pod rejoining.
const GONE_FOR: Duration = Duration::from_secs(600);
/// Replacements of one pod's session within the window that count as a
/// conflict.
const CONFLICT_AFTER: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OperatorGone,
    IdentityConflict,
}

#[derive(Debug)]
struct Note {
    mesh: MeshId,
    kind: Kind,
    message: String,
    until: Instant,
}

/// The notes, by pod.
#[derive(Debug, Default)]
pub(super) struct Notes {
    notes: BTreeMap<PodId, Note>,
    /// When each pod's session was replaced by a newer one.
    replaced: HashMap<PodId, Vec<Instant>>,
}

// === impl Notes ===

impl Notes {
    /// `pod`'s runtime left because its operator stayed gone.
    pub(super) fn operator_gone(
        &mut self,
        mesh: &MeshId,
        pod: &PodId,
        message: &str,
        now: Instant,
    ) {
        self.notes.insert(
            pod.clone(),
            Note {
                mesh: mesh.clone(),
                kind: Kind::OperatorGone,
                message: format!("{pod}: {message}; its keys moved to other replicas"),
                until: now + GONE_FOR,
            },
        );
    }

    /// `pod`'s runtime joined: whatever was wrong with its operator is over.
    pub(super) fn joined(&mut self, pod: &PodId) {
        if self
            .notes
            .get(pod)
            .is_some_and(|n| n.kind == Kind::OperatorGone)
        {
            self.notes.remove(pod);
        }
    }

    /// A new session replaced `pod`'s live one. Returns true when that has
    /// now happened often enough within `window` to be a conflict: two
    /// runtimes claiming one pod.
    pub(super) fn replaced(
        &mut self,
        mesh: &MeshId,
        pod: &PodId,
        now: Instant,
        window: Duration,
    ) -> bool {
        let times = self.replaced.entry(pod.clone()).or_default();
        times.retain(|t| now.saturating_duration_since(*t) < window);
        times.push(now);
        if times.len() < CONFLICT_AFTER {
            return false;
        }
        let n = times.len();
        self.notes.insert(
            pod.clone(),
            Note {
                mesh: mesh.clone(),
                kind: Kind::IdentityConflict,
                message: format!(
                    "{pod}: its session was replaced {n} times within {window:?}; two runtimes \
                     claim this pod (give each its own OPMESH_POD_NAME)"
                ),
                until: now + window,
            },
        );
        true
    }

    /// Drops notes that are over. Returns true if any was.
    pub(super) fn expire(&mut self, now: Instant) -> bool {
        let before = self.notes.len();
        self.notes.retain(|_, n| n.until > now);
        self.replaced
            .retain(|_, t| t.last().is_some_and(|t| *t + GONE_FOR > now));
        self.notes.len() != before
    }

    /// The notes about `mesh`'s pods.
    pub(super) fn for_mesh(&self, mesh: &MeshId) -> Vec<PodNote> {
        self.notes
            .values()
            .filter(|n| &n.mesh == mesh)
            .map(|n| PodNote {
                reason: match n.kind {
                    Kind::OperatorGone => "OperatorGone",
                    Kind::IdentityConflict => "IdentityConflict",
                },
                message: n.message.clone(),
            })
            .collect()
    }
}
