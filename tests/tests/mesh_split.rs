//! The hash split: every object is reconciled by the subset an independent
//! FNV-1a weight-range oracle names, at both granularities.

use opmesh_tests::mesh::create_generator;
use opmesh_tests::{
    oracle::{fnv1a64, oracle},
    world::World,
};
use serde_json::json;

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

    let mut namespaces = Vec::new();
    for _ in 0..4 {
        namespaces.push(w.object_namespace("split-obj-data", &[]).await?);
    }
    for ns in &namespaces {
        for i in 0..60u8 {
            // FNV-1a mixes a key's last bytes only into its low bits, so names
            // that differ only in a numeric suffix share one weight range (see
            // docs/design-notes.md); vary the first byte of the name instead.
            create_generator(
                &w.client,
                ns,
                &format!("{}{}-gen", char::from(b'a' + i % 26), i / 26),
                json!({"data": {"i": i.to_string()}}),
            )
            .await?;
        }
    }
    let handled = w.wait_handled(&namespaces, 240).await?;
    let weights = [("v1", 70), ("v2", 30)];
    let mut per_subset = std::collections::BTreeMap::<String, usize>::new();
    for (key, subset) in &handled {
        assert_eq!(subset, oracle(fnv1a64(key), &weights), "{key}");
        *per_subset.entry(subset.clone()).or_default() += 1;
    }
    assert_eq!(handled.len(), 240);
    assert!(
        per_subset["v1"] > 0 && per_subset["v2"] > 0,
        "{per_subset:?}"
    );
    Ok(())
}

#[tokio::test]
async fn namespace_granularity_matches_the_oracle() -> anyhow::Result<()> {
    let mut w = World::new("split-ns").await?;
    w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}]}),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;

    let mut namespaces = Vec::new();
    for i in 0..40u8 {
        // FNV-1a barely mixes trailing bytes into its top bits, so names that
        // differ only in a numeric suffix share a range; vary the first byte.
        let prefix = format!("{}{}-split", char::from(b'a' + i % 26), i / 26);
        let ns = w.object_namespace(&prefix, &[]).await?;
        for i in 0..5 {
            create_generator(&w.client, &ns, &format!("gen-{i}"), json!({})).await?;
        }
        namespaces.push(ns);
    }
    let handled = w.wait_handled(&namespaces, 200).await?;
    let weights = [("v1", 50), ("v2", 50)];
    for (key, subset) in &handled {
        let ns = key.split('/').next().unwrap();
        assert_eq!(subset, oracle(fnv1a64(ns), &weights), "{key}");
    }
    let subsets: std::collections::BTreeSet<_> = handled.values().collect();
    assert_eq!(subsets.len(), 2, "both subsets handle some namespaces");
    Ok(())
}
