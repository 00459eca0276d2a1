//! A runtime that is asked to stop drains: its running reconciles keep
//! their lease (and their writes) while it waits for them, and its keys
//! move as soon as it says goodbye. If it loses the manager meanwhile, its
//! lease still ends its reconciles on time.

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::{
    eventually,
    history::now_us,
    history::{self, Deaths},
    mesh::{LEASE_TTL, Record, create_generator, generator_resource, read_records},
    world::{TIMEOUT, World},
};
use serde_json::json;

/// Two replicas, eight objects, and one key that v1-0 owns, now
/// reconciling a change that works for `work_ms` before it writes. Returns
/// the key and v1-0's reconcile of it.
async fn slow_reconcile_on_v1_0(
    w: &mut World,
    prefix: &str,
    work_ms: u64,
) -> anyhow::Result<(String, Record)> {
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v1-1", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace(prefix, &[]).await?;
    for i in 0..8 {
        create_generator(
            &w.client,
            &ns,
            &format!("app-{i}"),
            json!({"data": {"n": "0"}}),
        )
        .await?;
    }
    let handled = w.wait_handled(std::slice::from_ref(&ns), 8).await?;
    anyhow::ensure!(handled.values().all(|s| s == "v1"), "{handled:?}");
    let api: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
    let mut key = None;
    for i in 0..8 {
        let name = format!("app-{i}");
        let by = api.get(&name).await?.data["status"]["handledBy"]
            .as_str()
            .map(str::to_string);
        if by.as_deref() == Some("v1/v1-0") {
            key = Some(name);
            break;
        }
    }
    let name = key.ok_or_else(|| anyhow::anyhow!("v1-0 owns none of 8 keys"))?;
    let key = format!("{ns}/{name}");
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"data": {"n": "1"}, "reconcileMs": work_ms}})),
    )
    .await?;
    let records = w.replicas[0].records.clone();
    let started = eventually("v1-0 to start working on the change", TIMEOUT, || async {
        Ok(history::working(&records, &key, 2))
    })
    .await?;
    Ok((key, started))
}

#[tokio::test]
async fn a_reconcile_that_ends_long_after_sigterm_still_writes_and_its_key_moves_at_goodbye()
-> anyhow::Result<()> {
    let mut w = World::new("drain").await?;
    // Works for well over a lease TTL after the SIGTERM.
    let work = (LEASE_TTL * 3).as_millis() as u64;
    let (key, started) = slow_reconcile_on_v1_0(&mut w, "drain-data", work).await?;
    w.replicas[0].sidecar.signal("TERM").await?;

    let old_records = w.replicas[0].records.clone();
    let ended = eventually("v1-0's reconcile to end", TIMEOUT, || async {
        Ok(read_records(&old_records)
            .into_iter()
            .find(|r| r.id == started.id))
    })
    .await?;
    let writes: Vec<_> = history::read_writes(&old_records)
        .into_iter()
        .filter(|x| x.id == started.id)
        .collect();
    assert_eq!(
        ended.outcome, "ok",
        "the draining reconcile failed: {ended:?}, writes {writes:?}"
    );
    assert!(
        !writes.is_empty() && writes.iter().all(|x| x.outcome == "ok"),
        "the draining reconcile's writes were refused: {writes:?}"
    );
    // The goodbye moves the key at once: v1-1 starts on it well within a
    // lease TTL (a lost runtime's keys wait a whole TTL).
    let new_records = w.replicas[1].records.clone();
    let next = eventually("v1-1 to reconcile the key", TIMEOUT, || async {
        Ok(history::read(&[&new_records], &Deaths::default(), now_us())
            .into_iter()
            .find(|r| r.key == key && r.start_us > ended.end_us))
    })
    .await?;
    let waited = std::time::Duration::from_micros((next.start_us - ended.end_us) as u64);
    assert!(
        waited < LEASE_TTL,
        "the key waited {waited:?} after the goodbye"
    );
    Ok(())
}

#[tokio::test]
async fn a_draining_runtime_that_loses_its_manager_stops_its_reconciles_at_its_lease_end()
-> anyhow::Result<()> {
    let mut w = World::new("drain-lost").await?;
    // Would run far past the lease.
    let work = (LEASE_TTL * 10).as_millis() as u64;
    let (_key, started) = slow_reconcile_on_v1_0(&mut w, "drain-lost-data", work).await?;
    w.replicas[0].sidecar.signal("TERM").await?;
    // The manager dies while v1-0 drains: no more renewals.
    w.manager.process().signal("KILL").await?;
    let lost = now_us();

    let old_records = w.replicas[0].records.clone();
    let ended = eventually("v1-0's reconcile to end", TIMEOUT, || async {
        Ok(read_records(&old_records)
            .into_iter()
            .find(|r| r.id == started.id))
    })
    .await?;
    assert_eq!(ended.outcome, "cancelled", "{ended:?}");
    // Cancelled when the lease ran out: within a TTL of the last renewal,
    // long before the reconcile would have ended by itself.
    let after = std::time::Duration::from_micros((ended.end_us.saturating_sub(lost)) as u64);
    assert!(
        after < LEASE_TTL * 2,
        "the reconcile ran {after:?} after the manager died"
    );
    Ok(())
}

#[tokio::test]
async fn a_slow_reconcile_at_a_handoff_completes_its_write_before_the_key_moves()
-> anyhow::Result<()> {
    let mut w = World::new("handoff-slow").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("handoff-slow-data", &[]).await?;
    create_generator(&w.client, &ns, "app", json!({"data": {"n": "0"}})).await?;
    w.wait_handled(std::slice::from_ref(&ns), 1).await?;
    let key = format!("{ns}/app");
    let api: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
    // Two thirds of a lease TTL of work: it ends before the revoke would
    // cancel it.
    let work = (LEASE_TTL * 2 / 3).as_millis() as u64;
    api.patch(
        "app",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"data": {"n": "1"}, "reconcileMs": work}})),
    )
    .await?;
    let old_records = w.replicas[0].records.clone();
    let started = eventually("v1-0 to start working on the change", TIMEOUT, || async {
        Ok(history::working(&old_records, &key, 2))
    })
    .await?;
    // The key moves to v2 while v1-0 works on it.
    w.apply_mesh(
        json!({"weights": [{"subset": "v2", "weight": 100}]}),
        &["v1", "v2"],
    )
    .await?;

    let ended = eventually("v1-0's reconcile to end", TIMEOUT, || async {
        Ok(read_records(&old_records)
            .into_iter()
            .find(|r| r.id == started.id))
    })
    .await?;
    let writes: Vec<_> = history::read_writes(&old_records)
        .into_iter()
        .filter(|x| x.id == started.id)
        .collect();
    // The key is v1-0's until it says Released, so its writes count.
    assert_eq!(ended.outcome, "ok", "{ended:?}, writes {writes:?}");
    assert!(
        !writes.is_empty() && writes.iter().all(|x| x.outcome == "ok"),
        "the revoked key's writes were refused before Released: {writes:?}"
    );
    let new_records = w.replicas[1].records.clone();
    let next = eventually("v2-0 to reconcile the key", TIMEOUT, || async {
        Ok(history::read(&[&new_records], &Deaths::default(), now_us())
            .into_iter()
            .find(|r| r.key == key))
    })
    .await?;
    assert!(
        next.start_us > ended.end_us,
        "v2-0 started before v1-0 ended: {next:?} {ended:?}"
    );
    let all = history::read(&[&old_records, &new_records], &Deaths::default(), now_us());
    assert!(history::overlaps(&all).is_empty());
    Ok(())
}
