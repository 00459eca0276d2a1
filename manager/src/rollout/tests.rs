//! The rollout's steps, as a pure function of spec, status and what the
//! mesh shows.

use std::sync::Arc;

use super::*;
use crate::{analysis::Sample, crd::PauseStep, crd::RolloutStep};

fn weight(w: u32) -> RolloutStep {
    RolloutStep {
        set_weight: Some(w),
        pause: None,
        analysis: None,
    }
}

fn pause(seconds: Option<u32>) -> RolloutStep {
    RolloutStep {
        set_weight: None,
        pause: Some(PauseStep { seconds }),
        analysis: None,
    }
}

fn analysis(seconds: u32) -> RolloutStep {
    RolloutStep {
        set_weight: None,
        pause: None,
        analysis: Some(AnalysisSpec {
            seconds: Some(seconds),
            min_samples: Some(10),
            ..Default::default()
        }),
    }
}

fn rollout(steps: Vec<RolloutStep>) -> RolloutSpec {
    RolloutSpec {
        stable: "v1".into(),
        canary: "v2".into(),
        revision: "r1".into(),
        steps,
        analysis: AnalysisSpec::default(),
        promote: false,
        abort: false,
        retry: 0,
    }
}

fn stats(n: usize, errors: usize) -> Stats {
    let samples: Vec<Sample> = (0..n)
        .map(|i| Sample {
            at_ms: 0,
            ok: i >= errors,
            duration_us: 1000,
            key: Arc::from(format!("ns/app-{i}").as_str()),
            generation: 1,
            refused_writes: 0,
        })
        .collect();
    Stats::of(&samples)
}

/// Steps `rollout` at `now_ms` with the mesh settled at `share` and the
/// canary failing `canary_errors` of 100 reconciles.
fn tick(
    r: &RolloutSpec,
    st: Option<&RolloutStatus>,
    now_ms: i64,
    share: f64,
    canary_errors: usize,
) -> (RolloutStatus, Vec<&'static str>) {
    let numbers = move |_since: i64, _lag: i64| (stats(100, canary_errors), stats(100, 0));
    let seen = Observed {
        promote_mark: None,
        abort_mark: None,
        now_ms,
        not_ready: None,
        settled_share: Some(share),
        stats: &numbers,
    };
    let (next, notes) = step(r, st, &seen);
    (
        next,
        notes.into_iter().map(|(_, reason, _)| reason).collect(),
    )
}

const T0: i64 = 1_800_000_000_000;

#[test]
fn a_healthy_canary_walks_every_step_and_is_promoted() {
    let r = rollout(vec![
        weight(5),
        analysis(2),
        weight(50),
        pause(Some(3)),
        weight(100),
    ]);
    let (st, notes) = tick(&r, None, T0, 0.0, 0);
    assert_eq!(
        (st.phase.as_str(), st.weight, st.step),
        ("Progressing", 5, 0)
    );
    assert_eq!(notes, ["RolloutStarted", "SetWeight"]);
    // Not before the keys have moved.
    let (st, _) = tick(&r, Some(&st), T0 + 100, 0.0, 0);
    assert_eq!(st.step, 0);
    let (st, _) = tick(&r, Some(&st), T0 + 200, 5.0, 0);
    assert_eq!(st.step, 1);
    // The analysis passes only once its bake is over.
    let (st, _) = tick(&r, Some(&st), T0 + 1200, 5.0, 0);
    assert_eq!((st.phase.as_str(), st.step), ("Analyzing", 1));
    assert!(st.message.contains("bake left"), "{}", st.message);
    let (st, notes) = tick(&r, Some(&st), T0 + 2300, 5.0, 0);
    assert_eq!((st.step, notes.as_slice()), (2, &["AnalysisPassed"][..]));
    assert_eq!(st.analyses.len(), 1);
    assert!(
        st.analyses[0]
            .canary
            .starts_with("100 reconciles, 0 errors")
    );
    let (st, _) = tick(&r, Some(&st), T0 + 2400, 5.0, 0);
    let (st, _) = tick(&r, Some(&st), T0 + 2500, 50.0, 0);
    assert_eq!((st.phase.as_str(), st.step), ("Progressing", 3));
    let (st, _) = tick(&r, Some(&st), T0 + 4000, 50.0, 0);
    assert_eq!(st.phase, "Paused");
    let (st, _) = tick(&r, Some(&st), T0 + 5600, 50.0, 0);
    let (st, _) = tick(&r, Some(&st), T0 + 5700, 50.0, 0);
    let (st, notes) = tick(&r, Some(&st), T0 + 5800, 100.0, 0);
    assert_eq!((st.phase.as_str(), st.weight), ("Promoted", 100));
    assert_eq!(notes, ["Promoted"]);
    assert_eq!(
        (st.step_text.as_str(), st.canary_share.as_str()),
        ("5/5", "100%")
    );
    // Promoted stays promoted.
    let (again, notes) = tick(&r, Some(&st), T0 + 9000, 100.0, 50);
    assert_eq!((again, notes.len()), (st, 0));
}

#[test]
fn a_failing_canary_is_rolled_back_at_its_first_analysis_and_stays_so() {
    let r = rollout(vec![weight(25), analysis(30), weight(100)]);
    let (st, _) = tick(&r, None, T0, 0.0, 0);
    let (st, _) = tick(&r, Some(&st), T0 + 100, 25.0, 0);
    // Failing as soon as the numbers say so, before the bake is over.
    let (st, notes) = tick(&r, Some(&st), T0 + 1000, 25.0, 40);
    assert_eq!((st.phase.as_str(), st.weight), ("RolledBack", 0));
    assert_eq!(notes, ["RolledBack"]);
    assert!(st.message.contains("error rate 40.00%"), "{}", st.message);
    assert_eq!(st.analyses[0].verdict, "Fail");
    let (again, _) = tick(&r, Some(&st), T0 + 60_000, 25.0, 0);
    assert_eq!(again.phase, "RolledBack");
    // A retry, or a new revision, starts it over.
    let retried = RolloutSpec {
        retry: 1,
        ..r.clone()
    };
    let (st, notes) = tick(&retried, Some(&again), T0 + 61_000, 0.0, 0);
    assert_eq!(
        (st.phase.as_str(), st.step, st.weight),
        ("Progressing", 0, 25)
    );
    assert_eq!(notes, ["RolloutStarted", "SetWeight"]);
}

#[test]
fn too_few_reconciles_wait_and_a_pause_waits_for_promotion() {
    let mut r = rollout(vec![weight(5), analysis(1), pause(None), weight(100)]);
    let (st, _) = tick(&r, None, T0, 0.0, 0);
    let (st, _) = tick(&r, Some(&st), T0 + 100, 5.0, 0);
    let few = |_since: i64, _lag: i64| (stats(3, 0), stats(100, 0));
    let seen = Observed {
        promote_mark: None,
        abort_mark: None,
        now_ms: T0 + 10_000,
        not_ready: None,
        settled_share: Some(5.0),
        stats: &few,
    };
    let (st, _) = step(&r, Some(&st), &seen);
    assert_eq!((st.phase.as_str(), st.step), ("Analyzing", 1));
    assert!(st.message.contains("the canary has 3"), "{}", st.message);
    let (st, _) = tick(&r, Some(&st), T0 + 11_000, 5.0, 0);
    let (st, _) = tick(&r, Some(&st), T0 + 12_000, 5.0, 0);
    assert_eq!((st.phase.as_str(), st.step), ("Paused", 2));
    assert!(st.message.contains("until promoted"));
    // The API's promote names the pause it promotes: another step's, or
    // an earlier run's, does nothing.
    let marked = |mark: &str, st: &RolloutStatus| {
        let zero = |_since: i64, _lag: i64| (stats(100, 0), stats(100, 0));
        let seen = Observed {
            promote_mark: Some(mark),
            abort_mark: None,
            now_ms: T0 + 13_000,
            not_ready: None,
            settled_share: Some(5.0),
            stats: &zero,
        };
        step(&r, Some(st), &seen).0
    };
    assert_eq!(marked("r1/0/1", &st).step, 2);
    assert_eq!(marked("r0/0/2", &st).step, 2);
    assert_eq!(marked("r1/0/2", &st).step, 3);
    r.promote = true;
    let (st, _) = tick(&r, Some(&st), T0 + 13_000, 5.0, 0);
    assert_eq!(st.step, 3);
}

#[test]
fn the_apis_abort_ends_only_the_run_it_names() {
    let mut r = rollout(vec![weight(5), pause(None), weight(100)]);
    let (st, _) = tick(&r, None, T0, 0.0, 0);
    let zero = |_since: i64, _lag: i64| (Stats::default(), Stats::default());
    let with_abort = |r: &RolloutSpec, mark: &str, st: Option<&RolloutStatus>| {
        let seen = Observed {
            promote_mark: None,
            abort_mark: Some(mark),
            now_ms: T0 + 100,
            not_ready: None,
            settled_share: Some(5.0),
            stats: &zero,
        };
        step(r, st, &seen).0
    };
    assert_eq!(with_abort(&r, "r0/0", Some(&st)).phase, "Progressing");
    let aborted = with_abort(&r, "r1/0", Some(&st));
    assert_eq!((aborted.phase.as_str(), aborted.weight), ("RolledBack", 0));
    assert!(aborted.message.contains("kubectl opmesh rollout abort"));
    // A retry starts a new run, which the old mark does not stop; nor does
    // it stop a new revision.
    r.retry = 1;
    let again = with_abort(&r, "r1/0", Some(&aborted));
    assert_eq!((again.phase.as_str(), again.retry), ("Progressing", 1));
    r.revision = "r2".into();
    r.retry = 0;
    assert_eq!(with_abort(&r, "r1/0", Some(&aborted)).phase, "Progressing");
}

#[test]
fn a_mesh_that_is_not_ready_takes_no_step_and_an_abort_returns_every_key() {
    let mut r = rollout(vec![weight(5), weight(100)]);
    let (st, _) = tick(&r, None, T0, 0.0, 0);
    let zero = |_since: i64, _lag: i64| (Stats::default(), Stats::default());
    let seen = Observed {
        promote_mark: None,
        abort_mark: None,
        now_ms: T0 + 100,
        not_ready: Some("subset v2 has no ready replica".into()),
        settled_share: Some(5.0),
        stats: &zero,
    };
    let (st, _) = step(&r, Some(&st), &seen);
    assert_eq!(st.step, 0);
    assert!(st.message.contains("no ready replica"), "{}", st.message);
    r.abort = true;
    let (st, notes) = tick(&r, Some(&st), T0 + 200, 5.0, 0);
    assert_eq!((st.phase.as_str(), st.weight), ("RolledBack", 0));
    assert_eq!(notes, ["RolledBack"]);
}

#[test]
fn the_rollouts_weight_replaces_the_specs_while_it_runs() {
    let mut mesh = OperatorMesh::new(
        "m",
        serde_json::from_value(serde_json::json!({
            "selector": {},
            "controllers": [{"primary": {"apiVersion": "v1", "kind": "ConfigMap"}}],
            "subsets": [{"name": "v1", "labels": {"v": "1"}}, {"name": "v2", "labels": {"v": "2"}}],
            "routing": {"weights": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}]}
        }))
        .unwrap(),
    );
    let weights = |m: &OperatorMesh| {
        effective_spec(m)
            .routing
            .weights
            .iter()
            .map(|w| (w.subset.clone(), w.weight))
            .collect::<Vec<_>>()
    };
    assert_eq!(weights(&mesh), [("v1".into(), 50), ("v2".into(), 50)]);
    mesh.spec.rollout = Some(rollout(vec![weight(5)]));
    // Declared but not started: all on stable.
    assert_eq!(weights(&mesh), [("v1".into(), 100), ("v2".into(), 0)]);
    mesh.status = Some(crate::crd::OperatorMeshStatus {
        rollout: Some(RolloutStatus {
            revision: "r1".into(),
            weight: 25,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(weights(&mesh), [("v1".into(), 75), ("v2".into(), 25)]);
    // A status of another revision does not count.
    mesh.spec.rollout.as_mut().unwrap().revision = "r2".into();
    assert_eq!(weights(&mesh), [("v1".into(), 100), ("v2".into(), 0)]);
}
