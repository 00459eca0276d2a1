//! Hands-off canaries of the example operator on the real apiserver: a
//! healthy v2 walks its steps and is promoted; a failing one is rolled back
//! at its first analysis, and every key returns to stable.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::{
    cluster, eventually,
    mesh::{apply_mesh, create_generator, generator_resource, mesh_resource},
    oracle::exact,
    world::{TIMEOUT, World},
};
use serde_json::{Value, json};

/// `count` namespaces of the test's mesh with one generator each.
async fn namespaces(w: &World, count: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..count {
        let ns = format!("{}-team-{i}", w.ns);
        cluster::create_named_namespace(&w.client, &ns, &[("opmesh.io/test", &w.tag)]).await?;
        create_generator(&w.client, &ns, "app", json!({})).await?;
        out.push(ns);
    }
    Ok(out)
}

/// Changes every generator every 300 ms, as a busy cluster would, so each
/// analysis has reconciles to look at. Stops when dropped.
struct Traffic(tokio::task::JoinHandle<()>);

impl Traffic {
    fn start(w: &World, spaces: &[String]) -> Self {
        let (client, spaces) = (w.client.clone(), spaces.to_vec());
        Self(tokio::spawn(async move {
            for n in 0u64.. {
                for ns in &spaces {
                    let api: Api<DynamicObject> =
                        Api::namespaced_with(client.clone(), ns, &generator_resource());
                    let _ = api
                        .patch(
                            "app",
                            &PatchParams::default(),
                            &Patch::Merge(json!({"spec": {"data": {"n": n.to_string()}}})),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn rollout_status(w: &World) -> anyhow::Result<Value> {
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &w.ns, &mesh_resource());
    Ok(meshes.get("mesh").await?.data["status"]["rollout"].clone())
}

/// A mesh with stable v1 holding every key of `count` namespaces, and a
/// canary v2 running with `canary_env`, both ready.
async fn stable_and_canary(
    prefix: &str,
    canary_env: &[(&str, &str)],
    count: usize,
) -> anyhow::Result<(World, Vec<String>)> {
    let mut w = World::new(prefix).await?;
    w.apply_mesh(all_on_stable(), &["v1", "v2"]).await?;
    w.replica("v1-0", "v1").await?;
    w.replica_with_env("v2-0", "v2", canary_env).await?;
    w.all_ready().await?;
    let spaces = namespaces(&w, count).await?;
    w.wait_handled(&spaces, count).await?;
    Ok((w, spaces))
}

fn all_on_stable() -> Value {
    json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 100}]})
}

/// Declares `rollout` on the test's mesh.
async fn declare(w: &World, rollout: Value) -> anyhow::Result<()> {
    let mut spec = w.mesh_spec(all_on_stable(), &["v1", "v2"]);
    spec["rollout"] = rollout;
    apply_mesh(&w.client, &w.ns, "mesh", spec).await?;
    Ok(())
}

/// Waits for the rollout to be rolled back (failing if it is promoted);
/// returns its status.
async fn rolled_back(w: &World) -> anyhow::Result<Value> {
    eventually("the rollout to be rolled back", TIMEOUT, || async {
        let st = rollout_status(w).await?;
        anyhow::ensure!(st["phase"] != "Promoted", "promoted: {st}");
        Ok((st["phase"] == "RolledBack").then_some(st))
    })
    .await
}

/// Waits until every object is reconciled by v1 again, then checks the
/// recorded history of each for overlaps and lost updates.
async fn all_back_on_stable(w: &World, spaces: &[String]) -> anyhow::Result<()> {
    eventually("every object reconciled by v1 again", TIMEOUT, || async {
        let mut all_v1 = true;
        for ns in spaces {
            let by = w.change_and_wait(ns, "app").await?;
            all_v1 &= by.starts_with("v1/");
        }
        Ok(all_v1.then_some(()))
    })
    .await?;
    for ns in spaces {
        w.settle_and_check(ns).await?;
    }
    Ok(())
}

/// The Unix milliseconds of a status timestamp.
fn millis(v: &Value) -> anyhow::Result<i64> {
    Ok(v.as_str()
        .unwrap_or_default()
        .parse::<k8s_openapi::jiff::Timestamp>()?
        .as_millisecond())
}

fn analysis(seconds: u32, min_samples: u32) -> Value {
    json!({"analysis": {"seconds": seconds, "minSamples": min_samples}})
}

#[tokio::test]
async fn a_healthy_canary_walks_five_25_50_100_and_is_promoted() -> anyhow::Result<()> {
    let mut w = World::new("rollout-ok").await?;
    w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 100}]}),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;
    // 40 namespaces: 5% of them is exactly 2.
    let spaces = namespaces(&w, 40).await?;
    w.wait_handled(&spaces, 40).await?;
    let _traffic = Traffic::start(&w, &spaces);

    let mut spec = w.mesh_spec(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 100}]}),
        &["v1", "v2"],
    );
    spec["rollout"] = json!({
        "stable": "v1", "canary": "v2", "revision": "v2-build-1",
        "steps": [
            {"setWeight": 5}, analysis(2, 3),
            {"setWeight": 25}, analysis(2, 3),
            {"setWeight": 50}, analysis(2, 3),
            {"setWeight": 100},
        ],
    });
    apply_mesh(&w.client, &w.ns, "mesh", spec).await?;

    // At 5%, the canary gets its 2 namespaces, and they are reconciled there.
    let at5 = exact(&spaces, &[("v1", 95), ("v2", 5)]);
    assert_eq!(at5.values().filter(|s| **s == "v2").count(), 2);
    eventually("the canary to reconcile its 5%", TIMEOUT, || async {
        let handled = w.wait_handled(&spaces, 40).await?;
        let v2: usize = handled.values().filter(|s| *s == "v2").count();
        Ok((v2 >= 2).then_some(()))
    })
    .await?;

    let status = eventually("the rollout to be promoted", TIMEOUT * 2, || async {
        let st = rollout_status(&w).await?;
        anyhow::ensure!(st["phase"] != "RolledBack", "rolled back: {st}");
        Ok((st["phase"] == "Promoted").then_some(st))
    })
    .await?;
    assert_eq!(status["weight"], 100);
    assert_eq!(status["canaryShare"], "100%");
    let runs = status["analyses"].as_array().context("analyses")?;
    assert_eq!(runs.len(), 3, "{status}");
    for run in runs {
        assert_eq!(run["verdict"], "Pass", "{run}");
        // Each analysis's numbers: the canary reconciled, without errors.
        let canary = run["canary"].as_str().unwrap_or_default();
        assert!(canary.contains(" 0 errors"), "{canary}");
        assert!(!canary.starts_with("0 reconciles"), "{canary}");
    }
    // Every key ends on the canary.
    eventually("every object reconciled by v2", TIMEOUT, || async {
        let handled = w.wait_handled(&spaces, 40).await?;
        Ok(handled.values().all(|s| s == "v2").then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_at_its_first_analysis() -> anyhow::Result<()> {
    let (w, spaces) =
        stable_and_canary("rollout-bad", &[("OPMESH_EXAMPLE_FAIL_RATE", "1")], 12).await?;
    let traffic = Traffic::start(&w, &spaces);
    let bake = 5;
    declare(
        &w,
        json!({
            "stable": "v1", "canary": "v2", "revision": "v2-build-2",
            "steps": [{"setWeight": 25}, analysis(bake, 3), {"setWeight": 100}],
        }),
    )
    .await?;
    let started = Instant::now();
    let status = rolled_back(&w).await?;
    eprintln!("rolled back {:?} after the spec", started.elapsed());
    assert_eq!(status["weight"], 0);
    let run = &status["analyses"][0];
    assert_eq!(run["verdict"], "Fail", "{status}");
    assert!(
        run["reasons"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("error rate 100.00%"),
        "{run}"
    );
    // Within the bake plus 2 s of the analysis step's start, by the
    // manager's own clock.
    let waited = millis(&run["at"])? - millis(&status["stepStartedAt"])?;
    assert!(
        waited <= i64::from(bake + 2) * 1000,
        "failed {waited} ms after its step began"
    );
    assert_eq!(status["step"], 1);

    // Every key returns to stable, and the recorded history has no overlap.
    drop(traffic);
    all_back_on_stable(&w, &spaces).await?;
    // The rollback is an Event on the mesh.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(w.client.clone(), &w.ns);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "RolledBack"), "{reasons:?}");
    Ok(())
}

#[tokio::test]
async fn a_hot_looping_canary_is_caught_by_its_reconciles_per_generation() -> anyhow::Result<()> {
    // A v2 whose reconciles all succeed, but which asks to run again at once.
    let (w, spaces) =
        stable_and_canary("rollout-hot", &[("OPMESH_EXAMPLE_HOT_LOOP", "true")], 8).await?;
    let traffic = Traffic::start(&w, &spaces);
    declare(
        &w,
        json!({
            "stable": "v1", "canary": "v2", "revision": "v2-build-3",
            "steps": [{"setWeight": 50}, analysis(5, 20), {"setWeight": 100}],
        }),
    )
    .await?;
    let status = rolled_back(&w).await?;
    drop(traffic);
    let run = &status["analyses"][0];
    let reasons: Vec<&str> = run["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(reasons.iter().any(|r| r.ends_with("a hot loop")), "{run}");
    // Its reconciles succeeded: only the loop gave it away.
    assert!(
        run["canary"]
            .as_str()
            .unwrap_or_default()
            .contains(" 0 errors"),
        "{run}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stalled_canary_is_caught_by_its_generation_lag_without_a_sample() -> anyhow::Result<()> {
    // A v2 whose reconciles never finish: it reports nothing, so only the
    // keys it leaves unreconciled can give it away.
    let (w, spaces) =
        stable_and_canary("rollout-stall", &[("OPMESH_EXAMPLE_STALL", "true")], 8).await?;
    let traffic = Traffic::start(&w, &spaces);
    let (bake, lag) = (60, 3);
    declare(
        &w,
        json!({
            "stable": "v1", "canary": "v2", "revision": "v2-build-4",
            "steps": [
                {"setWeight": 50},
                {"analysis": {"seconds": bake, "minSamples": 20, "maxGenerationLagSeconds": lag}},
                {"setWeight": 100},
            ],
        }),
    )
    .await?;
    let status = rolled_back(&w).await?;
    drop(traffic);
    let run = &status["analyses"][0];
    let reason = run["reasons"][0].as_str().unwrap_or_default();
    assert!(
        reason.contains("keys lag") && reason.contains("against stable's 0 of"),
        "{run}"
    );
    // It never had its minimum sample, and was failed long before its bake
    // ended.
    let canary = run["canary"].as_str().unwrap_or_default();
    assert!(canary.starts_with("0 reconciles"), "{canary}");
    let waited = millis(&run["at"])? - millis(&status["stepStartedAt"])?;
    assert!(
        waited < i64::from(bake) * 1000 / 2,
        "failed {waited} ms into a {bake} s bake"
    );
    // Every key returns to stable once the stuck reconciles are cancelled.
    all_back_on_stable(&w, &spaces).await
}
