//! Pins, replicas and owned objects, end to end.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use opmesh_tests::world::{TIMEOUT, World};
use opmesh_tests::{
    eventually,
    mesh::{Replica, ReplicaOptions, apply_mesh, create_generator},
};
use serde_json::json;

#[tokio::test]
async fn pinned_namespaces_go_to_the_pinned_subset_and_relabels_reroute() -> anyhow::Result<()> {
    let mut w = World::new("pins").await?;
    let listed = w.object_namespace("pins-listed", &[]).await?;
    let labelled = w
        .object_namespace("pins-labelled", &[("tier", "canary")])
        .await?;
    let matched = w.object_namespace("teamx-pins", &[]).await?;
    let unpinned = w.object_namespace("pins-other", &[]).await?;
    w.apply_mesh(
        json!({
            "weights": [{"subset": "v1", "weight": 100}, {"subset": "v2", "weight": 0}],
            "pins": [
                {"subset": "v2", "namespaces": [listed]},
                {"subset": "v2", "namespaceSelector": {"matchLabels": {"tier": "canary"}}},
                {"subset": "v2", "namespaceRegex": "teamx-.*"},
            ],
        }),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;

    let namespaces = vec![
        listed.clone(),
        labelled.clone(),
        matched.clone(),
        unpinned.clone(),
    ];
    for ns in &namespaces {
        for i in 0..5 {
            create_generator(&w.client, ns, &format!("gen-{i}"), json!({})).await?;
        }
    }
    let handled = w.wait_handled(&namespaces, 20).await?;
    for (key, subset) in &handled {
        let ns = key.split('/').next().unwrap();
        let want = if *ns == unpinned { "v1" } else { "v2" };
        assert_eq!(subset, want, "{key}");
    }
    // Only the pinned subset reconciled pinned keys.
    for r in w.records() {
        if !r.key.starts_with(&format!("{unpinned}/")) {
            assert_eq!(r.subset, "v2", "{r:?}");
        }
    }

    // Dropping the label moves the namespace back to the weights (all v1).
    let nss: Api<Namespace> = Api::all(w.client.clone());
    nss.patch(
        &labelled,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": null}}})),
    )
    .await?;
    let labelled_only = vec![labelled.clone()];
    eventually(
        "the relabelled namespace to move to v1",
        TIMEOUT,
        || async {
            let handled = w.wait_handled(&labelled_only, 5).await?;
            Ok(handled.values().all(|s| s == "v1").then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn two_replicas_of_a_subset_split_keys_without_overlap() -> anyhow::Result<()> {
    let mut w = World::new("replicas").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-a", "v1").await?;
    w.replica("v1-b", "v1").await?;
    w.all_ready().await?;

    let ns = w.object_namespace("replicas-data", &[]).await?;
    for i in 0..100 {
        create_generator(&w.client, &ns, &format!("gen-{i}"), json!({})).await?;
    }
    let namespaces = vec![ns];
    w.wait_handled(&namespaces, 100).await?;

    let mut by_key: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for r in w.records() {
        by_key
            .entry(r.key.clone())
            .or_default()
            .insert(r.runtime.clone());
    }
    assert_eq!(by_key.len(), 100);
    let both: Vec<_> = by_key.iter().filter(|(_, rs)| rs.len() > 1).collect();
    assert!(
        both.is_empty(),
        "keys reconciled by both replicas: {both:?}"
    );
    let per_runtime = by_key
        .values()
        .fold(BTreeMap::<String, usize>::new(), |mut m, rs| {
            *m.entry(rs.iter().next().unwrap().clone()).or_default() += 1;
            m
        });
    assert_eq!(
        per_runtime.len(),
        2,
        "both replicas have a share: {per_runtime:?}"
    );
    Ok(())
}

#[tokio::test]
async fn editing_an_owned_configmap_reconciles_its_owner_in_its_subset() -> anyhow::Result<()> {
    let mut w = World::new("owned").await?;
    let canary = w.object_namespace("owned-canary", &[]).await?;
    let stable = w.object_namespace("owned-stable", &[]).await?;
    w.apply_mesh(
        json!({
            "weights": [{"subset": "v1", "weight": 100}, {"subset": "v2", "weight": 0}],
            "pins": [{"subset": "v2", "namespaces": [canary]}],
        }),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;
    for ns in [&canary, &stable] {
        create_generator(&w.client, ns, "gen", json!({"data": {"color": "blue"}})).await?;
    }
    w.wait_handled(&[canary.clone(), stable.clone()], 2).await?;

    for (ns, subset) in [(&canary, "v2"), (&stable, "v1")] {
        let key = format!("{ns}/gen");
        let before = w.records().iter().filter(|r| r.key == key).count();
        let cms: Api<ConfigMap> = Api::namespaced(w.client.clone(), ns);
        cms.patch(
            "gen-generated",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"color": "red"}})),
        )
        .await?;
        // The owner is reconciled again, by its own subset, which restores the data.
        eventually(
            "the owner to be reconciled after the edit",
            TIMEOUT,
            || async {
                let cm = cms.get("gen-generated").await?;
                let restored =
                    cm.data.unwrap_or_default().get("color").map(String::as_str) == Some("blue");
                let after: Vec<_> = w.records().into_iter().filter(|r| r.key == key).collect();
                Ok((restored && after.len() > before).then_some(after))
            },
        )
        .await?
        .iter()
        .for_each(|r| assert_eq!(r.subset, subset, "{r:?}"));
    }
    // Each operator read its ConfigMaps from its own copy of the sidecar's
    // cache, fed by the sidecar: the edited one it restored too, so the
    // copy was current for the reconcile that followed the edit.
    for r in &w.replicas {
        let text = r.metrics().unwrap_or_default();
        let metric = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        assert_eq!(metric("opmesh_runtime_cache_copies"), Some(1.0), "{text}");
        assert_eq!(
            metric("opmesh_runtime_cache_calls_total"),
            Some(0.0),
            "{text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_mesh_created_later_gets_the_objects_another_mesh_already_watches() -> anyhow::Result<()>
{
    let mut w = World::new("late-mesh").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("late-mesh-data", &[]).await?;
    for i in 0..10 {
        create_generator(&w.client, &ns, &format!("gen-{i}"), json!({})).await?;
    }
    w.wait_handled(std::slice::from_ref(&ns), 10).await?;

    // A second operator's mesh over the same resource, created once the
    // manager's watch of it is long synced.
    let mut spec = w.mesh_spec(json!({"weights": [{"subset": "b", "weight": 100}]}), &["b"]);
    spec["selector"] = json!({"matchLabels": {"app": "cmg-b"}});
    apply_mesh(&w.client, &w.ns, "mesh-b", spec).await?;
    let b = Replica::start(
        &w.client,
        &ReplicaOptions {
            mesh: &format!("{}/mesh-b", w.ns),
            pod: "b-0",
            labels: &[("app", "cmg-b"), ("version", "b")],
            ..w.replica_options("b")
        },
    )
    .await?;
    let want: BTreeSet<String> = (0..10).map(|i| format!("{ns}/gen-{i}")).collect();
    eventually(
        "the second mesh's replica to reconcile every existing object",
        TIMEOUT,
        || async {
            b.check_running()?;
            let seen: BTreeSet<String> = b
                .records()
                .into_iter()
                .filter(|r| r.outcome == "ok")
                .map(|r| r.key)
                .collect();
            Ok((seen == want).then_some(()))
        },
    )
    .await?;
    Ok(())
}
