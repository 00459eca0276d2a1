//! Writes `OperatorMesh` status from the core's snapshots.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;

use crate::{
    core::{MeshStatus, StatusSnapshot},
    crd::{OperatorMesh, OperatorMeshStatus, SubsetStatus},
};

/// Field manager name for status patches.
const MANAGER: &str = "opmesh-manager";

/// Patches status whenever a mesh's snapshot changes; retries failed writes.
pub async fn run(client: Client, mut snapshots: watch::Receiver<Arc<StatusSnapshot>>) {
    let mut written: HashMap<String, MeshStatus> = HashMap::new();
    let mut transitions: HashMap<(String, &'static str), (String, Time)> = HashMap::new();
    let mut retry = false;
    loop {
        if retry {
            // A failed write is retried even if nothing changes meanwhile.
            let _ = tokio::time::timeout(Duration::from_secs(1), snapshots.changed()).await;
        } else if snapshots.changed().await.is_err() {
            return;
        }
        retry = false;
        let snap = snapshots.borrow_and_update().clone();
        for (id, st) in snap.iter() {
            if written.get(id) == Some(st) {
                continue;
            }
            let Some((ns, name)) = id.split_once('/') else {
                continue;
            };
            let status = to_status(id, st, &mut transitions);
            let patch = serde_json::json!({
                "apiVersion": "opmesh.io/v1alpha1",
                "kind": "OperatorMesh",
                "status": status,
            });
            let api: Api<OperatorMesh> = Api::namespaced(client.clone(), ns);
            let res = tokio::time::timeout(
                Duration::from_secs(10),
                api.patch_status(
                    name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                ),
            )
            .await;
            match res {
                Ok(Ok(_)) => {
                    written.insert(id.clone(), st.clone());
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
        written.retain(|id, _| snap.contains_key(id));
    }
}

fn to_status(
    id: &str,
    st: &MeshStatus,
    transitions: &mut HashMap<(String, &'static str), (String, Time)>,
) -> OperatorMeshStatus {
    let mut cond = |ty: &'static str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" }.to_string();
        // lastTransitionTime changes only when the status flips.
        let entry = transitions
            .entry((id.to_string(), ty))
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
    let degraded = cond(
        "Degraded",
        st.unowned > 0,
        if st.unowned > 0 {
            "SubsetWithoutReplicas"
        } else {
            "AsExpected"
        },
        format!("{} keys have no live owner", st.unowned),
    );
    OperatorMeshStatus {
        observed_generation: st.generation,
        conditions: vec![ready, progressing, degraded],
        subsets: st
            .subsets
            .iter()
            .map(|(name, replicas, ready, keys)| SubsetStatus {
                name: name.clone(),
                replicas: *replicas,
                ready_replicas: *ready,
                owned_keys: *keys,
            })
            .collect(),
        summary: Some(
            st.subsets
                .iter()
                .map(|(n, r, ready, _)| format!("{n}:{ready}/{r}"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        weights: Some(st.weights.clone()),
    }
}
