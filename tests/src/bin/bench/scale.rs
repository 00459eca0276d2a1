//! What the mesh costs the apiserver and the machine: the bytes the
//! apiserver sends as replicas grow, against replicas that each watch
//! everything and filter client-side; the manager's memory against a bare
//! reflector holding the same objects; and a run at 100,000 objects.
//!
//! Every process under measurement reaches the apiserver through its own
//! counting proxy on loopback, so the bytes are what crossed the wire (TLS
//! records included). Memory is the kernel's resident set (`VmRSS`) and its
//! peak (`VmHWM`) from `/proc/<pid>/status`.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DynamicObject, Patch, PatchParams},
    runtime::{Controller, controller::Action, reflector, watcher},
};
use opmesh_tests::{
    ControlPlane,
    control_plane::{client_from_kubeconfig, free_port},
    eventually,
    mesh::{
        Binaries, Manager, Replica, ReplicaOptions, apply_mesh, generator_resource, read_records,
    },
    proxy::Proxy,
};
use serde_json::json;

use super::{AbortOnDrop, now_us};

/// What every measurement here shares.
pub(crate) struct Bench<'a> {
    pub(crate) cp: &'a ControlPlane,
    pub(crate) bins: &'a Binaries,
    pub(crate) client: &'a Client,
    pub(crate) dir: &'a Path,
    pub(crate) concurrency: u16,
}

/// Resident and peak memory of one process, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Memory {
    pub(crate) rss_kib: u64,
    pub(crate) peak_kib: u64,
}

impl Memory {
    /// Reads `VmRSS` and `VmHWM` of `pid`.
    pub(crate) fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Ok(Self {
            rss_kib: field("VmRSS:"),
            peak_kib: field("VmHWM:"),
        })
    }

    /// Resident MiB.
    pub(crate) fn mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// Peak MiB.
    pub(crate) fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// What one mesh run measured.
pub(crate) struct MeshRun {
    /// From the manager's start until every key was reconciled once.
    pub(crate) sync: Duration,
    /// From the manager's start until the first reconcile started: process
    /// start-up, the manager's list, and its wait of one lease TTL before it
    /// grants anything (an earlier manager's leases may still run).
    pub(crate) first: Duration,
    /// Bytes the apiserver sent the manager, sidecars and operators, from
    /// their start until the last change was reconciled.
    pub(crate) bytes: u64,
    pub(crate) manager: Memory,
    /// Per replica: keys it owns, its sidecar's and its operator's memory.
    pub(crate) replicas: Vec<(usize, Memory, Memory)>,
}

/// What one run of client-side filtering replicas measured.
pub(crate) struct FilterRun {
    pub(crate) sync: Duration,
    pub(crate) bytes: u64,
}

impl Bench<'_> {
    /// A fresh manager and `n` replicas of one subset, all reaching the
    /// apiserver through one counting proxy: timed from the manager's start
    /// until every one of `keys` objects was reconciled, then `changes`
    /// patches of `targets`, each waited for until a reconcile saw it.
    pub(crate) async fn mesh(
        &self,
        name: &str,
        n: usize,
        keys: usize,
        targets: &[(String, String)],
        changes: usize,
    ) -> anyhow::Result<MeshRun> {
        let Self {
            cp,
            bins,
            client,
            dir,
            ..
        } = *self;
        opmesh_tests::cluster::create_named_namespace(client, name, &[]).await?;
        let kubeconfig = dir.join(format!("{name}.kubeconfig"));
        let proxy = Proxy::to_apiserver(cp, &kubeconfig).await?;
        let kubeconfig = kubeconfig.display().to_string();
        let concurrency = self.concurrency.to_string();
        let (t, t_us) = (Instant::now(), now_us());
        let manager = Manager::start_with(
            cp,
            bins,
            dir,
            name,
            free_port()?,
            None,
            &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", "info")],
        )
        .await?;
        apply_mesh(
            client,
            name,
            "mesh",
            json!({
                "selector": {"matchLabels": {"app": name}},
                "controllers": opmesh_tests::mesh::example_controllers(),
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                "routing": {"weights": [{"subset": "v1", "weight": 100}], "exclude": [name]},
            }),
        )
        .await?;
        let mesh = format!("{name}/mesh");
        let env = [
            ("KUBECONFIG", kubeconfig.as_str()),
            ("OPMESH_MAX_CONCURRENT_RECONCILES", concurrency.as_str()),
            ("OPMESH_EXAMPLE_DRY_RUN", "true"),
            ("RUST_LOG", "info"),
        ];
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let pod = format!("{name}-{i}");
            replicas.push(
                Replica::start(
                    client,
                    &ReplicaOptions {
                        cp,
                        bins,
                        dir,
                        manager: manager.addr(),
                        mesh: &mesh,
                        namespace: name,
                        pod: &pod,
                        labels: &[("app", name), ("version", "v1")],
                        version: "v1",
                        extra_env: &env,
                        operator_env: &[],
                    },
                )
                .await?,
            );
        }
        let (first, done) = all_reconciled(&replicas, keys).await?;
        let sync = Duration::from_micros(done.saturating_sub(t_us) as u64);
        let first = Duration::from_micros(first.saturating_sub(t_us) as u64);
        eprintln!(
            "[{name}] {n} replicas reconciled {keys} keys {sync:.2?} after the manager started ({:.1?} to see it)",
            t.elapsed()
        );
        if changes > 0 {
            changes_reconciled(client, targets, changes, || {
                let mut latest: HashMap<String, i64> = HashMap::new();
                for r in &replicas {
                    for rec in read_records(&r.records) {
                        let g = latest.entry(rec.key).or_default();
                        *g = (*g).max(rec.generation);
                    }
                }
                latest
            })
            .await?;
        }
        let bytes = proxy.bytes_to_clients();
        let pid = |p: Option<u32>| p.context("a process has no pid");
        let manager_memory = Memory::of(pid(manager.process().pid().await)?)?;
        let mut memory = Vec::with_capacity(n);
        for r in &replicas {
            memory.push((
                super::owned(r),
                Memory::of(pid(r.sidecar.pid().await)?)?,
                Memory::of(pid(r.operator.pid().await)?)?,
            ));
        }
        drop(replicas);
        drop(manager);
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), name, &opmesh_tests::mesh::mesh_resource());
        api.delete("mesh", &Default::default()).await?;
        Ok(MeshRun {
            sync,
            first,
            bytes,
            manager: manager_memory,
            replicas: memory,
        })
    }

    /// `n` bare kube-runtime controllers, each with its own client, each
    /// watching every object (and every ConfigMap, as the mesh's manager
    /// does for the operator) and reconciling only the keys its shard of a
    /// hash owns, as sharding libraries without server-side filtering do.
    /// Timed and measured like [`Bench::mesh`].
    pub(crate) async fn filtering(
        &self,
        name: &str,
        n: usize,
        keys: usize,
        targets: &[(String, String)],
        changes: usize,
    ) -> anyhow::Result<FilterRun> {
        let kubeconfig = self.dir.join(format!("{name}.kubeconfig"));
        let proxy = Proxy::to_apiserver(self.cp, &kubeconfig).await?;
        let seen: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
        let t = Instant::now();
        let mut running = Vec::with_capacity(n);
        for shard in 0..n {
            let client = client_from_kubeconfig(&kubeconfig).await?;
            let task = tokio::spawn(filtering_controller(
                client,
                shard,
                n,
                self.concurrency,
                seen.clone(),
            ));
            running.push(AbortOnDrop(task.abort_handle()));
        }
        let reconciled = || seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sync = eventually(
            "the filtering replicas to reconcile every key",
            Duration::from_secs(900),
            || async { Ok((reconciled().len() >= keys).then(|| t.elapsed())) },
        )
        .await?;
        eprintln!("[{name}] {n} filtering replicas reconciled {keys} keys in {sync:.2?}");
        if changes > 0 {
            changes_reconciled(self.client, targets, changes, reconciled).await?;
        }
        let bytes = proxy.bytes_to_clients();
        drop(running);
        Ok(FilterRun { sync, bytes })
    }

    /// Starts this binary as a bare reflector over every object (a separate
    /// process, so its memory is its own), waits until it has listed them
    /// and returns its memory then.
    pub(crate) async fn reflector(&self, keys: usize) -> anyhow::Result<(Duration, Memory)> {
        use tokio::io::AsyncBufReadExt as _;
        let t = Instant::now();
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--reflector")
            .env("KUBECONFIG", self.cp.kubeconfig())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("the reflector has no pid")?;
        let stdout = child.stdout.take().context("the reflector has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(600), lines.next_line())
            .await
            .context("the reflector did not sync within 600 s")??
            .context("the reflector exited before it synced")?;
        let held: usize = line
            .strip_prefix("synced ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the reflector said {line:?}"))?;
        anyhow::ensure!(held >= keys, "the reflector holds {held} of {keys} objects");
        let synced = t.elapsed();
        let memory = Memory::of(pid)?;
        child.kill().await?;
        Ok((synced, memory))
    }
}

/// The reflector process: lists and watches every generator, says `synced
/// <count>` on stdout once its store is ready, then holds it until killed.
pub(crate) async fn run_reflector() -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let ar = generator_resource();
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let watch = reflector::reflector(
        writer,
        watcher::watcher(
            Api::<DynamicObject>::all_with(client, &ar),
            watcher::Config::default(),
        ),
    )
    .for_each(|_| async {});
    let announce = async {
        store.wait_until_ready().await?;
        println!("synced {}", store.len());
        anyhow::Ok(())
    };
    tokio::pin!(watch);
    tokio::select! {
        r = announce => r?,
        _ = &mut watch => anyhow::bail!("the reflector's watch ended"),
    }
    watch.await;
    Ok(())
}

/// One client-side filtering replica: reconciles (records the generation
/// of) the keys whose hash lands on `shard` of `shards`, drops the rest.
async fn filtering_controller(
    client: Client,
    shard: usize,
    shards: usize,
    concurrency: u16,
    seen: Arc<Mutex<HashMap<String, i64>>>,
) {
    let ar = generator_resource();
    Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &ar),
        watcher::Config::default(),
        ar,
    )
    .owns_with(
        Api::<ConfigMap>::all(client),
        (),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
    .run(
        move |obj: Arc<DynamicObject>, seen: Arc<Mutex<HashMap<String, i64>>>| async move {
            let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
            if shard_of(&key, shards) == shard {
                let generation = obj.metadata.generation.unwrap_or_default();
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let g = seen.entry(key).or_default();
                *g = (*g).max(generation);
            }
            Ok::<_, kube::Error>(Action::await_change())
        },
        |_, e, _| {
            eprintln!("filtering reconcile failed: {e}");
            Action::requeue(Duration::from_millis(100))
        },
        seen,
    )
    .for_each(|_| async {})
    .await;
}

/// The shard a key's FNV-1a hash lands on.
fn shard_of(key: &str, shards: usize) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % shards as u64) as usize
}

/// Patches `count` of `targets` (round-robin, 16 at a time); returns each
/// change's key and the generation it made.
async fn change(
    client: &Client,
    targets: &[(String, String)],
    count: usize,
) -> anyhow::Result<Vec<(String, i64)>> {
    let at = now_us();
    futures::stream::iter(0..count)
        .map(|i| {
            let (ns, name) = targets[i % targets.len()].clone();
            let client = client.clone();
            async move {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client, &ns, &generator_resource());
                let obj = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"data": {"egress": format!("{at}-{i}")}}})),
                    )
                    .await?;
                anyhow::Ok((
                    format!("{ns}/{name}"),
                    obj.metadata.generation.unwrap_or_default(),
                ))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Makes `count` changes to `targets` (see [`change`]), then waits until
/// `reconciled` (key -> newest generation reconciled) shows each.
async fn changes_reconciled(
    client: &Client,
    targets: &[(String, String)],
    count: usize,
    reconciled: impl Fn() -> HashMap<String, i64>,
) -> anyhow::Result<()> {
    let sent = change(client, targets, count).await?;
    eventually(
        "every change to be reconciled",
        Duration::from_secs(300),
        || async {
            let latest = reconciled();
            Ok(sent
                .iter()
                .all(|(k, g)| latest.get(k).is_some_and(|seen| seen >= g))
                .then_some(()))
        },
    )
    .await
}

/// Waits until every one of `keys` objects has a successful reconcile in
/// the replicas' records; returns when the first reconcile started and when
/// the last key's first successful reconcile ended (µs since the epoch).
/// Polls the sidecars' counters, which are cheap, before it
/// reads the records.
async fn all_reconciled(replicas: &[Replica], keys: usize) -> anyhow::Result<(u128, u128)> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        for r in replicas {
            r.check_running()?;
        }
        let successes: f64 = replicas
            .iter()
            .filter_map(|r| r.metrics())
            .flat_map(|m| {
                m.lines()
                    .filter(|l| {
                        l.starts_with("controller_runtime_reconcile_total{")
                            && l.contains(r#"result="success""#)
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum();
        if successes as usize >= keys {
            let mut first: HashMap<String, u128> = HashMap::with_capacity(keys);
            let mut began = u128::MAX;
            for r in replicas {
                for rec in read_records(&r.records) {
                    began = began.min(rec.start_us);
                    if rec.outcome == "ok" {
                        let e = first.entry(rec.key).or_insert(rec.end_us);
                        *e = (*e).min(rec.end_us);
                    }
                }
            }
            if first.len() >= keys {
                return Ok((began, first.into_values().max().unwrap_or_default()));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {keys} keys to be reconciled ({successes} successful reconciles)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = xs
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    sum / n.max(1) as f64
}

fn max(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(0.0, f64::max)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

impl MeshRun {
    fn sidecars(&self) -> impl Iterator<Item = f64> + '_ {
        self.replicas.iter().map(|r| r.1.mib())
    }

    fn operators(&self) -> impl Iterator<Item = f64> + '_ {
        self.replicas.iter().map(|r| r.2.mib())
    }

    /// Keys per replica, on average.
    fn slice(&self) -> f64 {
        mean(self.replicas.iter().map(|r| r.0 as f64))
    }
}

/// A sidecar's memory with a known slice, for comparison at scale.
#[derive(Clone, Copy)]
pub(crate) struct SliceMemory {
    keys: f64,
    cluster: usize,
    sidecar_mib: f64,
}

/// Egress run `run`: the mesh and client-side filtering at N = 1, 3 and
/// 10 over every object there is (`keys`), each until all were reconciled
/// and 1,000 changes of `targets` after that too. Prints the figures and
/// the goal's verdict; returns the N = 1 sidecar's memory.
pub(crate) async fn egress(
    b: &Bench<'_>,
    run: usize,
    keys: usize,
    targets: &[(String, String)],
) -> anyhow::Result<SliceMemory> {
    const CHANGES: usize = 1000;
    let mut runs = Vec::new();
    for n in [1, 3, 10] {
        let filter = b
            .filtering(&format!("filter-{n}-r{run}"), n, keys, targets, CHANGES)
            .await?;
        let mesh = b
            .mesh(&format!("egress-{n}-r{run}"), n, keys, targets, CHANGES)
            .await?;
        runs.push((n, mesh, filter));
    }
    let (_, one, one_filter) = &runs[0];
    println!("### Egress, run {run}");
    println!();
    println!(
        "{keys} objects, from each setup's start until all were reconciled and {CHANGES} changes after that were reconciled too."
    );
    println!();
    println!(
        "| replicas | mesh: MiB sent | × mesh N = 1 | client-side filtering: MiB sent | × filtering N = 1 | filtering ÷ mesh | sync: mesh / filtering |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, mesh, filter) in &runs {
        println!(
            "| {n} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} / {:.2} s |",
            mib(mesh.bytes),
            mesh.bytes as f64 / one.bytes as f64,
            mib(filter.bytes),
            filter.bytes as f64 / one_filter.bytes as f64,
            filter.bytes as f64 / mesh.bytes as f64,
            mesh.sync.as_secs_f64(),
            filter.sync.as_secs_f64(),
        );
    }
    println!();
    println!(
        "| replicas | keys per replica | sidecar RSS, mean / max | operator RSS, mean / max | manager RSS (peak) |"
    );
    println!("|---|---|---|---|---|");
    for (n, mesh, _) in &runs {
        println!(
            "| {n} | {:.0} | {:.1} / {:.1} MiB | {:.1} / {:.1} MiB | {:.1} ({:.1}) MiB |",
            mesh.slice(),
            mean(mesh.sidecars()),
            max(mesh.sidecars()),
            mean(mesh.operators()),
            max(mesh.operators()),
            mesh.manager.mib(),
            mesh.manager.peak_mib(),
        );
    }
    println!();
    let ten = &runs[runs.len() - 1].1;
    let r = ten.bytes as f64 / one.bytes as f64;
    println!("| goal | measured | verdict |");
    println!("|---|---|---|");
    println!(
        "| apiserver egress at N = 10 <= 1.1 x N = 1 | {r:.2} x | {} |",
        verdict(r <= 1.1)
    );
    println!();
    Ok(SliceMemory {
        keys: one.slice(),
        cluster: keys,
        sidecar_mib: mean(one.sidecars()),
    })
}

/// Scale run `run` over every object there is (`objects`): a bare
/// reflector's memory, a bare controller's cold start, then a fresh
/// manager with 10 replicas. Prints the figures, and the goals' verdicts;
/// `reference`, a sidecar's memory with a slice of a smaller cluster, says
/// whether a sidecar's memory follows its slice or the cluster.
pub(crate) async fn scale(
    b: &Bench<'_>,
    run: usize,
    objects: usize,
    reference: Option<SliceMemory>,
) -> anyhow::Result<()> {
    eprintln!("[scale] a bare reflector over {objects} objects...");
    let (reflector_sync, reflector) = b.reflector(objects).await?;
    eprintln!("[scale] a bare controller over {objects} objects...");
    let bare = super::bare_controller(b.client, objects, b.concurrency, super::Work::None).await?;
    eprintln!("[scale] the mesh with 10 replicas over {objects} objects...");
    let mesh = b
        .mesh(&format!("scale-r{run}"), 10, objects, &[], 0)
        .await?;
    let namespaces = objects.div_ceil(100);
    println!("### Scale, run {run}");
    println!();
    println!("{objects} objects in {namespaces} namespaces, 10 replicas.");
    println!();
    println!("| measurement | value | ratio |");
    println!("|---|---|---|");
    println!(
        "| **baseline R**: a bare kube-runtime reflector holding every object, RSS (peak), synced in {:.1} s | {:.1} ({:.1}) MiB | 1.00 |",
        reflector_sync.as_secs_f64(),
        reflector.mib(),
        reflector.peak_mib()
    );
    println!(
        "| manager after the initial sync, RSS (peak) | {:.1} ({:.1}) MiB | {:.2} × R ({:.2} at peak) |",
        mesh.manager.mib(),
        mesh.manager.peak_mib(),
        mesh.manager.mib() / reflector.mib(),
        mesh.manager.peak_mib() / reflector.peak_mib()
    );
    println!(
        "| **baseline C**: a bare controller, cold start until every key was reconciled | {:.2} s | 1.00 |",
        bare.as_secs_f64()
    );
    println!(
        "| the mesh: from the manager's start until every key was reconciled by one of 10 replicas (the first reconcile started after {:.2} s) | {:.2} s | {:.2} × C |",
        mesh.first.as_secs_f64(),
        mesh.sync.as_secs_f64(),
        mesh.sync.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "| sidecars: {:.0} keys each on average, RSS mean / max | {:.1} / {:.1} MiB | {:.2} × R |",
        mesh.slice(),
        mean(mesh.sidecars()),
        max(mesh.sidecars()),
        mean(mesh.sidecars()) / reflector.mib()
    );
    println!(
        "| operators (SDK with its in-process slice copy), RSS mean / max | {:.1} / {:.1} MiB | {:.2} × R |",
        mean(mesh.operators()),
        max(mesh.operators()),
        mean(mesh.operators()) / reflector.mib()
    );
    println!(
        "| apiserver bytes to the mesh (manager, sidecars, operators) during the sync | {:.1} MiB | |",
        mib(mesh.bytes)
    );
    println!();
    println!("| goal | measured | verdict |");
    println!("|---|---|---|");
    let r = mesh.manager.mib() / reflector.mib();
    println!(
        "| manager RSS with {objects} objects <= 1.2 x a reflector | {r:.2} x | {} |",
        verdict(r <= 1.2)
    );
    println!(
        "| {objects} objects in {namespaces} namespaces, 10 replicas: initial sync, memory | {:.1} s ({:.2} x C); manager {:.0} MiB, sidecars {:.0} MiB, operators {:.0} MiB each | reported |",
        mesh.sync.as_secs_f64(),
        mesh.sync.as_secs_f64() / bare.as_secs_f64(),
        mesh.manager.mib(),
        mean(mesh.sidecars()),
        mean(mesh.operators()),
    );
    // Grows with its slice: the same slice in a larger cluster costs
    // (nearly) the same.
    if let Some(reference) = reference {
        let r = mean(mesh.sidecars()) / reference.sidecar_mib;
        println!(
            "| runtime RSS grows with its slice, not the cluster: a sidecar with {:.0} of {objects} keys <= 1.2 x one with {:.0} of {} | {r:.2} x | {} |",
            mesh.slice(),
            reference.keys,
            reference.cluster,
            verdict(r <= 1.2)
        );
    }
    println!();
    Ok(())
}
