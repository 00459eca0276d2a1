//! Live re-sharding: a weight change moves keys to their new owner without
//! restarts and without two owners at once; `paused` freezes ownership.

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::world::{TIMEOUT, World};
use opmesh_tests::{
    eventually, history,
    mesh::{create_generator, generator_resource, mesh_resource},
};
use serde_json::json;

#[tokio::test]
async fn paused_freezes_ownership_and_unpausing_moves_keys_live() -> anyhow::Result<()> {
    let mut w = World::new("handoff").await?;
    let all_v1 =
        json!({"weights": [{"subset": "v1", "weight": 100}, {"subset": "v2", "weight": 0}]});
    w.apply_mesh(all_v1, &["v1", "v2"]).await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("handoff-data", &[]).await?;
    for i in 0..30 {
        create_generator(
            &w.client,
            &ns,
            &format!("gen-{i}"),
            json!({"data": {"v": "1"}}),
        )
        .await?;
    }
    let namespaces = vec![ns.clone()];
    assert!(
        w.wait_handled(&namespaces, 30)
            .await?
            .values()
            .all(|s| s == "v1")
    );

    // Paused, with every key now routed to v2: nothing moves, but updates
    // still reach the current owner.
    let mut spec = w.mesh_spec(
        json!({"weights": [{"subset": "v1", "weight": 0}, {"subset": "v2", "weight": 100}]}),
        &["v1", "v2"],
    );
    spec["paused"] = json!(true);
    opmesh_tests::mesh::apply_mesh(&w.client, &w.ns, "mesh", spec.clone()).await?;
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &w.ns, &mesh_resource());
    eventually("the paused spec to be observed", TIMEOUT, || async {
        let m = meshes.get("mesh").await?;
        Ok(
            (m.data["status"]["observedGeneration"].as_i64() == m.metadata.generation)
                .then_some(()),
        )
    })
    .await?;
    let gens: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
    for i in 0..30 {
        gens.patch(
            &format!("gen-{i}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"data": {"v": "2"}}})),
        )
        .await?;
    }
    eventually(
        "the updates to be reconciled, still by v1",
        TIMEOUT,
        || async {
            let rs = w.records();
            let done = (0..30).all(|i| {
                rs.iter().any(|r| {
                    r.key == format!("{ns}/gen-{i}") && r.generation == 2 && r.outcome == "ok"
                })
            });
            Ok(done.then_some(()))
        },
    )
    .await?;
    let moved: Vec<_> = w
        .records()
        .into_iter()
        .filter(|r| r.subset == "v2")
        .collect();
    assert!(moved.is_empty(), "a paused mesh moved keys: {moved:?}");

    // Unpaused: every key moves to v2 live, by revoke -> drain -> released.
    spec["paused"] = json!(false);
    opmesh_tests::mesh::apply_mesh(&w.client, &w.ns, "mesh", spec).await?;
    eventually("every key to be reconciled by v2", TIMEOUT, || async {
        let handled = w.wait_handled(&namespaces, 30).await?;
        Ok(handled.values().all(|s| s == "v2").then_some(()))
    })
    .await?;
    let overlaps = history::overlaps(&w.records());
    assert!(overlaps.is_empty(), "two owners at once: {overlaps:#?}");
    // No restarts: the same processes served throughout.
    for r in &w.replicas {
        r.check_running()?;
    }
    Ok(())
}

#[tokio::test]
async fn a_reconnecting_runtime_keeps_the_keys_it_reports() -> anyhow::Result<()> {
    let mut w = World::new("held").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    // The runtime reaches the manager through a proxy that the test can cut.
    let port: u16 = w.manager.addr().rsplit(':').next().unwrap().parse()?;
    let proxy = opmesh_tests::proxy::Proxy::start(([127, 0, 0, 1], port).into()).await?;
    let r = w.replica_via("v1-0", "v1", &proxy.url()).await?;
    w.replicas.push(r);
    w.all_ready().await?;
    let ns = w.object_namespace("held-data", &[]).await?;
    for i in 0..20 {
        create_generator(&w.client, &ns, &format!("gen-{i}"), json!({})).await?;
    }
    w.wait_handled(std::slice::from_ref(&ns), 20).await?;

    // Cut the stream: the runtime reconnects within its lease and reports
    // the 20 keys it holds; the manager keeps them there instead of waiting
    // for the lease to run out.
    proxy.cut();
    eventually(
        "the manager to take back the reported keys",
        TIMEOUT,
        || async {
            let log = w.manager.process().log_tail(400);
            Ok(log
                .lines()
                .any(|l| l.contains("runtime joined") && l.contains("held=20"))
                .then_some(()))
        },
    )
    .await?;
    w.all_ready().await?;
    let log = w.manager.process().log_tail(400);
    assert!(
        !log.contains("lease expired; reassigning"),
        "keys waited for the lease:\n{log}"
    );
    // And it keeps reconciling them.
    let gens: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
    gens.patch(
        "gen-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"data": {"v": "2"}}})),
    )
    .await?;
    eventually("the update to be reconciled", TIMEOUT, || async {
        let ok = w
            .records()
            .iter()
            .any(|r| r.key == format!("{ns}/gen-0") && r.generation == 2 && r.outcome == "ok");
        Ok(ok.then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn behind_one_address_a_runtime_finds_the_leader() -> anyhow::Result<()> {
    let mut w = World::new("leader").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    let lease = format!("opmesh-{}", w.ns);
    let port = |m: &opmesh_tests::mesh::Manager| -> anyhow::Result<u16> {
        Ok(m.addr().rsplit(':').next().unwrap_or_default().parse()?)
    };
    let leader = opmesh_tests::mesh::Manager::start_on(
        w.cp,
        &w.bins,
        w.dir.path(),
        &w.ns,
        opmesh_tests::control_plane::free_port()?,
        Some(&lease),
    )
    .await?;
    eventually("the first manager to lead", TIMEOUT, || async {
        Ok(leader
            .process()
            .log_tail(200)
            .contains("leading: starting the coordinator")
            .then_some(()))
    })
    .await?;
    let standby = opmesh_tests::mesh::Manager::start_on(
        w.cp,
        &w.bins,
        w.dir.path(),
        &w.ns,
        opmesh_tests::control_plane::free_port()?,
        Some(&lease),
    )
    .await?;
    // One address, like a Service, that first reaches the standby.
    let service =
        opmesh_tests::proxy::Proxy::start(([127, 0, 0, 1], port(&standby)?).into()).await?;
    let r = w.replica_via("v1-0", "v1", &service.url()).await?;
    eventually("the standby to refuse the runtime", TIMEOUT, || async {
        Ok(r.sidecar
            .log_tail(200)
            .contains("is a standby manager")
            .then_some(()))
    })
    .await?;
    assert!(!r.ready());
    // The Service now routes to the leader; the runtime gets there without
    // a long backoff and reconciles.
    service
        .retarget(([127, 0, 0, 1], port(&leader)?).into())
        .await;
    w.replicas.push(r);
    w.all_ready().await?;
    let ns = w.object_namespace("leader-data", &[]).await?;
    create_generator(&w.client, &ns, "gen", json!({})).await?;
    w.wait_handled(std::slice::from_ref(&ns), 1).await?;
    Ok(())
}
