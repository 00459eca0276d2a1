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
    /// Each primary object's generations, per mesh and key: what the
    /// generation-lag analysis compares.
    generations: Mutex<HashMap<MeshId, HashMap<String, Progress>>>,
}

/// One primary object's latest generation and the newest one reconciled
/// successfully.
#[derive(Clone, Debug, Default, PartialEq)]
struct Progress {
    /// The latest generation seen.
    latest: i64,
    /// The newest generation a reconcile succeeded for.
    reconciled: i64,
    /// Generations newer than `reconciled`, oldest first, with when this
    /// manager saw each appear (Unix milliseconds). A generation found on
    /// the first list is not here: it cannot be dated.
    waiting: VecDeque<(i64, i64)>,
}

/// Unreconciled generations dated per key; the oldest are what count.
const WAITING_MAX: usize = 16;

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
                    refused_writes: r.fenced_writes.saturating_add(r.conflicting_writes),
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
        {
            let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(keys) = generations.get_mut(mesh) {
                for r in reports.iter().filter(|r| r.ok) {
                    if let Some(p) = keys.get_mut(&r.key) {
                        p.reconciled = p.reconciled.max(r.generation);
                        while p.waiting.front().is_some_and(|(g, _)| *g <= p.reconciled) {
                            p.waiting.pop_front();
                        }
                        // Generations past the dated ones wait from now.
                        if p.waiting.is_empty() && p.latest > p.reconciled {
                            p.waiting.push_back((p.latest, r.finished_unix_ms));
                        }
                    }
                }
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

    /// Notes that `mesh`'s primary object of `key` is at `generation` (none
    /// for a deleted object) at `now_ms`. `live` is false while the first
    /// list is read: a generation found there is taken as reconciled, since
    /// this manager cannot know whether it was.
    pub(crate) fn observe_generation(
        &self,
        mesh: &MeshId,
        key: &str,
        generation: Option<i64>,
        live: bool,
        now_ms: i64,
    ) {
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = generation.filter(|g| *g > 0) else {
            if let Some(keys) = generations.get_mut(mesh) {
                keys.remove(key);
            }
            return;
        };
        let keys = generations.entry(mesh.clone()).or_default();
        let full = keys.len() >= MAX_KEYS;
        match keys.get_mut(key) {
            Some(p) if g > p.latest => {
                p.latest = g;
                if live && p.waiting.len() < WAITING_MAX {
                    p.waiting.push_back((g, now_ms));
                }
            }
            Some(_) => {}
            None if !full => {
                keys.insert(
                    key.to_string(),
                    Progress {
                        latest: g,
                        reconciled: if live { 0 } else { g },
                        waiting: live.then_some((g, now_ms)).into_iter().collect(),
                    },
                );
            }
            None => {}
        }
    }

    /// Forgets `mesh`'s generations (the mesh is gone).
    pub(crate) fn forget_mesh(&self, mesh: &MeshId) {
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.remove(mesh);
    }

    /// How many of `keys` (of `mesh`) lag: a generation newer than the
    /// last one reconciled successfully appeared `lag_ms` ago or more,
    /// counting from `since_ms` at the earliest (when the analysis began).
    /// An object that keeps changing lags by its oldest unreconciled
    /// change. Keys without a generation never lag.
    pub(crate) fn lagging<'a>(
        &self,
        mesh: &MeshId,
        keys: impl IntoIterator<Item = &'a str>,
        since_ms: i64,
        now_ms: i64,
        lag_ms: i64,
    ) -> u64 {
        let generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let Some(progress) = generations.get(mesh) else {
            return 0;
        };
        keys.into_iter()
            .filter_map(|k| progress.get(k))
            .filter(|p| {
                p.latest > p.reconciled
                    && p.waiting
                        .front()
                        .is_some_and(|&(_, t)| now_ms - t.max(since_ms) >= lag_ms)
            })
            .count() as u64
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
    fn a_generation_lags_until_a_reconcile_of_it_succeeds() {
        let o = Outcomes::default();
        let mesh = MeshId::new("ops", "m");
        let pod = PodId::new("ops", "p");
        let (a, b, c) = ("a/x@W.v1.e", "a/y@W.v1.e", "a/z@W.v1.e");
        // Found on the first list: taken as reconciled.
        o.observe_generation(&mesh, a, Some(3), false, 0);
        // Created, and changed, while watching.
        o.observe_generation(&mesh, b, Some(1), true, 1_000);
        o.observe_generation(&mesh, c, Some(1), true, 2_000);
        o.observe_generation(&mesh, c, Some(2), true, 3_000);
        let lagging = |now| o.lagging(&mesh, [a, b, c], 0, now, 5_500);
        assert_eq!(lagging(6_999), 1, "b has waited 6 s, c only 5 s");
        assert_eq!(lagging(7_500), 2);
        // A failed reconcile does not count; a success of an older
        // generation does not either.
        let mut done = report(c, 7_000, false);
        done.generation = 2;
        o.record(&mesh, "v2", &pod, &[done.clone()]);
        done.generation = 1;
        done.ok = true;
        o.record(&mesh, "v2", &pod, &[done.clone()]);
        assert_eq!(lagging(7_500), 1, "c now waits for 2, from 3 s");
        assert_eq!(lagging(8_500), 2);
        done.generation = 2;
        o.record(&mesh, "v2", &pod, &[done]);
        assert_eq!(lagging(8_500), 1);
        // Counted from the analysis's start at the earliest.
        assert_eq!(o.lagging(&mesh, [b], 6_000, 7_500, 5_500), 0);
        // An object that keeps changing lags by its oldest unreconciled
        // change, not its newest.
        for (i, at) in (3..10).zip((7_000..).step_by(1_000)) {
            o.observe_generation(&mesh, c, Some(i), true, at);
        }
        assert_eq!(o.lagging(&mesh, [c], 0, 13_000, 5_500), 1);
        let mut done = report(c, 13_000, true);
        done.generation = 5;
        o.record(&mesh, "v2", &pod, &[done]);
        assert_eq!(
            o.lagging(&mesh, [c], 0, 13_000, 5_500),
            0,
            "6 appeared at 10 s"
        );
        assert_eq!(o.lagging(&mesh, [c], 0, 15_500, 5_500), 1);
        // A deleted object no longer lags.
        o.observe_generation(&mesh, b, None, true, 8_000);
        assert_eq!(o.lagging(&mesh, [b], 0, 60_000, 1), 0);
        assert_eq!(o.lagging(&MeshId::new("ops", "n"), [a], 0, 60_000, 1), 0);
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
