//! An operator with two controllers (ConfigMapGenerators and
//! ConfigMapBundles, both owning ConfigMaps) behind one runtime per pod:
//! the policy splits each controller's keys the same way, owned objects
//! follow their own controller owner, and no key has two owners.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DeleteParams, DynamicObject},
};
use opmesh_tests::{
    eventually,
    history::{self, Deaths, now_us},
    mesh::{apply_mesh, bundle_resource, create_generator, example_controllers_with_bundles},
    world::{TIMEOUT, World},
};
use serde_json::json;

const NAMESPACES: usize = 8;

/// `subset/pod` that last reconciled the bundle `set` in `ns`, once it has
/// seen `generation`.
async fn bundle_handled_by(w: &World, ns: &str, generation: i64) -> anyhow::Result<Option<String>> {
    let api: Api<DynamicObject> = Api::namespaced_with(w.client.clone(), ns, &bundle_resource());
    let o = api.get("set").await?;
    let status = &o.data["status"];
    Ok((status["observedGeneration"] == generation)
        .then(|| status["handledBy"].as_str().map(str::to_string))
        .flatten())
}

#[tokio::test]
async fn two_controllers_run_behind_one_runtime_per_pod_and_split_alike() -> anyhow::Result<()> {
    let mut w = World::new("controllers").await?;
    let mut spec = w.mesh_spec(
        json!({
            "granularity": "Namespace",
            "split": "Exact",
            "weights": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}],
        }),
        &["v1", "v2"],
    );
    spec["controllers"] = example_controllers_with_bundles();
    apply_mesh(&w.client, &w.ns, "mesh", spec).await?;
    let both = [("OPMESH_EXAMPLE_BUNDLES", "true")];
    w.replica_with_env("v1-0", "v1", &both).await?;
    w.replica_with_env("v2-0", "v2", &both).await?;
    w.all_ready().await?;

    let mut namespaces = Vec::new();
    for i in 0..NAMESPACES {
        let ns = w.object_namespace(&format!("controllers-{i}"), &[]).await?;
        create_generator(&w.client, &ns, "app", json!({"data": {"n": "0"}})).await?;
        let bundles: Api<DynamicObject> =
            Api::namespaced_with(w.client.clone(), &ns, &bundle_resource());
        let mut bundle = DynamicObject::new("set", &bundle_resource()).within(&ns);
        bundle.data = json!({"spec": {"names": ["a", "b"]}});
        bundles.create(&Default::default(), &bundle).await?;
        namespaces.push(ns);
    }

    // Both controllers' keys are reconciled, and a namespace's generator
    // and bundle go to the same subset: the split is by namespace, whatever
    // the type. The exact split gives each subset half.
    let generators = w.wait_handled(&namespaces, NAMESPACES).await?;
    let mut bundles = Vec::new();
    for ns in &namespaces {
        let by = eventually(
            &format!("the bundle in {ns} to be handled"),
            TIMEOUT,
            || bundle_handled_by(&w, ns, 1),
        )
        .await?;
        let subset = by.split('/').next().unwrap_or_default().to_string();
        assert_eq!(
            generators[&format!("{ns}/app")],
            subset,
            "{ns}: the generator and the bundle went to different subsets"
        );
        bundles.push(subset);
    }
    assert_eq!(
        bundles.iter().filter(|s| *s == "v2").count(),
        NAMESPACES / 2,
        "{bundles:?}"
    );
    // Each bundle's ConfigMaps exist, made by its controller.
    for ns in &namespaces {
        let cms: Api<ConfigMap> = Api::namespaced(w.client.clone(), ns);
        for member in ["set-a", "set-b"] {
            eventually(&format!("{ns}/{member}"), TIMEOUT, || async {
                Ok(cms.get_opt(member).await?.map(|_| ()))
            })
            .await?;
        }
    }

    // An owned object's event goes to its own controller owner: a deleted
    // bundle ConfigMap is made again by the bundle's replica, and the
    // generator sharing its namespace is not reconciled for it.
    let started = now_us();
    for ns in &namespaces {
        Api::<ConfigMap>::namespaced(w.client.clone(), ns)
            .delete("set-a", &DeleteParams::default())
            .await?;
    }
    for (ns, subset) in namespaces.iter().zip(&bundles) {
        let cms: Api<ConfigMap> = Api::namespaced(w.client.clone(), ns);
        eventually(&format!("{ns}/set-a to be made again"), TIMEOUT, || async {
            Ok(cms.get_opt("set-a").await?.map(|_| ()))
        })
        .await?;
        let again: Vec<_> = w
            .records()
            .into_iter()
            .filter(|r| r.start_us >= started && r.key.starts_with(&format!("{ns}/")))
            .collect();
        assert!(
            again
                .iter()
                .any(|r| r.key == format!("{ns}/set") && &r.subset == subset),
            "{ns}: the bundle was not reconciled by {subset}: {again:?}"
        );
        assert!(
            again.iter().all(|r| r.key != format!("{ns}/app")),
            "{ns}: the generator was reconciled for its neighbour's ConfigMap"
        );
    }

    // A replica whose operator runs only one of the two controllers could
    // be routed keys it cannot reconcile: it is refused, saying why.
    w.replica("v1-partial", "v1").await?;
    let partial = w.replicas.last().expect("just started");
    eventually("the partial replica to be refused", TIMEOUT, || async {
        partial.check_running()?;
        let log = partial.sidecar.log_tail(200);
        Ok(log
            .lines()
            .any(|l| l.contains("refused") && l.contains("does not run the controller of"))
            .then_some(()))
    })
    .await?;
    assert!(!partial.ready());

    let paths: Vec<std::path::PathBuf> = w.replicas.iter().map(|r| r.records.clone()).collect();
    let paths: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
    let overlaps = history::overlaps(&history::read(&paths, &Deaths::default(), now_us()));
    assert!(overlaps.is_empty(), "{overlaps:#?}");
    Ok(())
}
