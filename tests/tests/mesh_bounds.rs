//! Bounds: a flood of hellos costs the real runtimes nothing, and hellos
//! too large are refused with a status that says why.

use std::time::{Duration, Instant};

use opmesh_proto::v1::HeldKey;
use opmesh_tests::{
    eventually,
    mesh::Replica,
    session::{client, hello, send},
    world::{TIMEOUT, World},
};
use serde_json::json;
use tonic::Code;

/// `(count, count within 1 s)` of a runtime's lease renewals so far.
fn renewals(r: &Replica) -> (u64, u64) {
    let metrics = r.metrics().unwrap_or_default();
    let value = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    (
        value("opmesh_runtime_lease_renewal_seconds_count"),
        value("opmesh_runtime_lease_renewal_seconds_bucket{le=\"1.0\"}"),
    )
}

/// The manager's resident memory, in KiB.
async fn rss_kib(w: &World) -> anyhow::Result<u64> {
    let pid = w
        .manager
        .process()
        .pid()
        .await
        .ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

#[tokio::test]
async fn a_burst_of_hellos_leaves_the_real_runtimes_on_time() -> anyhow::Result<()> {
    const BURST: usize = 1000;
    let mut w = World::new("bounds-burst").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v1-1", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("bounds-data", &[]).await?;
    w.apps(&ns, 6).await?;
    let joined = w
        .manager
        .process()
        .log_tail(5000)
        .matches("runtime joined")
        .count();
    let before: Vec<(u64, u64)> = w.replicas.iter().map(renewals).collect();
    let rss_before = rss_kib(&w).await?;

    // 1,000 hellos at once from loopback, on 20 connections, each with a
    // token of its own that is not one.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(client(&w).await?);
    }
    let burst = futures::future::join_all((0..BURST).map(|i| {
        let mut c = clients[i % clients.len()].clone();
        let h = hello(&w, &format!("flood-{i}"), &format!("forged-token-{i}"));
        async move { send(&mut c, h).await }
    }));
    // The real runtimes stay ready all through it.
    let watch = async {
        loop {
            for r in &w.replicas {
                anyhow::ensure!(r.ready(), "{} stopped being ready during the burst", r.pod);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        #[allow(unreachable_code)]
        Ok(())
    };
    let answers = tokio::select! {
        a = burst => a,
        e = watch => return e,
    };
    let took = started.elapsed();
    let count = |code: Code| answers.iter().filter(|(c, _)| *c == code).count();
    let (unauthenticated, busy) = (count(Code::Unauthenticated), count(Code::ResourceExhausted));
    assert_eq!(
        unauthenticated + busy,
        BURST,
        "other answers: {:?}",
        answers
            .iter()
            .filter(|(c, _)| !matches!(c, Code::Unauthenticated | Code::ResourceExhausted))
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(busy > 0, "no hello was shed: the limit is not in force");
    let shed = answers.iter().find(|(c, _)| *c == Code::ResourceExhausted);
    assert!(shed.is_some_and(|(_, m)| m.contains("retry")), "{shed:?}");

    // Heartbeats kept being renewed within a second (a third of the lease
    // TTL) all through, for a few heartbeats past the burst.
    eventually(
        "three renewals of each runtime since the burst",
        TIMEOUT,
        || async {
            Ok(w.replicas
                .iter()
                .zip(&before)
                .all(|(r, b)| renewals(r).0 >= b.0 + 3)
                .then_some(()))
        },
    )
    .await?;
    for (r, b) in w.replicas.iter().zip(&before) {
        let now = renewals(r);
        assert_eq!(
            now.0 - b.0,
            now.1 - b.1,
            "{}: some lease renewals took over a second during the burst",
            r.pod
        );
    }
    assert_eq!(
        w.manager
            .process()
            .log_tail(5000)
            .matches("runtime joined")
            .count(),
        joined,
        "a real runtime's session was re-established"
    );
    let rss_after = rss_kib(&w).await?;
    println!(
        "burst of {BURST} hellos in {took:?}: {unauthenticated} UNAUTHENTICATED, {busy} \
         RESOURCE_EXHAUSTED; manager RSS before {rss_before} KiB, after {rss_after} KiB"
    );

    // And the mesh still works.
    w.change_and_wait(&ns, "app-0").await?;
    Ok(())
}

#[tokio::test]
async fn hellos_too_large_are_refused_with_a_clear_status() -> anyhow::Result<()> {
    let w = World::new("bounds-size").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    let mut c = client(&w).await?;

    // More held keys than a runtime may report.
    let mut h = hello(&w, "hoarder", "");
    h.held = (0..100_001)
        .map(|i| HeldKey {
            key: format!("ns/k{i}"),
        })
        .collect();
    let (code, message) = send(&mut c, h).await;
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(
        message.contains("hello.held reports 100001 keys, more than 100000"),
        "{message}"
    );

    // A message over the size limit, whatever it holds.
    let mut h = hello(&w, "giant", "");
    h.held = (0..60_000)
        .map(|i| HeldKey {
            key: format!("ns/{i:0>300}"),
        })
        .collect();
    let (code, message) = send(&mut c, h).await;
    assert_eq!(code, Code::OutOfRange, "{message}");
    assert!(message.contains("too large"), "{message}");
    Ok(())
}
