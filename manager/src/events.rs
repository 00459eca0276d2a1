//! Kubernetes Events on each `OperatorMesh`, from the published snapshots:
//! keys starting and finishing a move, a spec the manager refuses, and a
//! watch that fails or recovers. `kubectl describe operatormesh` and
//! `kubectl get events` show them.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

use crate::{
    id::MeshId,
    snapshot::{MeshView, Published},
};

/// What an Event is about, per mesh, as of the last snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    invalid: Option<String>,
    moving: bool,
    /// Moves started and finished (see `MeshView::moves`).
    moves: (u64, u64),
    /// The finished count the last `Moved` Event covered.
    reported: u64,
    weights: String,
    watch_errors: Vec<(String, String)>,
}

/// An Event to publish: type, reason, note.
type Note = (EventType, &'static str, String);

/// Publishes Events as meshes change, until the snapshots end.
pub(crate) async fn run(client: Client, published: Arc<Published>, identity: String) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "opmesh-manager".into(),
            instance: (!identity.is_empty()).then_some(identity),
        },
    );
    let mut snapshots = published.subscribe();
    let mut seen: HashMap<MeshId, Seen> = HashMap::new();
    while snapshots.changed().await.is_ok() {
        snapshots.borrow_and_update();
        let snap = published.load();
        for (id, view) in &snap.meshes {
            let mut now = Seen::of(view);
            let before = seen.get(id).cloned();
            let events = notes(before.as_ref(), &mut now);
            seen.insert(id.clone(), now);
            for (type_, reason, note) in events {
                let event = Event {
                    type_,
                    reason: reason.into(),
                    note: Some(note.chars().take(1000).collect()),
                    action: reason.into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference(id)).await {
                    tracing::warn!(mesh = %id, error = %e, "cannot record an Event; the manager needs create and patch on events.events.k8s.io");
                }
            }
        }
        seen.retain(|id, _| snap.meshes.contains_key(id));
    }
}

fn reference(id: &MeshId) -> ObjectReference {
    ObjectReference {
        api_version: Some("opmesh.io/v1alpha1".into()),
        kind: Some("OperatorMesh".into()),
        namespace: Some(id.namespace.clone()),
        name: Some(id.name.clone()),
        ..Default::default()
    }
}

// === impl Seen ===

impl Seen {
    fn of(view: &MeshView) -> Self {
        Self {
            invalid: view.invalid.clone(),
            moving: view.moving() > 0,
            moves: view.moves,
            reported: 0,
            weights: view.weights.clone(),
            watch_errors: view.watch_errors.clone(),
        }
    }
}

/// The Events that going from `before` (None: first seen) to `now` calls
/// for; records in `now` what they covered.
fn notes(before: Option<&Seen>, now: &mut Seen) -> Vec<Note> {
    let first = before.is_none();
    let empty = Seen {
        moves: now.moves,
        reported: now.moves.1,
        ..Seen::default()
    };
    let before = before.unwrap_or(&empty);
    now.reported = before.reported;
    let mut out = Vec::new();
    match (&before.invalid, &now.invalid) {
        (old, Some(why)) if old.as_ref() != Some(why) => out.push((
            EventType::Warning,
            "InvalidSpec",
            format!("the spec is refused and the last valid one stays in force: {why}"),
        )),
        (Some(_), None) => out.push((
            EventType::Normal,
            "SpecAccepted",
            "the spec is valid again and in force".into(),
        )),
        _ => {}
    }
    if !before.weights.is_empty() && before.weights != now.weights && !now.weights.is_empty() {
        out.push((
            EventType::Normal,
            "WeightsChanged",
            format!("weights {} -> {}", before.weights, now.weights),
        ));
    }
    // Moves are counted, not just sampled: a handoff of thousands of keys
    // can start and end between two snapshots.
    let started = now.moves.0.saturating_sub(before.moves.0);
    if started > 0 && !first {
        out.push((
            EventType::Normal,
            "Moving",
            format!(
                "moving {started} keys to their new owners ({})",
                now.weights
            ),
        ));
    }
    let finished = now.moves.1.saturating_sub(now.reported);
    if finished > 0 && !now.moving {
        out.push((
            EventType::Normal,
            "Moved",
            format!("{finished} keys moved; every key is with its owner"),
        ));
        now.reported = now.moves.1;
    }
    for (resource, error) in &now.watch_errors {
        if !before.watch_errors.iter().any(|(r, _)| r == resource) {
            out.push((
                EventType::Warning,
                "WatchFailed",
                format!("watching {resource} fails: {error}"),
            ));
        }
    }
    for (resource, _) in &before.watch_errors {
        if !now.watch_errors.iter().any(|(r, _)| r == resource) {
            out.push((
                EventType::Normal,
                "WatchRecovered",
                format!("watching {resource} works again"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(invalid: Option<&str>, moves: (u64, u64), weights: &str, errors: &[&str]) -> Seen {
        Seen {
            invalid: invalid.map(Into::into),
            moving: moves.0 > moves.1,
            moves,
            reported: 0,
            weights: weights.into(),
            watch_errors: errors
                .iter()
                .map(|r| (r.to_string(), "forbidden".to_string()))
                .collect(),
        }
    }

    fn reasons(notes: Vec<Note>) -> Vec<&'static str> {
        notes.into_iter().map(|(_, r, _)| r).collect()
    }

    #[test]
    fn events_mark_each_transition_once() {
        let step = |before: &Seen, mut now: Seen| {
            let r = reasons(notes(Some(before), &mut now));
            (r, now)
        };
        let mut calm = seen(None, (0, 0), "v1=100 v2=0", &[]);
        // First sight of a mesh says nothing.
        assert!(notes(None, &mut calm).is_empty());
        let (r, calm) = step(&calm, seen(None, (0, 0), "v1=100 v2=0", &[]));
        assert!(r.is_empty());
        // A move that starts and ends between two snapshots is still told.
        let (r, moved) = step(&calm, seen(None, (10, 10), "v1=50 v2=50", &[]));
        assert_eq!(r, ["WeightsChanged", "Moving", "Moved"]);
        // One that spans snapshots: Moving when it starts, Moved with the
        // whole count when it ends.
        let (r, moving) = step(&moved, seen(None, (14, 12), "v1=40 v2=60", &[]));
        assert_eq!(r, ["WeightsChanged", "Moving"]);
        let (r, settled) = step(&moving, seen(None, (14, 14), "v1=40 v2=60", &[]));
        assert_eq!(r, ["Moved"]);
        let bad = seen(
            Some("weights sum to 90"),
            (14, 14),
            "v1=40 v2=60",
            &["/v1/Secret"],
        );
        let (r, bad) = step(&settled, bad);
        assert_eq!(r, ["InvalidSpec", "WatchFailed"]);
        let (r, bad) = step(&bad, bad.clone());
        assert!(r.is_empty());
        let (r, _) = step(&bad, seen(None, (14, 14), "v1=40 v2=60", &[]));
        assert_eq!(r, ["SpecAccepted", "WatchRecovered"]);
    }
}
