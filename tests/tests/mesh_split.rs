//! The weight split, with names as users write them: every object is
//! reconciled by the subset an independent oracle of the published routing
//! functions names, and the mesh's status reports the share each subset got.

use std::collections::BTreeMap;

use opmesh_tests::{
    cluster,
    mesh::create_generator,
    oracle::{exact, oracle, weight_hash},
    world::World,
};
use serde_json::json;

/// `part` of `whole` as the status writes it: one decimal, no trailing zero.
fn percent(part: usize, whole: usize) -> String {
    let s = format!("{:.1}", part as f64 * 100.0 / whole as f64);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

fn count<'a>(handled: impl IntoIterator<Item = &'a String>) -> BTreeMap<&'a str, usize> {
    let mut per_subset = BTreeMap::new();
    for subset in handled {
        *per_subset.entry(subset.as_str()).or_default() += 1;
    }
    per_subset
}

#[tokio::test]
async fn object_granularity_matches_the_oracle() -> anyhow::Result<()> {
    let mut w = World::new("split-obj").await?;
    w.apply_mesh(
        json!({"granularity": "Object", "weights": [{"subset": "v1", "weight": 70}, {"subset": "v2", "weight": 30}]}),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;

    // Plain sequential names, as users write them.
    let mut namespaces = Vec::new();
    for _ in 0..4 {
        namespaces.push(w.object_namespace("split-obj-data", &[]).await?);
    }
    for ns in &namespaces {
        for i in 0..60 {
            create_generator(&w.client, ns, &format!("app-{i}"), json!({})).await?;
        }
    }
    let handled = w.wait_handled(&namespaces, 240).await?;
    let weights = [("v1", 70), ("v2", 30)];
    for (key, subset) in &handled {
        assert_eq!(subset, oracle(weight_hash(key), &weights), "{key}");
    }
    let per_subset = count(handled.values());
    // 240 keys at 30%: 72 expected, a standard deviation of 7.
    let v2 = per_subset.get("v2").copied().unwrap_or(0);
    assert!(
        (44..=100).contains(&v2),
        "v2 got {v2} of 240: {per_subset:?}"
    );

    // The status shows what each subset got.
    let shares = w.observed_shares(240).await?;
    for (subset, n) in &per_subset {
        assert_eq!(shares[*subset], (*n as u64, percent(*n, 240)), "{subset}");
    }
    Ok(())
}

#[tokio::test]
async fn namespace_granularity_gives_the_canary_its_exact_share() -> anyhow::Result<()> {
    let mut w = World::new("split-ns").await?;
    // Namespace granularity apportions the namespaces exactly by default.
    w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 95}, {"subset": "v2", "weight": 5}]}),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;

    // 40 namespaces named as a fleet is: team-0 … team-39.
    let mut namespaces = Vec::new();
    for i in 0..40 {
        let ns = format!("{}-team-{i}", w.ns);
        cluster::create_named_namespace(&w.client, &ns, &[("opmesh.io/test", &w.tag)]).await?;
        for j in 0..3 {
            create_generator(&w.client, &ns, &format!("app-{j}"), json!({})).await?;
        }
        namespaces.push(ns);
    }
    let weights = [("v1", 95), ("v2", 5)];
    let want = exact(&namespaces, &weights);
    // As namespaces appear the split's boundaries shift, and a namespace
    // near one moves with its keys; wait until every move has landed (its
    // new owner's reconcile rewrites handledBy).
    let handled = opmesh_tests::eventually(
        "every object reconciled where the final split sends it",
        opmesh_tests::world::TIMEOUT,
        || async {
            let handled = w.wait_handled(&namespaces, 120).await?;
            let settled = handled.iter().all(|(key, subset)| {
                let ns = key.split('/').next().unwrap_or_default();
                *subset == want[ns]
            });
            Ok(settled.then_some(handled))
        },
    )
    .await?;
    for (key, subset) in &handled {
        let ns = key.split('/').next().unwrap_or_default();
        assert_eq!(subset, want[ns], "{key}");
    }
    // 5% of 40 namespaces is exactly 2 of them: 6 of the 120 keys.
    let canary: std::collections::BTreeSet<&str> = handled
        .iter()
        .filter(|(_, s)| *s == "v2")
        .filter_map(|(k, _)| k.split('/').next())
        .collect();
    assert_eq!(canary.len(), 2, "{canary:?}");
    let shares = w.observed_shares(120).await?;
    assert_eq!(shares["v2"], (6, "5%".to_string()));
    assert_eq!(shares["v1"], (114, "95%".to_string()));

    // A 41st namespace moves at most the one namespace at the boundary.
    let ns = format!("{}-team-40", w.ns);
    cluster::create_named_namespace(&w.client, &ns, &[("opmesh.io/test", &w.tag)]).await?;
    create_generator(&w.client, &ns, "app-0", json!({})).await?;
    namespaces.push(ns);
    let want_after = exact(&namespaces, &weights);
    let moved = want.iter().filter(|(ns, s)| want_after[*ns] != **s).count();
    assert!(moved <= 1, "{moved} namespaces moved");
    let shares = w.observed_shares(121).await?;
    let v2_keys: u64 = want_after
        .iter()
        .filter(|(_, s)| **s == "v2")
        .map(|(ns, _)| if ns.ends_with("-team-40") { 1 } else { 3 })
        .sum();
    assert_eq!(shares["v2"].0, v2_keys);
    let handled = w.wait_handled(&namespaces, 121).await?;
    for (key, subset) in &handled {
        let ns = key.split('/').next().unwrap_or_default();
        // The moved namespace may still be on its way.
        if want.get(ns).is_none_or(|s| *s == want_after[ns]) {
            assert_eq!(subset, want_after[ns], "{key}");
        }
    }
    Ok(())
}
