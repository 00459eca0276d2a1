//! A leader cut off from the apiserver: it must stop acting by its own
//! clock before another manager can take over, so no key is reconciled by
//! two runtimes across the handover.

use std::time::{Duration, Instant};

use opmesh_tests::{
    control_plane::free_port,
    eventually, history,
    mesh::{Manager, create_generator, generator_resource},
    proxy::Proxy,
    world::{TIMEOUT, World},
};
use serde_json::json;

/// The leader Lease's duration the managers use here, and their margin.
const LEADER_LEASE: Duration = Duration::from_secs(3);
const LEADER_MARGIN: Duration = Duration::from_millis(500);

/// Two managers and three replicas of one subset, with objects changing
/// all the time. Manager A leads and reaches the apiserver through a proxy
/// the test can blackhole; two replicas are connected to A (B refuses them
/// while it stands by), and a third can only reach B: if A went on renewing
/// leases after B took over, B would hand the third keys the first two
/// still reconcile.
struct Setup {
    w: World,
    a: Manager,
    b: Manager,
    api: Proxy,
    writer: tokio::task::JoinHandle<()>,
}

async fn setup(prefix: &str) -> anyhow::Result<Setup> {
    let mut w = World::new(prefix).await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    let lease = format!("opmesh-{}", w.ns);

    // Manager A reaches the apiserver through a proxy the test can blackhole.
    let kubeconfig = w.dir.path().join("via-proxy.kubeconfig");
    let api = Proxy::to_apiserver(w.cp, &kubeconfig).await?;
    let kubeconfig = kubeconfig.display().to_string();
    let a = manager(&w, &lease, free_port()?, Some(&kubeconfig)).await?;
    log_says(&a, "leading: starting the coordinator", "manager A to lead").await?;
    let b = manager(&w, &lease, free_port()?, None).await?;

    let both = format!("{},{}", a.addr(), b.addr());
    for pod in ["v1-0", "v1-1"] {
        let r = w.replica_via(pod, "v1", &both).await?;
        w.replicas.push(r);
    }
    w.all_ready().await?;
    let only_b = w.replica_via("v1-2", "v1", b.addr()).await?;
    w.replicas.push(only_b);

    let ns = w.object_namespace("partition-data", &[]).await?;
    for i in 0..20 {
        create_generator(
            &w.client,
            &ns,
            &format!("app-{i}"),
            json!({"data": {"n": "0"}}),
        )
        .await?;
    }
    w.wait_handled(std::slice::from_ref(&ns), 20).await?;

    // Keep changing every object, so reconciles run across the handover.
    let writer = {
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
        tokio::spawn(async move {
            for n in 1u64.. {
                for i in 0..20 {
                    let patch = json!({"spec": {"data": {"n": n.to_string()}}});
                    let _ = api
                        .patch(
                            &format!("app-{i}"),
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&patch),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    Ok(Setup {
        w,
        a,
        b,
        api,
        writer,
    })
}

#[tokio::test]
async fn a_partitioned_leader_stops_before_another_takes_over() -> anyhow::Result<()> {
    let s = setup("partition").await?;
    let a = &s.a;
    // Partition A from the apiserver; its runtimes stay connected to it.
    s.api.blackhole(true);
    let cut = Instant::now();
    log_says(
        a,
        "closing every session and stopping",
        "manager A to stop leading by its own clock",
    )
    .await?;
    let stopped = Instant::now();
    // By its own clock: at the latest at its last renewal plus the lease
    // duration minus the margin (the last renewal was before the cut).
    let log = a.process().log_tail(2000);
    let last_renewal = log_time(&log, "renewed the leader Lease", true)?;
    let stop_logged = log_time(&log, "closing every session and stopping", false)?;
    let deadline = last_renewal + (LEADER_LEASE - LEADER_MARGIN).as_micros() as i64;
    assert!(
        stop_logged <= deadline + 200_000,
        "stopped {} ms after its deadline",
        (stop_logged - deadline) / 1000
    );
    // run() returns within 5 s, although its sessions were open.
    assert!(
        a.process()
            .wait_exit(Duration::from_secs(5))
            .await
            .is_some(),
        "A is still running {:?} after it stopped",
        stopped.elapsed()
    );
    eprintln!("A stopped {:?} after the cut", stopped - cut);

    handover_without_overlap(s, cut).await
}

#[tokio::test]
async fn a_leader_stopped_past_its_lease_acts_no_more_when_continued() -> anyhow::Result<()> {
    let s = setup("sigstop").await?;
    let a = &s.a;
    // Frozen for twice the Lease: B takes over meanwhile.
    a.process().signal("STOP").await?;
    let cut = Instant::now();
    let b = &s.b;
    log_says(b, "leading: starting the coordinator", "manager B to lead").await?;
    tokio::time::sleep(LEADER_LEASE).await;
    a.process().signal("CONT").await?;
    // Its clock says its Lease is over: it accepts no session, renews no
    // runtime lease, and exits.
    log_says(
        a,
        "closing every session and stopping",
        "manager A to stop once continued",
    )
    .await?;
    assert!(
        a.process()
            .wait_exit(Duration::from_secs(5))
            .await
            .is_some(),
        "A is still running"
    );
    handover_without_overlap(s, cut).await
}

/// After A stopped: B takes over; every key is reconciled again, and never
/// by two runtimes at once.
async fn handover_without_overlap(s: Setup, cut: Instant) -> anyhow::Result<()> {
    let Setup { w, b, writer, .. } = s;
    // A has stopped: every key must be reconciled again from here on, by
    // the runtimes B serves.
    let since = now_us();
    eventually(
        "every object to be reconciled after the handover",
        TIMEOUT,
        || async {
            b.process().check_running()?;
            let recent: std::collections::BTreeSet<String> = w
                .records()
                .into_iter()
                .filter(|r| r.start_us as i64 > since)
                .map(|r| r.key)
                .collect();
            Ok((recent.len() == 20).then_some(()))
        },
    )
    .await?;
    writer.abort();
    let records = w.records();
    let overlaps = history::overlaps(&records);
    assert!(
        overlaps.is_empty(),
        "{} overlaps: {:?}",
        overlaps.len(),
        &overlaps[..overlaps.len().min(3)]
    );
    let during: usize = records
        .iter()
        .filter(|r| {
            let t = r.start_us as i64;
            t > now_us() - cut.elapsed().as_micros() as i64
        })
        .count();
    eprintln!(
        "{} reconciles, {during} after the cut, 0 overlaps",
        records.len()
    );
    Ok(())
}

/// A manager competing for `lease`, reaching the apiserver through the
/// kubeconfig `via` when given.
async fn manager(w: &World, lease: &str, port: u16, via: Option<&str>) -> anyhow::Result<Manager> {
    let args = vec![
        "run".to_string(),
        format!("--listen=127.0.0.1:{port}"),
        format!("--mesh-namespace={}", w.ns),
        format!(
            "--lease-ttl-ms={}",
            opmesh_tests::mesh::LEASE_TTL.as_millis()
        ),
        "--leader-election".into(),
        format!("--lease-name={lease}"),
        format!("--lease-namespace={}", w.ns),
        format!("--identity=manager-{port}"),
        format!("--leader-lease-seconds={}", LEADER_LEASE.as_secs()),
    ];
    let env: Vec<(&str, &str)> = via.map(|k| ("KUBECONFIG", k)).into_iter().collect();
    Manager::spawn(w.cp, &w.bins, w.dir.path(), port, &args, &env).await
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Waits until `manager`'s log has a line containing `line`.
async fn log_says(manager: &Manager, line: &str, what: &str) -> anyhow::Result<()> {
    eventually(what, TIMEOUT, || async {
        if manager.process().log_tail(400).contains(line) {
            return Ok(Some(()));
        }
        // Not there yet: say so if it never will be.
        manager.process().check_running()?;
        Ok(None)
    })
    .await
}

/// `127.0.0.1:port` of the apiserver URL.
/// The time, in µs since the epoch, of the last (or first) log line that
/// contains `what`.
fn log_time(log: &str, what: &str, last: bool) -> anyhow::Result<i64> {
    let mut lines = log.lines().filter(|l| l.contains(what));
    let line = if last {
        lines.next_back()
    } else {
        lines.next()
    };
    let line = line.ok_or_else(|| anyhow::anyhow!("no log line says {what:?}"))?;
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let t: k8s_openapi::jiff::Timestamp = stamp.parse()?;
    Ok(t.as_microsecond())
}
