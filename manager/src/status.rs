//! Writes `OperatorMesh` status from the coordinator's published snapshots.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    crd::{OperatorMesh, OperatorMeshStatus, SubsetStatus},
    id::MeshId,
    snapshot::{MeshView, Published},
};

/// Field manager name for status patches.
const MANAGER: &str = "opmesh-manager";

/// What the status of one mesh is made from; a write happens only when it
/// changes.
#[derive(Clone, Debug, PartialEq)]
struct MeshStatus {
    generation: Option<i64>,
    invalid: Option<String>,
    has_policy: bool,
    moving: usize,
    unowned: usize,
    weights: String,
    subsets: Vec<SubsetCounts>,
    watch_errors: Vec<(String, String)>,
    notes: Vec<(&'static str, String)>,
}

/// One subset's line in the status.
#[derive(Clone, Debug, PartialEq)]
struct SubsetCounts {
    name: String,
    replicas: u32,
    ready: u32,
    owned: u64,
    configured: String,
    routed: u64,
}

type Transitions = HashMap<(MeshId, &'static str), (String, Time)>;

/// Patches status whenever a mesh's snapshot changes; retries failed writes.
pub(crate) async fn run(client: Client, published: Arc<Published>) {
    let mut snapshots = published.subscribe();
    let mut written: HashMap<MeshId, MeshStatus> = HashMap::new();
    let mut transitions = Transitions::new();
    let mut retry = false;
    loop {
        if retry {
            // A failed write is retried even if nothing changes meanwhile.
            let _ = tokio::time::timeout(Duration::from_secs(1), snapshots.changed()).await;
        } else if snapshots.changed().await.is_err() {
            return;
        }
        retry = false;
        snapshots.borrow_and_update();
        let snap = published.load();
        for (id, view) in &snap.meshes {
            let st = MeshStatus::from(view);
            if written.get(id) == Some(&st) {
                continue;
            }
            let status = to_status(id, &st, &mut transitions);
            let patch = serde_json::json!({
                "apiVersion": "opmesh.io/v1alpha1",
                "kind": "OperatorMesh",
                "status": status,
            });
            let api: Api<OperatorMesh> = Api::namespaced(client.clone(), &id.namespace);
            let res = tokio::time::timeout(
                Duration::from_secs(10),
                api.patch_status(
                    &id.name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                ),
            )
            .await;
            match res {
                Ok(Ok(_)) => {
                    written.insert(id.clone(), st);
                }
                Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
                    written.remove(id);
                }
                Ok(Err(e)) => {
                    tracing::warn!(mesh = %id, error = %e, "cannot write status; will retry");
                    retry = true;
                }
                Err(_) => {
                    tracing::warn!(mesh = %id, "status write timed out; will retry");
                    retry = true;
                }
            }
        }
        written.retain(|id, _| snap.meshes.contains_key(id));
    }
}

// === impl MeshStatus ===

impl From<&MeshView> for MeshStatus {
    fn from(v: &MeshView) -> Self {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            generation: v.generation,
            invalid: v.invalid.clone(),
            has_policy: v.has_policy,
            moving: v.moving(),
            unowned: v.unowned,
            weights: v.weights.clone(),
            subsets: v
                .subsets
                .iter()
                .map(|s| SubsetCounts {
                    name: s.name.clone(),
                    replicas: count(s.replicas.len()),
                    ready: count(s.replicas.iter().filter(|r| r.ready).count()),
                    owned: s.replicas.iter().map(|r| r.owned_keys).sum(),
                    configured: percent(s.configured_share, 2),
                    routed: s.routed_keys,
                })
                .collect(),
            watch_errors: v.watch_errors.clone(),
            notes: v
                .notes
                .iter()
                .map(|n| (n.reason, n.message.clone()))
                .collect(),
        }
    }
}

fn to_status(id: &MeshId, st: &MeshStatus, transitions: &mut Transitions) -> OperatorMeshStatus {
    let mut cond = |ty: &'static str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" }.to_string();
        // lastTransitionTime changes only when the status flips.
        let entry = transitions
            .entry((id.clone(), ty))
            .or_insert_with(|| (status.clone(), Time(Timestamp::now())));
        if entry.0 != status {
            *entry = (status.clone(), Time(Timestamp::now()));
        }
        Condition {
            type_: ty.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: st.generation,
            last_transition_time: entry.1.clone(),
        }
    };
    let ready = if let Some(why) = &st.invalid {
        let kept = if st.has_policy {
            "; the last valid policy stays in force"
        } else {
            "; no policy is in force"
        };
        cond("Ready", false, "InvalidSpec", format!("{why}{kept}"))
    } else if !st.watch_errors.is_empty() {
        let what: Vec<String> = st
            .watch_errors
            .iter()
            .map(|(gvk, e)| format!("{gvk}: {e}"))
            .collect();
        cond(
            "Ready",
            false,
            "WatchFailed",
            format!(
                "the manager cannot watch {}; retrying. Keys are placed only once every watch has \
                 listed: check the manager's RBAC and that the resource is installed",
                what.join("; ")
            ),
        )
    } else if st.has_policy && st.subsets.iter().all(|s| s.replicas == 0) {
        cond(
            "Ready",
            false,
            "NoReplicas",
            "no runtime has joined this mesh, so nothing is reconciled: check that the operator's \
             pods run the opmesh runtime sidecar with OPMESH_MESH set to this mesh"
                .into(),
        )
    } else if st.unowned > 0 {
        cond(
            "Ready",
            false,
            "KeysWithoutOwner",
            format!("{} keys route to a subset with no live replica", st.unowned),
        )
    } else {
        cond(
            "Ready",
            true,
            "AllKeysOwned",
            "every key has a live owner".into(),
        )
    };
    let progressing = if st.moving > 0 {
        cond(
            "Progressing",
            true,
            "MovingKeys",
            format!("{} keys are moving to a new owner", st.moving),
        )
    } else {
        cond("Progressing", false, "Stable", "no keys are moving".into())
    };
    let degraded = if st.unowned > 0 {
        cond(
            "Degraded",
            true,
            "SubsetWithoutReplicas",
            format!("{} keys have no live owner", st.unowned),
        )
    } else if let Some((reason, _)) = st.notes.first() {
        let what: Vec<&str> = st.notes.iter().map(|(_, m)| m.as_str()).collect();
        cond("Degraded", true, reason, what.join("; "))
    } else {
        cond(
            "Degraded",
            false,
            "AsExpected",
            "every key has a live owner".into(),
        )
    };
    let routed: u64 = st.subsets.iter().map(|s| s.routed).sum();
    let observed = |s: &SubsetCounts| {
        (routed > 0).then(|| percent(s.routed as f64 * 100.0 / routed as f64, 1))
    };
    OperatorMeshStatus {
        rollout: None,
        observed_generation: st.generation,
        conditions: vec![ready, progressing, degraded],
        subsets: st
            .subsets
            .iter()
            .map(|s| SubsetStatus {
                name: s.name.clone(),
                replicas: s.replicas,
                ready_replicas: s.ready,
                owned_keys: s.owned,
                configured_share: Some(s.configured.clone()),
                routed_keys: s.routed,
                observed_share: observed(s),
            })
            .collect(),
        summary: Some(
            st.subsets
                .iter()
                .map(|s| format!("{}:{}/{}", s.name, s.ready, s.replicas))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        weights: Some(st.weights.clone()),
        observed: (routed > 0).then(|| {
            st.subsets
                .iter()
                .map(|s| format!("{}={}", s.name, observed(s).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(" ")
        }),
    }
}

/// `value` percent with at most `decimals` decimals and no trailing zeros:
/// `5%`, `33.33%`, `4.8%`.
fn percent(value: f64, decimals: usize) -> String {
    let s = format!("{value:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}%")
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn percentages_read_like_people_write_them() {
        assert_eq!(percent(5.0, 2), "5%");
        assert_eq!(percent(100.0 / 3.0, 2), "33.33%");
        assert_eq!(percent(4.8049, 1), "4.8%");
        assert_eq!(percent(0.0, 1), "0%");
        assert_eq!(percent(12.5, 2), "12.5%");
    }
}
