//! `opmesh-bench`: timings of live re-sharding and crash failover, next to a
//! bare kube-runtime controller measured in the same run on the same
//! apiserver. Results go to `docs/benchmarks.md`.
//!
//! ```text
//! cargo build --release --workspace --bins --examples
//! ./target/release/opmesh-bench --keys 10000
//! ```
//!
//! 1. Baseline: a bare kube-runtime `Controller` (no mesh) doing the example
//!    operator's work (apply a ConfigMap, patch status) starts cold and
//!    reconciles every object once. This is what a restart-based rollout
//!    costs.
//! 2. The mesh: v1 owns every key; then the weights flip to v2 and every key
//!    moves live. Timed until each moved key is owned by v2 (the handoff)
//!    and until each is reconciled by v2.
//! 3. Crash failover: a second v2 replica joins, then the first is killed
//!    with -9. Timed until each of its keys is reconciled by the survivor.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DynamicObject, Patch, PatchParams},
    runtime::{Controller, controller::Action, watcher},
};
use opmesh_tests::{
    ControlPlane,
    control_plane::Options,
    eventually,
    mesh::{Binaries, Manager, Record, Replica, apply_mesh, generator_resource, read_records},
};
use serde_json::json;

struct Args {
    keys: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut keys = 10_000;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--keys" => keys = it.next().context("--keys needs a number")?.parse()?,
            other => anyhow::bail!("unknown argument {other}; usage: opmesh-bench [--keys N]"),
        }
    }
    Ok(Args { keys })
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { keys } = args()?;
    let bins = Binaries::locate()?;
    let cp = ControlPlane::start(Options::default()).await?;
    bins.install_example_crd(&cp).await?;
    let client = cp.client().await?;
    let dir = tempfile::Builder::new().prefix("opmesh-bench-").tempdir()?;
    let per_ns = 100usize;
    let namespaces: Vec<String> = (0..keys.div_ceil(per_ns))
        .map(|i| format!("bench-{i:04}"))
        .collect();
    for ns in &namespaces {
        opmesh_tests::cluster::create_named_namespace(&client, ns, &[]).await?;
    }
    opmesh_tests::cluster::create_named_namespace(&client, "opmesh-bench", &[]).await?;

    eprintln!("creating {keys} objects...");
    let t = Instant::now();
    let all: Vec<(String, String)> = (0..keys)
        .map(|i| (namespaces[i / per_ns].clone(), format!("obj-{i:05}")))
        .collect();
    futures::stream::iter(all.iter().cloned())
        .map(|(ns, name)| {
            let client = client.clone();
            async move {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client, &ns, &generator_resource());
                let mut obj = DynamicObject::new(&name, &generator_resource()).within(&ns);
                obj.data = json!({"spec": {"data": {"k": name}}});
                api.create(&Default::default(), &obj).await
            }
        })
        .buffer_unordered(16)
        .for_each(|r| async {
            if let Err(e) = r {
                eprintln!("create failed: {e}");
            }
        })
        .await;
    eprintln!("created in {:.1?}", t.elapsed());

    // 1. Baseline: a bare kube-runtime controller, cold.
    eprintln!("baseline: bare kube-runtime controller...");
    let baseline = bare_controller(&client, keys).await?;
    eprintln!("baseline reconciled {keys} keys in {baseline:.2?}");

    // 2. The mesh.
    let manager = Manager::start(&cp, &bins, dir.path(), "opmesh-bench").await?;
    let ttl = opmesh_tests::mesh::LEASE_TTL;
    let mesh = |v2: u32| {
        json!({
            "selector": {"matchLabels": {"app": "bench"}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            "routing": {"weights": [{"subset": "v1", "weight": 100 - v2}, {"subset": "v2", "weight": v2}], "exclude": ["opmesh-bench"]},
        })
    };
    apply_mesh(&client, "opmesh-bench", "mesh", mesh(0)).await?;
    let start = |pod: &'static str, version: &'static str| {
        start_replica(
            &cp,
            &bins,
            &client,
            dir.path(),
            manager.addr(),
            pod,
            version,
        )
    };
    let v1 = start("v1-0", "v1").await?;
    let v2a = start("v2-0", "v2").await?;
    let t = Instant::now();
    wait_keys(&[&v1], keys, None, "v1", Duration::from_secs(600)).await?;
    let initial = t.elapsed();
    eprintln!("mesh initial assignment reconciled in {initial:.2?}");

    // Weight flip: every key moves to v2.
    let flip_at = now_us();
    let t = Instant::now();
    apply_mesh(&client, "opmesh-bench", "mesh", mesh(100)).await?;
    let handoff = eventually("v2 to own every key", Duration::from_secs(600), || async {
        let owned = v2a
            .metrics()
            .map(|m| gauge(&m, "opmesh_runtime_owned_keys"))
            .unwrap_or(0.0);
        Ok((owned as usize >= keys).then(|| t.elapsed()))
    })
    .await?;
    let moved = wait_keys(&[&v2a], keys, Some(flip_at), "v2", Duration::from_secs(600)).await?;
    let lat = percentiles(
        moved
            .values()
            .map(|end| (end - flip_at) as f64 / 1e6)
            .collect(),
    );
    eprintln!(
        "weight change: handoff {handoff:.2?}, reconciled p50 {:.2}s p99 {:.2}s max {:.2}s",
        lat.0, lat.1, lat.2
    );

    // 3. Crash failover: a second v2 replica shares the keys; kill the first.
    let v2b = start("v2-1", "v2").await?;
    eventually(
        "the v2 replicas to split the keys",
        Duration::from_secs(600),
        || async {
            let a = v2a
                .metrics()
                .map(|m| gauge(&m, "opmesh_runtime_owned_keys"))
                .unwrap_or(0.0);
            let b = v2b
                .metrics()
                .map(|m| gauge(&m, "opmesh_runtime_owned_keys"))
                .unwrap_or(0.0);
            Ok(((a + b) as usize == keys && b > 0.0 && v2b.ready()).then_some(()))
        },
    )
    .await?;
    // Let v2-1 catch up on the keys it received, so what follows measures failover.
    let b_keys: HashSet<String> = wait_settled(&v2b).await?;
    let owned_by_a = keys - b_keys.len();
    let kill_at = now_us();
    v2a.sidecar.signal("KILL")?;
    v2a.operator.signal("KILL")?;
    let t = Instant::now();
    let failover_handoff = eventually(
        "the survivor to own every key",
        Duration::from_secs(600),
        || async {
            let owned = v2b
                .metrics()
                .map(|m| gauge(&m, "opmesh_runtime_owned_keys"))
                .unwrap_or(0.0);
            Ok((owned as usize >= keys).then(|| t.elapsed()))
        },
    )
    .await?;
    let took_over = wait_keys_where(
        &[&v2b],
        owned_by_a,
        Some(kill_at),
        "v2",
        Duration::from_secs(600),
        |k| !b_keys.contains(k),
    )
    .await?;
    let failover = t.elapsed();
    let flat: Vec<f64> = took_over
        .values()
        .map(|end| (end - kill_at) as f64 / 1e6)
        .collect();
    let fl = percentiles(flat);
    eprintln!(
        "failover of {owned_by_a} keys: p50 {:.2}s p99 {:.2}s max {:.2}s (ttl {ttl:?})",
        fl.0, fl.1, fl.2
    );

    println!("| measurement | value | ratio |");
    println!("|---|---|---|");
    println!(
        "| baseline: bare kube-runtime controller, cold start to all {keys} keys reconciled | {:.2} s | 1.00 |",
        baseline.as_secs_f64()
    );
    println!(
        "| mesh: initial assignment to all keys reconciled (v1) | {:.2} s | {:.2} × baseline |",
        initial.as_secs_f64(),
        initial.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "| weight change moving {keys} keys: handoff until v2 owns all | {:.2} s | {:.2} × baseline |",
        handoff.as_secs_f64(),
        handoff.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "| weight change: per-key time to reconciled by v2, p50 / p99 / max | {:.2} / {:.2} / {:.2} s | max = {:.2} × baseline |",
        lat.0,
        lat.1,
        lat.2,
        lat.2 / baseline.as_secs_f64()
    );
    println!(
        "| crash failover (kill -9, {owned_by_a} keys): handoff until the survivor owns them | {:.2} s | {:.2} × lease TTL ({:.1} s) |",
        failover_handoff.as_secs_f64(),
        failover_handoff.as_secs_f64() / ttl.as_secs_f64(),
        ttl.as_secs_f64()
    );
    println!(
        "| crash failover (kill -9, {owned_by_a} keys): per-key time to reconciled elsewhere, p50 / p99 / max | {:.2} / {:.2} / {:.2} s | max = {:.2} × lease TTL ({:.1} s) |",
        fl.0,
        fl.1,
        fl.2,
        fl.2 / ttl.as_secs_f64(),
        ttl.as_secs_f64()
    );
    eprintln!("failover complete after {failover:.2?} (handoff {failover_handoff:.2?})");
    drop((v1, v2a, v2b, manager));
    Ok(())
}

async fn start_replica(
    cp: &ControlPlane,
    bins: &Binaries,
    client: &Client,
    dir: &std::path::Path,
    manager: &str,
    pod: &'static str,
    version: &'static str,
) -> anyhow::Result<Replica> {
    Replica::start(
        cp,
        bins,
        client,
        dir,
        manager,
        "opmesh-bench/mesh",
        "opmesh-bench",
        pod,
        &[("app", "bench"), ("version", version)],
        version,
    )
    .await
}

/// A bare kube-runtime controller doing the example operator's work, until
/// every key was reconciled once. Returns the time from its start.
async fn bare_controller(client: &Client, keys: usize) -> anyhow::Result<Duration> {
    struct Ctx {
        client: Client,
        seen: Mutex<HashSet<String>>,
    }
    let ar = generator_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        seen: Mutex::default(),
    });
    let started = Instant::now();
    let controller = Controller::new_with(api, watcher::Config::default(), ar.clone())
        .owns_with(Api::<ConfigMap>::all(client.clone()), (), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(4))
        .run(
            move |obj: Arc<DynamicObject>, ctx: Arc<Ctx>| {
                let ar = ar.clone();
                async move {
                    let ns = obj.namespace().unwrap_or_default();
                    let name = obj.name_any();
                    let cm = json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": format!("{name}-generated"), "namespace": ns,
                            "ownerReferences": [{"apiVersion": "example.opmesh.io/v1", "kind": "ConfigMapGenerator",
                                "name": name, "uid": obj.uid().unwrap_or_default(), "controller": true}]},
                        "data": obj.data["spec"]["data"],
                    });
                    Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                        .patch(&format!("{name}-generated"), &PatchParams::apply("bench-baseline").force(), &Patch::Apply(&cm))
                        .await?;
                    Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &ar)
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": {"handledBy": "baseline/bare"}})))
                        .await?;
                    ctx.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(format!("{ns}/{name}"));
                    Ok::<_, kube::Error>(Action::await_change())
                }
            },
            |_, _, _| Action::requeue(Duration::from_millis(100)),
            ctx.clone(),
        )
        .for_each(|_| async {});
    let done = eventually(
        "the bare controller to reconcile every key",
        Duration::from_secs(900),
        || async {
            let n = ctx.seen.lock().unwrap_or_else(|e| e.into_inner()).len();
            Ok((n >= keys).then(|| started.elapsed()))
        },
    );
    tokio::select! {
        d = done => d,
        _ = controller => anyhow::bail!("the bare controller stopped"),
    }
}

/// Waits until every key has an `ok` record by `subset` (started after
/// `after`, if given) in the replicas' records; returns key -> end time.
async fn wait_keys(
    replicas: &[&Replica],
    keys: usize,
    after: Option<u128>,
    subset: &str,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, u128>> {
    wait_keys_where(replicas, keys, after, subset, timeout, |_| true).await
}

/// Like [`wait_keys`], counting only keys `want` accepts.
async fn wait_keys_where(
    replicas: &[&Replica],
    keys: usize,
    after: Option<u128>,
    subset: &str,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<String, u128>> {
    eventually(
        &format!("{keys} keys reconciled by {subset}"),
        timeout,
        || async {
            let mut first: BTreeMap<String, u128> = BTreeMap::new();
            for r in replicas {
                for rec in read_records(&r.records) {
                    if rec.subset == subset
                        && rec.outcome == "ok"
                        && after.is_none_or(|a| rec.start_us > a)
                        && want(&rec.key)
                    {
                        let e = first.entry(rec.key.clone()).or_insert(rec.end_us);
                        *e = (*e).min(rec.end_us);
                    }
                }
            }
            Ok((first.len() >= keys).then_some(first))
        },
    )
    .await
}

/// Waits until `replica` reconciled every key it owns; returns them.
async fn wait_settled(replica: &Replica) -> anyhow::Result<HashSet<String>> {
    eventually(
        "the new replica to settle",
        Duration::from_secs(600),
        || async {
            let owned = replica
                .metrics()
                .map(|m| gauge(&m, "opmesh_runtime_owned_keys"))
                .unwrap_or(0.0) as usize;
            let done: HashSet<String> = read_records(&replica.records)
                .into_iter()
                .filter(|r: &Record| r.outcome == "ok")
                .map(|r| r.key)
                .collect();
            Ok((owned > 0 && done.len() >= owned).then_some(done))
        },
    )
    .await
}

fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// (p50, p99, max) of `xs`.
fn percentiles(mut xs: Vec<f64>) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), xs[xs.len() - 1])
}
