//! The runtime's work queue behaves like controller-runtime's, end to end:
//! error backoff, requeue-after, and deletes.

use kube::{Api, api::DynamicObject};
use opmesh_tests::world::{TIMEOUT, World};
use opmesh_tests::{
    eventually,
    history::now_us,
    mesh::{Record, create_generator, generator_resource},
};
use serde_json::json;

fn starts(records: &[Record]) -> Vec<u128> {
    records.iter().map(|r| r.start_us).collect()
}

#[tokio::test]
async fn errors_back_off_requeues_wait_and_deleted_keys_stop() -> anyhow::Result<()> {
    let mut w = World::new("queue").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("queue-data", &[]).await?;

    // Error backoff: three failures, retried after 5, 10 and 20 ms at least,
    // then success. (Later successes come from the operator's own writes,
    // which are events like any other.)
    create_generator(&w.client, &ns, "flaky", json!({"failTimes": 3})).await?;
    let key = format!("{ns}/flaky");
    let flaky = eventually("flaky to succeed", TIMEOUT, || async {
        let rs: Vec<Record> = w.records().into_iter().filter(|r| r.key == key).collect();
        Ok(rs.iter().any(|r| r.outcome == "ok").then_some(rs))
    })
    .await?;
    let outcomes: Vec<&str> = flaky
        .iter()
        .map(|r| r.outcome.split(':').next().unwrap())
        .collect();
    assert_eq!(outcomes[..4], ["error", "error", "error", "ok"]);
    let s = starts(&flaky);
    for (i, min_ms) in [5u128, 10, 20].iter().enumerate() {
        let gap = s[i + 1] - flaky[i].end_us;
        assert!(
            gap >= min_ms * 1000,
            "retry {i} came after {gap}µs, before the {min_ms}ms backoff"
        );
    }
    let metrics = w.replicas[0].metrics().unwrap_or_default();
    let errors = metric(&metrics, "controller_runtime_reconcile_errors_total");
    assert!(errors >= 3.0, "errors metric {errors}:\n{metrics}");
    assert!(metric(&metrics, "workqueue_retries_total") >= 3.0);

    // Requeue-after: reconciles repeat, never sooner than asked. The first
    // few follow the events of the operator's own writes (its ConfigMap and
    // status); after those settle, only the requeue drives it.
    create_generator(&w.client, &ns, "ticker", json!({"requeueAfterMs": 400})).await?;
    let ticker = format!("{ns}/ticker");
    // Events of its own writes can still arrive a little late on a loaded
    // machine, so the last three gaps of nine reconciles are what is judged.
    let ticks = eventually("nine ticks", TIMEOUT, || async {
        let rs: Vec<Record> = w
            .records()
            .into_iter()
            .filter(|r| r.key == ticker)
            .collect();
        Ok((rs.len() >= 9).then_some(rs))
    })
    .await?;
    for pair in ticks[5..].windows(2) {
        let gap = pair[1].start_us - pair[0].end_us;
        assert!(gap >= 400_000, "requeued after {gap}µs, before 400ms");
    }

    // Delete: the pending requeue of a deleted object is dropped. A sentinel
    // with the same period shows that time for a requeue has passed.
    let api: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
    api.delete("ticker", &Default::default()).await?;
    let deleted_at = now_us();
    create_generator(&w.client, &ns, "sentinel", json!({"requeueAfterMs": 400})).await?;
    let sentinel = format!("{ns}/sentinel");
    eventually("the sentinel to tick twice", TIMEOUT, || async {
        let n = w.records().iter().filter(|r| r.key == sentinel).count();
        Ok((n >= 2).then_some(()))
    })
    .await?;
    let late: Vec<Record> = w
        .records()
        .into_iter()
        .filter(|r| r.key == ticker && r.start_us > deleted_at + 200_000)
        .collect();
    assert!(late.is_empty(), "a deleted object was reconciled: {late:?}");
    Ok(())
}

/// Sum of a metric's samples in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
