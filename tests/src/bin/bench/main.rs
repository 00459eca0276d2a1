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
//!
//! `--egress` and `--scale` measure instead what the mesh costs the
//! apiserver and the machine (see [`scale`]):
//!
//! ```text
//! ./target/release/opmesh-bench --keys 10000 --egress --scale --runs 3
//! ```

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
    runtime::{
        Controller,
        controller::Action,
        reflector::{self, ObjectRef, Store, reflector},
        watcher,
    },
};
use opmesh_tests::{
    ControlPlane,
    control_plane::Options,
    eventually,
    mesh::{
        Binaries, Manager, Record, Replica, ReplicaOptions, apply_mesh, generator_resource,
        read_records,
    },
};
use serde_json::json;

mod scale;

struct Args {
    keys: usize,
    /// Apiserver egress as replicas grow (N = 1, 3, 10), mesh against
    /// client-side filtering; skips the default scenarios.
    egress: bool,
    /// The manager's memory against a reflector, and a run at this many
    /// objects with 10 replicas; skips the default scenarios.
    scale: Option<usize>,
    /// Run as the bare reflector `--scale` measures (internal).
    reflector: bool,
    /// How often `--egress` and `--scale` measure, on the same objects.
    runs: usize,
    /// Only the cache-only scenario and its baseline.
    cache_only: bool,
    /// Concurrent reconciles, of the baseline and of every sidecar.
    concurrency: u16,
}

fn args() -> anyhow::Result<Args> {
    const USAGE: &str = "usage: opmesh-bench [--keys N] [--concurrency N] [--cache-only] \
        [--egress] [--scale | --scale-objects N] [--runs N]\n\n\
        Without --egress or --scale: baselines, cold start, handoff, latency and failover, once.\n\
        --runs N repeats the --egress and --scale measurements (see docs/benchmarks.md).";
    let mut keys = 10_000;
    let mut cache_only = false;
    let mut concurrency = 4;
    let (mut egress, mut scale, mut reflector, mut runs) = (false, None, false, 1);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--keys" => keys = it.next().context("--keys needs a number")?.parse()?,
            "--cache-only" => cache_only = true,
            "--egress" => egress = true,
            "--scale" => scale = Some(100_000),
            "--scale-objects" => {
                scale = Some(
                    it.next()
                        .context("--scale-objects needs a number")?
                        .parse()?,
                )
            }
            "--reflector" => reflector = true,
            "--runs" => runs = it.next().context("--runs needs a number")?.parse()?,
            "--concurrency" => {
                concurrency = it.next().context("--concurrency needs a number")?.parse()?
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(Args {
        keys,
        egress,
        scale,
        reflector,
        runs,
        cache_only,
        concurrency,
    })
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        keys,
        egress,
        scale,
        reflector,
        runs,
        cache_only: only_cache,
        concurrency,
    } = args()?;
    if reflector {
        return scale::run_reflector().await;
    }
    eprintln!("{keys} keys, {concurrency} concurrent reconciles per controller");
    let bins = Binaries::locate()?;
    let cp = ControlPlane::start(Options::default()).await?;
    bins.install_example_crd(&cp).await?;
    let client = cp.client().await?;
    let dir = tempfile::Builder::new()
        .prefix("opmesh-bench-")
        .disable_cleanup(std::env::var_os("OPMESH_BENCH_KEEP").is_some())
        .tempdir()?;
    opmesh_tests::cluster::create_named_namespace(&client, "opmesh-bench", &[]).await?;
    let all = create_objects(&client, 0, keys).await?;
    // Latency probes (and egress's changes) go to the first 1,000 objects.
    let targets: Vec<(String, String)> = all.iter().take(1000).cloned().collect();
    if egress || scale.is_some() {
        let bench = scale::Bench {
            cp: &cp,
            bins: &bins,
            client: &client,
            dir: dir.path(),
            concurrency,
        };
        // Egress first, over the first `keys` objects only.
        let mut reference = Vec::new();
        if egress {
            for run in 1..=runs {
                reference.push(scale::egress(&bench, run, keys, &targets).await?);
            }
        }
        if let Some(objects) = scale {
            if objects > keys {
                create_objects(&client, keys, objects).await?;
            }
            for run in 1..=runs {
                let same = reference.get(run - 1).copied();
                scale::scale(&bench, run, objects.max(keys), same).await?;
            }
        }
        return Ok(());
    }

    // 1. Baselines: a bare kube-runtime controller, cold. The first run
    // installs (creates every ConfigMap); the second is what a restart-based
    // rollout costs; the third does no writes at all.
    let with_writes = if only_cache {
        None
    } else {
        eprintln!("baseline: bare kube-runtime controller, first install...");
        let install =
            bare_controller(&client, keys, concurrency, Work::Writes("baseline/install")).await?;
        eprintln!("baseline install reconciled {keys} keys in {install:.2?}");
        let restart =
            bare_controller(&client, keys, concurrency, Work::Writes("baseline/restart")).await?;
        eprintln!("baseline restart reconciled {keys} keys in {restart:.2?}");
        Some((install, restart))
    };
    // Latency probes after the cold start.
    let probes = [
        Probe { rate: 100, secs: 5 },
        Probe {
            rate: 1000,
            secs: 3,
        },
    ];
    let (dry, bare_latency) =
        bare_controller_probed(&client, keys, concurrency, Work::None, &targets, &probes).await?;
    eprintln!("baseline without writes reconciled {keys} keys in {dry:.2?}");

    // 2. and 3. The mesh, once with an operator that reads its cache and
    // writes nothing (the mesh's own cost), once with the example operator's
    // writes.
    // A manager that routes already, as one in a cluster has for long: a
    // manager that has just started assigns nothing until any lease an
    // earlier one granted has run out, which is not the operator's cost.
    let health = opmesh_tests::control_plane::free_port()?;
    let manager = Manager::start_with(
        &cp,
        &bins,
        dir.path(),
        "opmesh-bench",
        opmesh_tests::control_plane::free_port()?,
        None,
        &[("OPMESH_HEALTH_LISTEN", &format!("127.0.0.1:{health}"))],
    )
    .await?;
    eventually("the manager to route", Duration::from_secs(60), || async {
        let ready = opmesh_tests::mesh::http_get(health, "/readyz").is_some_and(|(c, _)| c == 200);
        Ok(ready.then_some(()))
    })
    .await?;
    let ttl = opmesh_tests::mesh::LEASE_TTL;
    let setup = Setup {
        cp: &cp,
        bins: &bins,
        client: &client,
        dir: dir.path(),
        manager: manager.addr(),
        keys,
        concurrency: concurrency.to_string(),
        targets: &targets,
    };
    let cache_only = setup
        .scenario("dry", &[("OPMESH_EXAMPLE_DRY_RUN", "true")], &probes)
        .await?;
    let writes = match with_writes {
        Some(base) => Some((setup.scenario("writes", &[], &[]).await?, base)),
        None => None,
    };

    println!("| measurement | value | ratio |");
    println!("|---|---|---|");
    let secs = |d: Duration| d.as_secs_f64();
    if let Some((_, (install, restart))) = &writes {
        println!(
            "| baseline: bare kube-runtime controller, first install (creates {keys} ConfigMaps) | {:.2} s | {:.2} × A |",
            secs(*install),
            secs(*install) / secs(*restart)
        );
        println!(
            "| **baseline A**: bare controller restarted, cold start to all {keys} keys reconciled (one status write each) | {:.2} s | 1.00 |",
            secs(*restart)
        );
    }
    println!(
        "| **baseline B**: bare controller without writes, cold start to all {keys} keys reconciled | {:.2} s | 1.00 |",
        secs(dry)
    );
    let mut rows = vec![("cache-only reconcile", &cache_only, dry, "B")];
    if let Some((sc, (_, restart))) = &writes {
        rows.push((
            "example operator (one status write per moved key)",
            sc,
            *restart,
            "A",
        ));
    }
    for (name, sc, base, base_name) in rows {
        let r = |d: f64| d / secs(base);
        println!(
            "| {name}: initial assignment to all keys reconciled (v1) | {:.2} s | {:.2} × {base_name} |",
            secs(sc.initial),
            r(secs(sc.initial))
        );
        println!(
            "| {name}: weight change moving {keys} keys, handoff until v2 owns all | {:.2} s | {:.2} × {base_name} |",
            secs(sc.handoff),
            r(secs(sc.handoff))
        );
        println!(
            "| {name}: weight change, per-key time to reconciled by v2, p50 / p99 / max | {:.2} / {:.2} / {:.2} s | p99 = {:.2} × {base_name} |",
            sc.moved.0,
            sc.moved.1,
            sc.moved.2,
            r(sc.moved.1)
        );
        println!(
            "| {name}: crash failover (kill -9, {} keys), handoff until the survivor owns them | {:.2} s | {:.2} × lease TTL ({:.1} s) |",
            sc.orphaned,
            secs(sc.failover_handoff),
            secs(sc.failover_handoff) / secs(ttl),
            secs(ttl)
        );
        println!(
            "| {name}: crash failover, per-key time to reconciled elsewhere, p50 / p99 / max | {:.2} / {:.2} / {:.2} s | p99 = {:.2} × lease TTL |",
            sc.failover.0,
            sc.failover.1,
            sc.failover.2,
            sc.failover.1 / secs(ttl)
        );
    }
    for (probe, (bare, mesh)) in probes
        .iter()
        .zip(bare_latency.iter().zip(&cache_only.latency))
    {
        println!(
            "| change to reconcile start at {} changes/s ({} sent, {:.0}/s achieved for the mesh, {:.0}/s bare), p50 / p99 / max | mesh {:.1} / {:.1} / {:.1} ms, bare {:.1} / {:.1} / {:.1} ms | p99 added {:+.1} ms |",
            probe.rate,
            mesh.sent,
            mesh.achieved_rate,
            bare.achieved_rate,
            mesh.p50,
            mesh.p99,
            mesh.max,
            bare.p50,
            bare.p99,
            bare.max,
            mesh.p99 - bare.p99
        );
    }

    // Each goal next to what this run measured.
    println!();
    println!("| goal | measured | verdict |");
    println!("|---|---|---|");
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let cold = secs(cache_only.initial) / secs(dry);
    println!(
        "| throughput: cold start, cache-only, <= 1.3 x bare | {cold:.2} x | {} |",
        verdict(cold <= 1.3)
    );
    for (probe, (bare, mesh)) in probes
        .iter()
        .zip(bare_latency.iter().zip(&cache_only.latency))
    {
        let added = mesh.p99 - bare.p99;
        // A rate this machine could not sustain compares two saturated
        // systems, not the mesh's added latency.
        let reached = |l: &Latency| l.achieved_rate >= 0.9 * f64::from(probe.rate);
        let v = if reached(mesh) && reached(bare) {
            verdict(added <= 2.0).to_string()
        } else {
            format!(
                "MISS (rate not reached: {:.0}/s mesh, {:.0}/s bare)",
                mesh.achieved_rate, bare.achieved_rate
            )
        };
        println!(
            "| latency at {}/s: <= 2 ms added at p99 | {added:+.1} ms | {v} |",
            probe.rate
        );
    }
    println!(
        "| handoff: per-key p99 after moving {keys} keys <= 1 s | {:.2} s | {} |",
        cache_only.moved.1,
        verdict(cache_only.moved.1 <= 1.0)
    );
    println!(
        "| crash failover: per-key p99 <= TTL + 0.5 s ({:.1} s) | {:.2} s | {} |",
        secs(ttl) + 0.5,
        cache_only.failover.1,
        verdict(cache_only.failover.1 <= secs(ttl) + 0.5)
    );
    println!(
        "| manager routing >= 100,000 events/s per core | `cargo bench -p opmesh-manager --bench routing` | see there |"
    );
    for goal in [
        "apiserver egress at N = 10 <= 1.1 x N = 1",
        "manager RSS with 100,000 objects <= 1.2 x a reflector",
        "runtime RSS grows with its slice, not the cluster",
        "100,000 objects in 1,000 namespaces, 10 replicas",
    ] {
        println!("| {goal} | `opmesh-bench --egress --scale` | see there |");
    }
    drop(manager);
    Ok(())
}

/// Creates objects `from..to`, 100 per namespace (`bench-<i / 100>`,
/// `obj-<i>`), and returns every key `0..to` as (namespace, name).
async fn create_objects(
    client: &Client,
    from: usize,
    to: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let per_ns = 100usize;
    let all: Vec<(String, String)> = (0..to)
        .map(|i| (format!("bench-{:04}", i / per_ns), format!("obj-{i:05}")))
        .collect();
    // A namespace part-filled before already exists.
    for n in from.div_ceil(per_ns)..to.div_ceil(per_ns) {
        opmesh_tests::cluster::create_named_namespace(client, &format!("bench-{n:04}"), &[])
            .await?;
    }
    eprintln!("creating {} objects...", to.saturating_sub(from));
    let t = Instant::now();
    futures::stream::iter(all[from.min(to)..].iter().cloned())
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
    Ok(all)
}

/// What one mesh scenario measured.
struct Scenario {
    /// Change-to-reconcile latency, per probe, once v2 owns every key.
    latency: Vec<Latency>,
    initial: Duration,
    handoff: Duration,
    /// (p50, p99, max) seconds from the weight change to reconciled by v2.
    moved: (f64, f64, f64),
    orphaned: usize,
    failover_handoff: Duration,
    /// (p50, p99, max) seconds from the kill to reconciled by the survivor.
    failover: (f64, f64, f64),
}

/// What every scenario shares.
struct Setup<'a> {
    cp: &'a ControlPlane,
    bins: &'a Binaries,
    client: &'a Client,
    dir: &'a std::path::Path,
    manager: &'a str,
    keys: usize,
    concurrency: String,
    /// The objects latency probes change.
    targets: &'a [(String, String)],
}

impl Setup<'_> {
    /// Mesh `mesh-<name>` over replicas `<name>-v1-0`, `<name>-v2-0` and
    /// `<name>-v2-1`: v1 owns every key, the weights flip to v2, a second v2
    /// replica joins and the first is killed with -9.
    async fn scenario(
        &self,
        name: &str,
        operator_env: &[(&str, &str)],
        probes: &[Probe],
    ) -> anyhow::Result<Scenario> {
        let mut env = vec![(
            "OPMESH_MAX_CONCURRENT_RECONCILES",
            self.concurrency.as_str(),
        )];
        env.extend_from_slice(operator_env);
        let operator_env = env.as_slice();
        let keys = self.keys;
        let mesh_name = format!("mesh-{name}");
        let app = format!("bench-{name}");
        let mesh = |v2: u32| {
            json!({
                "selector": {"matchLabels": {"app": app}},
                "controllers": opmesh_tests::mesh::example_controllers(),
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
                "routing": {"weights": [{"subset": "v1", "weight": 100 - v2}, {"subset": "v2", "weight": v2}], "exclude": ["opmesh-bench"]},
            })
        };
        apply_mesh(self.client, "opmesh-bench", &mesh_name, mesh(0)).await?;
        let start = |pod: String, version: &'static str| {
            let (mesh_name, app) = (mesh_name.clone(), app.clone());
            async move {
                Replica::start(
                    self.client,
                    &ReplicaOptions {
                        cp: self.cp,
                        bins: self.bins,
                        dir: self.dir,
                        manager: self.manager,
                        mesh: &format!("opmesh-bench/{mesh_name}"),
                        namespace: "opmesh-bench",
                        pod: &pod,
                        labels: &[("app", &app), ("version", version)],
                        version,
                        extra_env: operator_env,
                        operator_env: &[],
                    },
                )
                .await
            }
        };
        eprintln!("[{name}] v1 takes every key...");
        let v2a = start(format!("{name}-v2-0"), "v2").await?;
        // v2 (weight 0) joins first, so the manager watches and lists the
        // objects before v1 starts, as in a cluster where another version's
        // pods are already connected when new ones roll in: what is timed
        // below is v1's cold start.
        let meshes: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            "opmesh-bench",
            &opmesh_tests::mesh::mesh_resource(),
        );
        eventually(
            "the manager to route every object",
            Duration::from_secs(120),
            || async {
                let m = meshes.get(&mesh_name).await?;
                let routed: u64 = m.data["status"]["subsets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["routedKeys"].as_u64())
                    .sum();
                Ok((routed >= keys as u64).then_some(()))
            },
        )
        .await?;
        let v1 = start(format!("{name}-v1-0"), "v1").await?;
        let (t, t_us) = (Instant::now(), now_us());
        wait_keys(&[&v1], keys, None, "v1", Duration::from_secs(600)).await?;
        let initial = t.elapsed();
        // Where the time went: until the first reconcile started (sessions,
        // the manager's first assignment), then working through the keys.
        let first = read_records(&v1.records)
            .iter()
            .map(|r| r.start_us)
            .min()
            .unwrap_or(t_us);
        eprintln!(
            "[{name}] initial assignment reconciled in {initial:.2?}; the first reconcile started after {:.2}s",
            first.saturating_sub(t_us) as f64 / 1e6
        );

        // Weight flip: every key moves to v2.
        let flip_at = now_us();
        let t = Instant::now();
        apply_mesh(self.client, "opmesh-bench", &mesh_name, mesh(100)).await?;
        let handoff = eventually("v2 to own every key", Duration::from_secs(600), || async {
            Ok((owned(&v2a) >= keys).then(|| t.elapsed()))
        })
        .await?;
        let moved = wait_keys(&[&v2a], keys, Some(flip_at), "v2", Duration::from_secs(600)).await?;
        let moved = percentiles(
            moved
                .values()
                .map(|end| (end - flip_at) as f64 / 1e6)
                .collect(),
        );
        eprintln!(
            "[{name}] weight change: handoff {handoff:.2?}, reconciled p50 {:.2}s p99 {:.2}s max {:.2}s",
            moved.0, moved.1, moved.2
        );

        // Steady changes while v2 owns every key.
        let mut latency = Vec::new();
        for probe in probes {
            let starts = || {
                read_records(&v2a.records)
                    .into_iter()
                    .map(|r| (r.key, r.generation, r.start_us))
                    .collect()
            };
            let l = probe.run(self.client, self.targets, starts).await?;
            eprintln!("[{name}] {probe:?}: {l:?}");
            latency.push(l);
        }

        // Crash failover: a second v2 replica shares the keys; kill the first.
        let v2b = start(format!("{name}-v2-1"), "v2").await?;
        eventually(
            "the v2 replicas to split the keys",
            Duration::from_secs(600),
            || async {
                let (a, b) = (owned(&v2a), owned(&v2b));
                Ok((a + b == keys && b > 0 && v2b.ready()).then_some(()))
            },
        )
        .await?;
        // Let the newcomer catch up on the keys it received, so what follows
        // measures failover.
        let b_keys: HashSet<String> = wait_settled(&v2b).await?;
        let orphaned = keys - b_keys.len();
        let kill_at = now_us();
        v2a.sidecar.signal("KILL").await?;
        v2a.operator.signal("KILL").await?;
        let t = Instant::now();
        let failover_handoff = eventually(
            "the survivor to own every key",
            Duration::from_secs(600),
            || async { Ok((owned(&v2b) >= keys).then(|| t.elapsed())) },
        )
        .await?;
        let took_over = wait_keys_where(
            &[&v2b],
            orphaned,
            Some(kill_at),
            "v2",
            Duration::from_secs(600),
            |k| !b_keys.contains(k),
        )
        .await?;
        let failover = percentiles(
            took_over
                .values()
                .map(|end| (end - kill_at) as f64 / 1e6)
                .collect(),
        );
        eprintln!(
            "[{name}] failover of {orphaned} keys: handoff {failover_handoff:.2?}, p50 {:.2}s p99 {:.2}s max {:.2}s",
            failover.0, failover.1, failover.2
        );
        drop((v1, v2a, v2b));
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            "opmesh-bench",
            &opmesh_tests::mesh::mesh_resource(),
        );
        api.delete(&mesh_name, &Default::default()).await?;
        Ok(Scenario {
            latency,
            initial,
            handoff,
            moved,
            orphaned,
            failover_handoff,
            failover,
        })
    }
}

/// The keys a replica's sidecar says it owns.
fn owned(replica: &Replica) -> usize {
    replica
        .metrics()
        .map(|m| gauge(&m, "opmesh_runtime_owned_keys"))
        .unwrap_or(0.0) as usize
}

/// What the baseline controller's reconcile does.
#[derive(Clone, Copy)]
enum Work {
    /// The example operator's work: apply the ConfigMap unless the cached one
    /// matches, patch `status.handledBy` to this value unless it already is.
    Writes(&'static str),
    /// Nothing: mark the key reconciled.
    None,
}

/// A bare kube-runtime controller (concurrency 4, like the sidecars in the
/// bench), from a cold start until every key was reconciled once. Returns
/// the time from its start.
async fn bare_controller(
    client: &Client,
    keys: usize,
    concurrency: u16,
    work: Work,
) -> anyhow::Result<Duration> {
    Ok(
        bare_controller_probed(client, keys, concurrency, work, &[], &[])
            .await?
            .0,
    )
}

/// [`bare_controller`], then, while it runs on, each of `probes` on
/// `targets`: the cold start, and the latency each probe measured.
async fn bare_controller_probed(
    client: &Client,
    keys: usize,
    concurrency: u16,
    work: Work,
    targets: &[(String, String)],
    probes: &[Probe],
) -> anyhow::Result<(Duration, Vec<Latency>)> {
    struct Ctx {
        client: Client,
        configmaps: Store<ConfigMap>,
        seen: Mutex<HashSet<String>>,
        /// (key, generation, start µs) of every reconcile.
        starts: Mutex<Vec<(String, i64, u128)>>,
    }
    let started = Instant::now();
    let (configmaps, writer) = reflector::store::<ConfigMap>();
    // The ConfigMap cache is synced before the first reconcile, as a
    // controller's owned-object cache is.
    let cm_watch = tokio::spawn(
        reflector(
            writer,
            watcher::watcher(
                Api::<ConfigMap>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .for_each(|_| async {}),
    );
    let _abort = AbortOnDrop(cm_watch.abort_handle());
    configmaps.wait_until_ready().await?;
    let ar = generator_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        configmaps,
        seen: Mutex::default(),
        starts: Mutex::default(),
    });
    let controller = Controller::new_with(api, watcher::Config::default(), ar.clone())
        .owns_with(Api::<ConfigMap>::all(client.clone()), (), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .run(
            move |obj: Arc<DynamicObject>, ctx: Arc<Ctx>| {
                let ar = ar.clone();
                async move {
                    let ns = obj.namespace().unwrap_or_default();
                    let name = obj.name_any();
                    ctx.starts.lock().unwrap_or_else(|e| e.into_inner()).push((
                        format!("{ns}/{name}"),
                        obj.metadata.generation.unwrap_or_default(),
                        now_us(),
                    ));
                    if let Work::Writes(handled_by) = work {
                        let cm_name = format!("{name}-generated");
                        let uid = obj.uid().unwrap_or_default();
                        let current = ctx.configmaps.get(&ObjectRef::new(&cm_name).within(&ns));
                        let cm_current = current.is_some_and(|cm| {
                            serde_json::to_value(cm.data.clone().unwrap_or_default()).ok().as_ref()
                                == Some(&obj.data["spec"]["data"])
                                && cm.owner_references().iter().any(|o| o.uid == uid)
                        });
                        if !cm_current {
                            let cm = json!({
                                "apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": cm_name, "namespace": ns,
                                    "ownerReferences": [{"apiVersion": "example.opmesh.io/v1", "kind": "ConfigMapGenerator",
                                        "name": name, "uid": uid, "controller": true}]},
                                "data": obj.data["spec"]["data"],
                            });
                            Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                                .patch(&cm_name, &PatchParams::apply("bench-baseline").force(), &Patch::Apply(&cm))
                                .await?;
                        }
                        if obj.data["status"]["handledBy"] != handled_by {
                            Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &ar)
                                .patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": {"handledBy": handled_by}})))
                                .await?;
                        }
                    }
                    ctx.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(format!("{ns}/{name}"));
                    Ok::<_, kube::Error>(Action::await_change())
                }
            },
            |_, e, _| {
                eprintln!("baseline reconcile failed: {e}");
                Action::requeue(Duration::from_millis(100))
            },
            ctx.clone(),
        )
        .for_each(|_| async {});
    tokio::pin!(controller);
    let done = eventually(
        "the bare controller to reconcile every key",
        Duration::from_secs(900),
        || async {
            let n = ctx.seen.lock().unwrap_or_else(|e| e.into_inner()).len();
            Ok((n >= keys).then(|| started.elapsed()))
        },
    );
    let cold = tokio::select! {
        d = done => d?,
        _ = &mut controller => anyhow::bail!("the bare controller stopped"),
    };
    let mut measured = Vec::new();
    for probe in probes {
        let starts = || ctx.starts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let run = probe.run(client, targets, starts);
        measured.push(tokio::select! {
            l = run => l?,
            _ = &mut controller => anyhow::bail!("the bare controller stopped"),
        });
    }
    Ok((cold, measured))
}

/// A steady stream of changes: `rate` per second for `secs` seconds,
/// round-robin over the targets.
#[derive(Clone, Copy, Debug)]
struct Probe {
    rate: u32,
    secs: u32,
}

/// What one probe measured: from each change's request to the start of
/// the first reconcile that saw its generation.
#[derive(Clone, Copy, Debug, Default)]
struct Latency {
    /// Changes sent, and the rate achieved.
    sent: usize,
    achieved_rate: f64,
    /// Milliseconds: p50, p99, max.
    p50: f64,
    p99: f64,
    max: f64,
}

impl Probe {
    /// Sends the changes, then waits until a reconcile started for each
    /// (as `starts` lists them: key, generation, start µs).
    async fn run(
        &self,
        client: &Client,
        targets: &[(String, String)],
        starts: impl Fn() -> Vec<(String, i64, u128)>,
    ) -> anyhow::Result<Latency> {
        let count = (self.rate * self.secs) as usize;
        let began = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(self.rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut sent: Vec<(String, i64, u128)> = Vec::with_capacity(count);
        for i in 0..count {
            tick.tick().await;
            let (ns, name) = targets[i % targets.len()].clone();
            let client = client.clone();
            inflight.push(tokio::spawn(async move {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client, &ns, &generator_resource());
                let at = now_us();
                let obj = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"data": {"probe": at.to_string()}}})),
                    )
                    .await?;
                anyhow::Ok((
                    format!("{ns}/{name}"),
                    obj.metadata.generation.unwrap_or_default(),
                    at,
                ))
            }));
            // Collect what finished, without waiting.
            while let Some(Some(done)) =
                futures::FutureExt::now_or_never(futures::StreamExt::next(&mut inflight))
            {
                sent.push(done??);
            }
        }
        while let Some(done) = futures::StreamExt::next(&mut inflight).await {
            sent.push(done??);
        }
        let achieved_rate = count as f64 / began.elapsed().as_secs_f64();
        let latencies = eventually(
            "a reconcile of every change",
            Duration::from_secs(120),
            || async {
                let mut first: std::collections::HashMap<&str, Vec<(i64, u128)>> =
                    std::collections::HashMap::new();
                let all = starts();
                for (k, g, at) in &all {
                    first.entry(k.as_str()).or_default().push((*g, *at));
                }
                let mut out = Vec::with_capacity(sent.len());
                for (k, g, at) in &sent {
                    let seen = first
                        .get(k.as_str())
                        .into_iter()
                        .flatten()
                        .filter(|(rg, _)| rg >= g)
                        .map(|(_, t)| *t)
                        .min();
                    match seen {
                        Some(t) => out.push(t.saturating_sub(*at) as f64 / 1000.0),
                        None => return Ok(None),
                    }
                }
                Ok(Some(out))
            },
        )
        .await?;
        let (p50, p99, max) = percentiles(latencies);
        Ok(Latency {
            sent: sent.len(),
            achieved_rate,
            p50,
            p99,
            max,
        })
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
