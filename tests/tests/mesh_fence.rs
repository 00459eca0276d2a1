//! Fenced writes against a real apiserver: a replica whose writes are
//! delayed past its lease, or whose sidecar is frozen while its key moves
//! on, never lands a write after the new owner's.

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::{
    eventually,
    history::now_us,
    history::{self, Deaths},
    landed::WriteLog,
    mesh::{LEASE_TTL, Replica, ReplicaOptions, create_generator, generator_resource},
    proxy::Proxy,
    world::{TIMEOUT, World},
};
use serde_json::json;

/// Starts a replica whose operator reaches the apiserver through a proxy
/// the test controls.
async fn replica_via_proxy(
    w: &World,
    pod: &str,
    version: &str,
) -> anyhow::Result<(Replica, Proxy)> {
    let kubeconfig = w.dir.path().join(format!("{pod}.kubeconfig"));
    let proxy = Proxy::to_apiserver(w.cp, &kubeconfig).await?;
    let kubeconfig = kubeconfig.display().to_string();
    let mesh = format!("{}/mesh", w.ns);
    let labels = [("app", "cmg"), ("version", version)];
    let operator_env = [("KUBECONFIG", kubeconfig.as_str())];
    let replica = Replica::start(
        &w.client,
        &ReplicaOptions {
            mesh: &mesh,
            pod,
            labels: &labels,
            operator_env: &operator_env,
            ..w.replica_options(version)
        },
    )
    .await?;
    Ok((replica, proxy))
}

async fn patch(w: &World, ns: &str, name: &str, patch: serde_json::Value) -> anyhow::Result<u64> {
    let api: Api<DynamicObject> = Api::namespaced_with(w.client.clone(), ns, &generator_resource());
    let o = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(o.metadata
        .resource_version
        .and_then(|v| v.parse().ok())
        .unwrap_or_default())
}

/// The key's current `status.handledBy`.
async fn handled_by(w: &World, ns: &str, name: &str) -> anyhow::Result<Option<String>> {
    let api: Api<DynamicObject> = Api::namespaced_with(w.client.clone(), ns, &generator_resource());
    Ok(api.get(name).await?.data["status"]["handledBy"]
        .as_str()
        .map(str::to_string))
}

/// Waits until `log` has seen every generator write up to a fresh marker
/// write on `name`, so any write that landed before it has been recorded.
async fn settle(w: &World, log: &WriteLog, ns: &str, name: &str) -> anyhow::Result<()> {
    let marker = patch(
        w,
        ns,
        name,
        json!({"metadata": {"labels": {"marker": now_us().to_string()}}}),
    )
    .await?;
    eventually("the write watch to catch up", TIMEOUT, || async {
        Ok((log.generator_rv() >= marker).then_some(()))
    })
    .await
}

#[tokio::test]
async fn a_write_delayed_past_the_lease_times_out_and_never_lands_after_the_new_owners()
-> anyhow::Result<()> {
    let mut w = World::new("fence-delay").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1", "v2"],
    )
    .await?;
    let (old, proxy) = replica_via_proxy(&w, "v1-0", "v1").await?;
    w.replicas.push(old);
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("fence-delay-data", &[]).await?;
    let log = WriteLog::start(&w.client, std::slice::from_ref(&ns));
    create_generator(&w.client, &ns, "app", json!({"data": {"n": "0"}})).await?;
    w.wait_handled(std::slice::from_ref(&ns), 1).await?;
    let key = format!("{ns}/app");

    // v1-0's writes now take two lease TTLs to reach the apiserver.
    proxy.delay(LEASE_TTL * 2);
    patch(&w, &ns, "app", json!({"spec": {"data": {"n": "1"}}})).await?;
    let old_records = w.replicas[0].records.clone();
    let started = eventually("v1-0 to start reconciling the change", TIMEOUT, || async {
        Ok(history::read(&[&old_records], &Deaths::default(), now_us())
            .into_iter()
            .find(|r| r.key == key && r.generation == 2))
    })
    .await?;
    // Move the key to v2 while v1-0's write hangs in the network.
    w.apply_mesh(
        json!({"weights": [{"subset": "v2", "weight": 100}]}),
        &["v1", "v2"],
    )
    .await?;

    // v1-0's write gives up before its lease would end.
    let write = eventually("v1-0's delayed write to give up", TIMEOUT, || async {
        Ok(history::read_writes(&old_records)
            .into_iter()
            .find(|x| x.id == started.id))
    })
    .await?;
    assert!(
        write.outcome.starts_with("fenced:") && write.outcome.contains("did not finish within"),
        "v1-0's write should have timed out before its lease ran out: {write:?}"
    );
    // The new owner writes.
    eventually("v2-0 to handle the key", TIMEOUT, || async {
        Ok(handled_by(&w, &ns, "app")
            .await?
            .filter(|h| h.starts_with("v2/"))
            .map(|_| ()))
    })
    .await?;
    // Whatever v1-0 sent is delivered or dropped by now, and whatever was
    // delivered has been seen.
    eventually(
        "the delayed bytes to be delivered or dropped",
        TIMEOUT,
        || async { Ok((proxy.in_flight() == 0).then_some(())) },
    )
    .await?;
    settle(&w, &log, &ns, "app").await?;

    let records = history::read(
        &[&w.replicas[0].records, &w.replicas[1].records],
        &Deaths::default(),
        now_us(),
    );
    let stale = history::stale_writes(&log.landed(), &records)?;
    assert!(stale.is_empty(), "stale writes landed: {stale:#?}");
    assert_eq!(
        handled_by(&w, &ns, "app")
            .await?
            .as_deref()
            .map(|h| h.starts_with("v2/")),
        Some(true)
    );
    Ok(())
}

#[tokio::test]
async fn an_operator_whose_sidecar_froze_cannot_write_after_its_key_moved() -> anyhow::Result<()> {
    let mut w = World::new("fence-freeze").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v1-1", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("fence-freeze-data", &[]).await?;
    let log = WriteLog::start(&w.client, std::slice::from_ref(&ns));
    for i in 0..8 {
        create_generator(
            &w.client,
            &ns,
            &format!("app-{i}"),
            json!({"data": {"n": "0"}}),
        )
        .await?;
    }
    w.wait_handled(std::slice::from_ref(&ns), 8).await?;
    // A key that v1-0 owns.
    let mut name = None;
    for i in 0..8 {
        let n = format!("app-{i}");
        if handled_by(&w, &ns, &n).await?.as_deref() == Some("v1/v1-0") {
            name = Some(n);
            break;
        }
    }
    let name = name.ok_or_else(|| anyhow::anyhow!("v1-0 owns none of 8 keys"))?;
    let key = format!("{ns}/{name}");

    // v1-0's operator reads, then works for three lease TTLs before it
    // writes; its sidecar freezes meanwhile.
    let work = (LEASE_TTL * 3).as_millis() as u64;
    patch(
        &w,
        &ns,
        &name,
        json!({"spec": {"data": {"n": "1"}, "reconcileMs": work}}),
    )
    .await?;
    let old_records = w.replicas[0].records.clone();
    let started = eventually("v1-0 to start reconciling the change", TIMEOUT, || async {
        Ok(history::read(&[&old_records], &Deaths::default(), now_us())
            .into_iter()
            .find(|r| r.key == key && r.generation == 2))
    })
    .await?;
    eventually(
        "v1-0's reconcile to read and start working",
        TIMEOUT,
        || async {
            Ok(history::events(&old_records, "working")
                .into_iter()
                .find(|e| e.id == started.id))
        },
    )
    .await?;
    w.replicas[0].sidecar.signal("STOP").await?;
    let result = frozen(&w, &log, &ns, &name, &started.id).await;
    w.replicas[0].sidecar.signal("CONT").await?;
    result?;

    // Thawed, the sidecar answers the fence: the lease is gone.
    let ended = eventually(
        "v1-0's reconcile to end after the thaw",
        TIMEOUT,
        || async {
            Ok(opmesh_tests::mesh::read_records(&old_records)
                .into_iter()
                .find(|r| r.id == started.id))
        },
    )
    .await?;
    settle(&w, &log, &ns, &name).await?;
    let writes: Vec<_> = history::read_writes(&old_records)
        .into_iter()
        .filter(|x| x.id == started.id)
        .collect();
    assert!(
        // `opmesh_sdk::is_fenced` recognised the refusal: the example
        // operator records such writes as `fenced: ...`.
        writes
            .iter()
            .all(|x| x.outcome.starts_with("fenced:") && x.outcome.contains("refused")),
        "v1-0's writes after losing the key were not refused: {writes:?}, ended {ended:?}"
    );
    let landed_by_old = log
        .landed()
        .into_iter()
        .filter(|l| l.writer == started.id)
        .count();
    assert_eq!(landed_by_old, 0, "the old owner's write landed: {writes:?}");
    let records = history::read(
        &[&w.replicas[0].records, &w.replicas[1].records],
        &Deaths::default(),
        now_us(),
    );
    let stale = history::stale_writes(&log.landed(), &records)?;
    assert!(stale.is_empty(), "stale writes landed: {stale:#?}");
    assert_eq!(
        handled_by(&w, &ns, &name).await?.as_deref(),
        Some("v1/v1-1")
    );
    Ok(())
}

/// While v1-0's sidecar is frozen: the key moves to v1-1, which writes, and
/// then v1-0's operator, still in the old reconcile, tries to write.
async fn frozen(w: &World, log: &WriteLog, ns: &str, name: &str, id: &str) -> anyhow::Result<()> {
    // A newer generation that reconciles at once, for the new owner.
    patch(
        w,
        ns,
        name,
        json!({"spec": {"data": {"n": "2"}, "reconcileMs": null}}),
    )
    .await?;
    eventually("v1-1 to take the key over and write", TIMEOUT, || async {
        Ok(handled_by(w, ns, name).await?.filter(|h| h == "v1/v1-1"))
    })
    .await?;
    settle(w, log, ns, name).await?;
    let old_records = w.replicas[0].records.clone();
    eventually("v1-0's operator to try its write", TIMEOUT, || async {
        Ok(history::events(&old_records, "writing")
            .into_iter()
            .find(|e| e.id == id))
    })
    .await?;
    Ok(())
}
