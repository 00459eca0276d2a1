//! Canary rollouts (`spec.rollout`, docs/rollout.md): the leading manager
//! walks each mesh's steps, runs each analysis on the runtimes' reported
//! reconciles, and rolls back on its own.
//!
//! Its state lives in `status.rollout`, so a new leader resumes where the
//! old one was. The weight it sets there is what the coordinator routes
//! with ([`effective_spec`]), so moving the canary's share goes through
//! the usual live handoff, and `spec` stays the user's.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::ObjectReference, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};

use crate::{
    analysis::{Stats, Thresholds, Verdict, analyse},
    crd::{
        AnalysisRun, AnalysisSpec, OperatorMesh, OperatorMeshSpec, RolloutSpec, RolloutStatus,
        WeightSpec,
    },
    id::MeshId,
    outcomes::Outcomes,
    snapshot::{MeshView, Published},
};

/// The annotation `kubectl opmesh rollout promote` sets:
/// `revision/retry/step` of the pause it promotes.
pub(crate) const PROMOTE_ANNOTATION: &str = "opmesh.io/rollout-promote";
/// The annotation `kubectl opmesh rollout abort` sets: `revision/retry` of
/// the run it aborts.
pub(crate) const ABORT_ANNOTATION: &str = "opmesh.io/rollout-abort";

/// Names one run of a rollout (a revision, started over `retry` times), as
/// the abort annotation does.
pub(crate) fn run_mark(revision: &str, retry: u32) -> String {
    format!("{revision}/{retry}")
}

/// Names one step of a run, as the promote annotation does.
pub(crate) fn step_mark(revision: &str, retry: u32, step: u32) -> String {
    format!("{revision}/{retry}/{step}")
}

/// How often each rollout is looked at.
const TICK: Duration = Duration::from_secs(1);
/// The field manager of `status.rollout`.
const MANAGER: &str = "opmesh-rollout";

/// The spec the coordinator routes with: while a rollout is declared, its
/// status's weight splits the keys between stable and canary (all to
/// stable until the rollout has started), and other subsets get none.
pub(crate) fn effective_spec(mesh: &OperatorMesh) -> OperatorMeshSpec {
    let mut spec = mesh.spec.clone();
    let Some(rollout) = &spec.rollout else {
        return spec;
    };
    let weight = mesh
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_ref())
        .filter(|s| s.revision == rollout.revision && s.retry == rollout.retry)
        .map_or(0, |s| s.weight.min(100));
    let total = spec.routing.weight_total.unwrap_or(100);
    let canary = u32::try_from(u64::from(total) * u64::from(weight) / 100).unwrap_or(total);
    spec.routing.weights = vec![
        WeightSpec {
            subset: rollout.stable.clone(),
            weight: total - canary,
        },
        WeightSpec {
            subset: rollout.canary.clone(),
            weight: canary,
        },
    ];
    spec
}

/// What a tick knows about one mesh besides its spec and status.
pub(crate) struct Observed<'a> {
    /// Now, in Unix milliseconds.
    pub(crate) now_ms: i64,
    /// Why the mesh may not take a step now, if it may not.
    pub(crate) not_ready: Option<String>,
    /// The canary's share in force, in percent, once every key sits where
    /// it goes (None while keys are moving).
    pub(crate) settled_share: Option<f64>,
    /// The mesh's `opmesh.io/rollout-promote` annotation, if set.
    pub(crate) promote_mark: Option<&'a str>,
    /// The mesh's `opmesh.io/rollout-abort` annotation, if set.
    pub(crate) abort_mark: Option<&'a str>,
    /// The canary's and stable's numbers since `since_ms` (the first
    /// argument), counting keys that lag by the second, in milliseconds.
    pub(crate) stats: &'a dyn Fn(i64, i64) -> (Stats, Stats),
}

/// An Event a step calls for: type, reason, note.
pub(crate) type Note = (EventType, &'static str, String);

/// The rollout's next status, and the Events to record. Pure.
pub(crate) fn step(
    rollout: &RolloutSpec,
    status: Option<&RolloutStatus>,
    seen: &Observed<'_>,
) -> (RolloutStatus, Vec<Note>) {
    let mut notes = Vec::new();
    let stamp = |ms: i64| {
        Timestamp::from_millisecond(ms)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let mut st = match status {
        Some(s) if s.revision == rollout.revision && s.retry == rollout.retry => s.clone(),
        _ => {
            notes.push((
                EventType::Normal,
                "RolloutStarted",
                format!(
                    "rolling {} out from {} to {}",
                    rollout.revision, rollout.stable, rollout.canary
                ),
            ));
            RolloutStatus {
                revision: rollout.revision.clone(),
                retry: rollout.retry,
                phase: "Progressing".into(),
                step: 0,
                step_started_at: stamp(seen.now_ms),
                ..Default::default()
            }
        }
    };
    let total = rollout.steps.len() as u32;
    let done = |st: &mut RolloutStatus| {
        st.step_text = format!("{}/{total}", (st.step + 1).min(total));
        st.canary_share = format!("{}%", st.weight);
    };
    if matches!(st.phase.as_str(), "Promoted" | "RolledBack") {
        done(&mut st);
        return (st, notes);
    }
    let aborted_by_api = seen.abort_mark == Some(run_mark(&st.revision, st.retry).as_str());
    if rollout.abort || aborted_by_api {
        st.phase = "RolledBack".into();
        st.weight = 0;
        st.message = if rollout.abort {
            "aborted (spec.rollout.abort): every key is back on stable; set it to false, and \
             raise spec.rollout.retry or set a new revision, to start again"
                .into()
        } else {
            "aborted (kubectl opmesh rollout abort): every key is back on stable; kubectl \
             opmesh rollout retry, or a new revision, starts again"
                .into()
        };
        notes.push((EventType::Warning, "RolledBack", st.message.clone()));
        done(&mut st);
        return (st, notes);
    }
    let started_ms = Timestamp::strptime("%Y-%m-%dT%H:%M:%S%.fZ", &st.step_started_at)
        .or_else(|_| st.step_started_at.parse::<Timestamp>())
        .map(|t| t.as_millisecond())
        .unwrap_or(seen.now_ms);
    let elapsed_s = (seen.now_ms - started_ms).max(0) as f64 / 1000.0;
    let advance = |st: &mut RolloutStatus, notes: &mut Vec<Note>| {
        st.step += 1;
        st.step_started_at = stamp(seen.now_ms);
        st.phase = "Progressing".into();
        if st.step >= total {
            st.phase = "Promoted".into();
            st.weight = 100;
            st.message = format!("promoted: {} has every key", rollout.canary);
            notes.push((EventType::Normal, "Promoted", st.message.clone()));
        } else {
            st.message = format!("step {} of {total}", st.step + 1);
        }
    };
    if st.step >= total {
        advance(&mut st, &mut notes);
        done(&mut st);
        return (st, notes);
    }
    if let Some(why) = &seen.not_ready {
        st.message = format!("waiting before step {}: {why}", st.step + 1);
        done(&mut st);
        return (st, notes);
    }
    let current = &rollout.steps[st.step as usize];
    if let Some(w) = current.set_weight {
        let w = w.min(100);
        if st.weight != w {
            st.weight = w;
            st.phase = "Progressing".into();
            st.message = format!("moving {w}% of the keys to {}", rollout.canary);
            notes.push((EventType::Normal, "SetWeight", st.message.clone()));
        } else if seen
            .settled_share
            .is_some_and(|s| (s - f64::from(w)).abs() < 0.01)
        {
            advance(&mut st, &mut notes);
        } else {
            st.message = format!("waiting for the keys to move to {w}%");
        }
    } else if let Some(pause) = &current.pause {
        match pause.seconds {
            Some(s) if elapsed_s >= f64::from(s) => advance(&mut st, &mut notes),
            Some(s) => {
                st.phase = "Paused".into();
                st.message = format!("paused, {:.0}s left", f64::from(s) - elapsed_s);
            }
            None if rollout.promote
                || seen.promote_mark
                    == Some(step_mark(&st.revision, st.retry, st.step).as_str()) =>
            {
                advance(&mut st, &mut notes)
            }
            None => {
                st.phase = "Paused".into();
                st.message = "paused until promoted (kubectl opmesh rollout promote, or \
                              spec.rollout.promote: true)"
                    .into();
            }
        }
    } else if let Some(spec) = &current.analysis {
        st.phase = "Analyzing".into();
        let (t, bake, lag) = thresholds(spec, &rollout.analysis);
        let (canary, stable) = (seen.stats)(started_ms, i64::from(lag) * 1000);
        let numbers = |s: &Stats| {
            format!(
                "{} reconciles, {} errors ({:.2}%), p99 {:.1} ms, {:.2} per generation, {} with \
                 refused writes, {} of {} keys lagging over {lag}s",
                s.reconciles,
                s.errors,
                s.error_rate() * 100.0,
                s.p99_ms,
                s.per_generation,
                s.refused_writes,
                s.lagging,
                s.keys
            )
        };
        let run = |verdict: &str, reasons: Vec<String>| AnalysisRun {
            step: st.step,
            verdict: verdict.into(),
            reasons,
            at: stamp(seen.now_ms),
            canary: numbers(&canary),
            stable: numbers(&stable),
        };
        match analyse(&canary, &stable, &t) {
            Verdict::Fail(why) => {
                st.analyses.push(run("Fail", why.clone()));
                st.phase = "RolledBack".into();
                st.weight = 0;
                st.message = format!(
                    "rolled back at step {}: {}; every key returns to {}",
                    st.step + 1,
                    why.join("; "),
                    rollout.stable
                );
                notes.push((EventType::Warning, "RolledBack", st.message.clone()));
            }
            Verdict::Pass if elapsed_s >= bake => {
                st.analyses.push(run("Pass", Vec::new()));
                notes.push((
                    EventType::Normal,
                    "AnalysisPassed",
                    format!("step {}: canary {}", st.step + 1, numbers(&canary)),
                ));
                advance(&mut st, &mut notes);
            }
            Verdict::Pass => {
                st.message = format!(
                    "analysing: so far the canary is no worse ({}); {:.0}s of the bake left",
                    numbers(&canary),
                    bake - elapsed_s
                );
            }
            Verdict::Wait(why) => st.message = format!("analysing: {why}"),
        }
    }
    done(&mut st);
    (st, notes)
}

/// A step's thresholds, bake time and generation lag limit (seconds), from
/// its own settings, then the rollout's, then the defaults.
fn thresholds(step: &AnalysisSpec, rollout: &AnalysisSpec) -> (Thresholds, f64, u32) {
    let d = Thresholds::default();
    let pick = |a: Option<f64>, b: Option<f64>, default: f64| a.or(b).unwrap_or(default);
    let t = Thresholds {
        min_samples: u64::from(
            step.min_samples
                .or(rollout.min_samples)
                .unwrap_or(d.min_samples as u32),
        ),
        error_ratio: pick(step.max_error_ratio, rollout.max_error_ratio, d.error_ratio),
        p99_ratio: pick(step.max_p99_ratio, rollout.max_p99_ratio, d.p99_ratio),
        max_per_generation: pick(
            step.max_reconciles_per_generation,
            rollout.max_reconciles_per_generation,
            d.max_per_generation,
        ),
        max_error_rate: step
            .max_error_percent
            .or(rollout.max_error_percent)
            .map(|p| p / 100.0),
        max_refused_write_rate: step
            .max_refused_write_percent
            .or(rollout.max_refused_write_percent)
            .map(|p| p / 100.0),
        ..d
    };
    let bake = f64::from(step.seconds.or(rollout.seconds).unwrap_or(60));
    let lag = step
        .max_generation_lag_seconds
        .or(rollout.max_generation_lag_seconds)
        .unwrap_or(60);
    (t, bake, lag)
}

/// Runs every mesh's rollout, once a second, until the task is stopped.
pub(crate) async fn run(
    client: Client,
    published: Arc<Published>,
    outcomes: Arc<Outcomes>,
    mesh_namespace: Option<String>,
    identity: String,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "opmesh-manager".into(),
            instance: (!identity.is_empty()).then_some(identity),
        },
    );
    let api: Api<OperatorMesh> = match &mesh_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let Ok(meshes) = api.list(&Default::default()).await else {
            continue;
        };
        let snapshot = published.load();
        for mesh in meshes.items {
            let Some(rollout) = mesh.spec.rollout.clone() else {
                continue;
            };
            let id = MeshId::new(mesh.namespace().unwrap_or_default(), mesh.name_any());
            let Some(view) = snapshot.meshes.get(&id) else {
                continue;
            };
            let before = mesh.status.as_ref().and_then(|s| s.rollout.as_ref());
            let (next, notes) = {
                let now_ms = Timestamp::now().as_millisecond();
                let stats = |since: i64, lag_ms: i64| {
                    let side = |subset: &str| {
                        let keys = keys_of(view, subset);
                        let lagging =
                            outcomes.lagging(&id, keys.iter().copied(), since, now_ms, lag_ms);
                        Stats::of(&outcomes.window(&id, subset, since))
                            .with_lag(keys.len() as u64, lagging)
                    };
                    (side(&rollout.canary), side(&rollout.stable))
                };
                let annotation = |name: &str| mesh.annotations().get(name).map(String::as_str);
                let seen = Observed {
                    promote_mark: annotation(PROMOTE_ANNOTATION),
                    abort_mark: annotation(ABORT_ANNOTATION),
                    now_ms,
                    not_ready: not_ready(view, &rollout),
                    settled_share: settled_share(view, &rollout),
                    stats: &stats,
                };
                step(&rollout, before, &seen)
            };
            if before != Some(&next) {
                let patch = serde_json::json!({
                    "apiVersion": "opmesh.io/v1alpha1",
                    "kind": "OperatorMesh",
                    "status": {"rollout": next},
                });
                let api: Api<OperatorMesh> = Api::namespaced(client.clone(), &id.namespace);
                if let Err(e) = api
                    .patch_status(
                        &id.name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    tracing::warn!(mesh = %id, error = %e, "cannot write the rollout's status");
                    continue;
                }
            }
            let reference = ObjectReference {
                api_version: Some("opmesh.io/v1alpha1".into()),
                kind: Some("OperatorMesh".into()),
                namespace: Some(id.namespace.clone()),
                name: Some(id.name.clone()),
                uid: mesh.metadata.uid.clone(),
                ..Default::default()
            };
            for (type_, reason, note) in notes {
                let event = Event {
                    type_,
                    reason: reason.into(),
                    note: Some(note.chars().take(1000).collect()),
                    action: "Rollout".into(),
                    secondary: None,
                };
                let _ = recorder.publish(&event, &reference).await;
            }
        }
    }
}

/// Why the rollout may not take a step: the mesh is not routing, or the
/// canary has no ready replica.
fn not_ready(view: &MeshView, rollout: &RolloutSpec) -> Option<String> {
    if let Some(why) = &view.invalid {
        return Some(format!("the mesh's latest spec is refused: {why}"));
    }
    if !view.has_policy {
        return Some("the mesh has no valid policy yet".into());
    }
    let ready = view
        .subsets
        .iter()
        .find(|s| s.name == rollout.canary)
        .map_or(0, |s| s.replicas.iter().filter(|r| r.ready).count());
    (ready == 0).then(|| format!("subset {} has no ready replica", rollout.canary))
}

/// The keys `subset`'s replicas hold and are not giving up.
fn keys_of<'a>(view: &'a MeshView, subset: &str) -> Vec<&'a str> {
    let Some(s) = view.subsets.iter().find(|s| s.name == subset) else {
        return Vec::new();
    };
    let sessions: std::collections::HashSet<_> =
        s.replicas.iter().map(|r| &r.holder.session).collect();
    view.keys
        .iter()
        .filter(|(_, k)| !k.moving && sessions.contains(&k.holder.session))
        .map(|(key, _)| key.as_str())
        .collect()
}

/// The canary's configured share once no key is moving.
fn settled_share(view: &MeshView, rollout: &RolloutSpec) -> Option<f64> {
    if view.moving() > 0 || view.unowned > 0 {
        return None;
    }
    view.subsets
        .iter()
        .find(|s| s.name == rollout.canary)
        .map(|s| s.configured_share)
}

#[cfg(test)]
mod tests;
