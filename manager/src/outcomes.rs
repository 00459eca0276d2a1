//! How reconciles ended, as runtimes report them (`ReconcileReports`):
//! the last few outcomes of each key, for the admin API's `explain`, and
//! the per-subset counters in [`crate::metrics`]. Written by the session
//! readers, read by the admin API; the coordinator never sees them, since
//! they change nothing about ownership.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use opmesh_proto::v1::ReconcileReport;

use crate::{
    analysis::Sample,
    id::{MeshId, PodId},
};

/// Outcomes kept per key.
const PER_KEY: usize = 5;
/// Samples kept per subset for analyses, and for how long.
const WINDOW_MAX: usize = 100_000;
const WINDOW_KEEP_MS: i64 = 15 * 60 * 1000;
/// Keys remembered per mesh; beyond it, the least recently reported half
/// is forgotten.
const MAX_KEYS: usize = 200_000;

/// One reconcile's outcome.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Outcome {
    /// When it finished, in Unix milliseconds.
    pub(crate) finished_unix_ms: i64,
    /// True if it succeeded.
    pub(crate) ok: bool,
    /// The error, if it failed.
    pub(crate) error: String,
    /// How long it ran, in microseconds.
    pub(crate) duration_us: u64,
    /// How long the key waited in the queue first, in microseconds.
    pub(crate) queue_wait_us: u64,
    /// The operator's version.
    pub(crate) operator_version: String,
    /// The primary object's generation it reconciled.
    pub(crate) generation: i64,
    /// The runtime's subset.
    pub(crate) subset: String,
    /// The runtime's pod.
    pub(crate) pod: String,
}

/// The last outcomes of every key, per mesh.
#[derive(Default)]
pub(crate) struct Outcomes {
    meshes: Mutex<HashMap<MeshId, HashMap<String, VecDeque<Outcome>>>>,
    /// Every reported reconcile of the last minutes, per mesh and subset,
    /// oldest first: what analyses compare.
    windows: Mutex<HashMap<(MeshId, String), VecDeque<Sample>>>,
}

// === impl Outcomes ===

impl Outcomes {
    /// Records `reports` from a runtime of `mesh`'s `subset` in `pod`.
    pub(crate) fn record(
        &self,
        mesh: &MeshId,
        subset: &str,
        pod: &PodId,
        reports: &[ReconcileReport],
    ) {
        {
            let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let window = windows
                .entry((mesh.clone(), subset.to_string()))
                .or_default();
            for r in reports {
                if window.len() == WINDOW_MAX {
                    window.pop_front();
                }
                window.push_back(Sample {
                    at_ms: r.finished_unix_ms,
                    ok: r.ok,
                    duration_us: r.duration_us,
                    key: std::sync::Arc::from(r.key.as_str()),
                    generation: r.generation,
                });
            }
            let newest = window.back().map_or(0, |s| s.at_ms);
            while window
                .front()
                .is_some_and(|s| s.at_ms < newest - WINDOW_KEEP_MS)
            {
                window.pop_front();
            }
        }
        let mut meshes = self.meshes.lock().unwrap_or_else(|e| e.into_inner());
        let keys = meshes.entry(mesh.clone()).or_default();
        for r in reports {
            let last = keys.entry(r.key.clone()).or_default();
            if last.len() == PER_KEY {
                last.pop_front();
            }
            last.push_back(Outcome {
                finished_unix_ms: r.finished_unix_ms,
                ok: r.ok,
                error: r.error.chars().take(1024).collect(),
                duration_us: r.duration_us,
                queue_wait_us: r.queue_wait_us,
                operator_version: r.operator_version.chars().take(128).collect(),
                generation: r.generation,
                subset: subset.to_string(),
                pod: pod.to_string(),
            });
        }
        if keys.len() > MAX_KEYS {
            let mut by_age: Vec<(i64, String)> = keys
                .iter()
                .map(|(k, v)| (v.back().map(|o| o.finished_unix_ms).unwrap_or(0), k.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, k) in by_age.into_iter().take(MAX_KEYS / 2) {
                keys.remove(&k);
            }
        }
    }

    /// The reconciles of `mesh`'s `subset` that finished at or after
    /// `since_ms` (Unix milliseconds), oldest first.
    pub(crate) fn window(&self, mesh: &MeshId, subset: &str, since_ms: i64) -> Vec<Sample> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows
            .get(&(mesh.clone(), subset.to_string()))
            .into_iter()
            .flatten()
            .filter(|s| s.at_ms >= since_ms)
            .cloned()
            .collect()
    }

    /// The last outcomes of every key of `object` (`namespace/name`, or
    /// `name`) in `mesh`, newest first.
    pub(crate) fn of_object(&self, mesh: &MeshId, object: &str) -> Vec<(String, Outcome)> {
        let meshes = self.meshes.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, Outcome)> = meshes
            .get(mesh)
            .into_iter()
            .flatten()
            .filter(|(k, _)| opmesh_proto::parse_key(k).0 == object)
            .flat_map(|(k, v)| v.iter().map(move |o| (k.clone(), o.clone())))
            .collect();
        out.sort_by_key(|(_, o)| std::cmp::Reverse(o.finished_unix_ms));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(key: &str, at: i64, ok: bool) -> ReconcileReport {
        ReconcileReport {
            key: key.into(),
            ok,
            error: if ok { String::new() } else { "boom".into() },
            duration_us: 1500,
            finished_unix_ms: at,
            operator_version: "v2".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_object_keeps_its_last_outcomes_newest_first() {
        let o = Outcomes::default();
        let mesh = MeshId::new("ops", "m");
        let pod = PodId::new("ops", "p");
        let reports: Vec<_> = (0..7)
            .map(|i| report("a/x@Widget.v1.example.com", i, i % 2 == 0))
            .chain([report("a/y@Widget.v1.example.com", 100, true)])
            .collect();
        o.record(&mesh, "v2", &pod, &reports);
        let x = o.of_object(&mesh, "a/x");
        assert_eq!(x.len(), PER_KEY);
        assert_eq!(
            x.iter()
                .map(|(_, o)| o.finished_unix_ms)
                .collect::<Vec<_>>(),
            [6, 5, 4, 3, 2]
        );
        assert_eq!(x[1].1.error, "boom");
        assert_eq!(x[0].1.subset, "v2");
        assert!(o.of_object(&mesh, "a/z").is_empty());
        assert!(o.of_object(&MeshId::new("ops", "other"), "a/x").is_empty());
    }
}
