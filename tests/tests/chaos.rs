//! Chaos: while objects are created and updated continuously, runtimes are
//! killed (-9) and stopped (SIGTERM), the leading manager is killed and
//! another takes over, streams are cut, weights flip, namespaces are
//! relabelled and replicas scale up and down. Afterwards the reconcile
//! history must show no key reconciled by two runtimes at once, and every
//! object's final generation reconciled by the subset the final policy names.
//!
//! `OPMESH_CHAOS_EVENTS` sets the number of fault events (default 200, what
//! CI runs); `OPMESH_CHAOS_SEED` replays a run. Traffic stays on loopback.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::oracle::{oracle, weight_hash};
use opmesh_tests::{
    ControlPlane, cluster, eventually, history,
    mesh::{
        Binaries, Manager, Replica, ReplicaOptions, apply_mesh, create_generator,
        generator_resource,
    },
    proxy::Proxy,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::json;

const SLOTS: [(&str, &str); 6] = [
    ("v1-0", "v1"),
    ("v1-1", "v1"),
    ("v1-2", "v1"),
    ("v2-0", "v2"),
    ("v2-1", "v2"),
    ("v2-2", "v2"),
];
const NAMESPACES: usize = 4;
const OBJECTS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRuntime,
    TermRuntime,
    KillManager,
    CutStream,
    FlipWeights,
    Relabel,
    ScaleUp,
}

struct Slot {
    pod: &'static str,
    version: &'static str,
    proxies: [Proxy; 2],
    replica: Option<Replica>,
}

struct Chaos {
    cp: &'static ControlPlane,
    client: Client,
    bins: Binaries,
    dir: tempfile::TempDir,
    ns: String,
    lease: String,
    managers: [Option<Manager>; 2],
    ports: [u16; 2],
    started_managers: [bool; 2],
    slots: Vec<Slot>,
    weights: [(&'static str, u64); 2],
    pinned: BTreeMap<String, bool>,
}

impl Chaos {
    fn mesh_spec(&self) -> serde_json::Value {
        json!({
            "selector": {"matchLabels": {"app": "cmg"}},
            "namespaceSelector": {"matchLabels": {"opmesh.io/test": self.ns}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            "routing": {
                "pins": [{"subset": "v2", "namespaceSelector": {"matchLabels": {"chaos-pin": "v2"}}}],
                "weights": self.weights.iter().map(|(s, w)| json!({"subset": s, "weight": w})).collect::<Vec<_>>(),
            },
        })
    }

    async fn start_slot(&mut self, i: usize, first: bool) -> anyhow::Result<()> {
        let managers = format!(
            "{},{}",
            self.slots[i].proxies[0].url(),
            self.slots[i].proxies[1].url()
        );
        let (pod, version) = (self.slots[i].pod, self.slots[i].version);
        let mesh = format!("{}/mesh", self.ns);
        let opts = ReplicaOptions {
            cp: self.cp,
            bins: &self.bins,
            dir: self.dir.path(),
            manager: &managers,
            mesh: &mesh,
            namespace: &self.ns,
            pod,
            labels: &[("app", "cmg"), ("version", version)],
            version,
            extra_env: &[],
        };
        let replica = if first {
            Replica::start(&self.client, &opts).await?
        } else {
            Replica::start_processes(&opts).await?
        };
        self.slots[i].replica = Some(replica);
        Ok(())
    }

    async fn start_manager(&mut self, i: usize) -> anyhow::Result<()> {
        if self.managers[i].is_none() && self.started_managers[i] {
            // A restart gets a fresh port (the old one may have been taken
            // by another process meanwhile); the proxies follow it, as a
            // Service would.
            self.ports[i] = opmesh_tests::control_plane::free_port()?;
            let to = std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[i]));
            for slot in &self.slots {
                slot.proxies[i].retarget(to).await;
            }
        }
        self.started_managers[i] = true;
        let m = Manager::start_on(
            self.cp,
            &self.bins,
            self.dir.path(),
            &self.ns,
            self.ports[i],
            Some(&self.lease),
        )
        .await?;
        self.managers[i] = Some(m);
        Ok(())
    }

    /// What the final policy says about `key`.
    fn expected(&self, key: &str) -> &'static str {
        let ns = key.split('/').next().unwrap_or_default();
        if self.pinned.get(ns).copied().unwrap_or(false) {
            return "v2";
        }
        oracle(weight_hash(key), &self.weights)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_one_owner_per_key_and_loses_no_update() -> anyhow::Result<()> {
    let events: usize = env_or("OPMESH_CHAOS_EVENTS", 200);
    let seed: u64 = env_or(
        "OPMESH_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    eprintln!("chaos: {events} fault events, seed {seed} (replay with OPMESH_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let cp = ControlPlane::shared().await?;
    let bins = Binaries::locate()?;
    bins.install_example_crd(cp).await?;
    let client = cp.client().await?;
    let ns = cluster::create_namespace(&client, "chaos", &[]).await?;
    let dir = tempfile::Builder::new().prefix("opmesh-chaos-").tempdir()?;
    let ports = [
        opmesh_tests::control_plane::free_port()?,
        opmesh_tests::control_plane::free_port()?,
    ];
    let target = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let mut slots = Vec::new();
    for (pod, version) in SLOTS {
        slots.push(Slot {
            pod,
            version,
            proxies: [
                Proxy::start(target(ports[0])).await?,
                Proxy::start(target(ports[1])).await?,
            ],
            replica: None,
        });
    }
    let mut c = Chaos {
        cp,
        client: client.clone(),
        bins,
        dir,
        lease: format!("opmesh-{ns}"),
        ns: ns.clone(),
        managers: [None, None],
        ports,
        started_managers: [false, false],
        slots,
        weights: [("v1", 50), ("v2", 50)],
        pinned: BTreeMap::new(),
    };
    let result = run(&mut c, events, &mut rng).await;
    if result.is_err() {
        for (i, m) in c.managers.iter().enumerate() {
            if let Some(m) = m {
                eprintln!("--- manager {i} ---\n{}", m.process().log_tail(40));
            }
        }
        for s in &c.slots {
            if let Some(r) = &s.replica {
                eprintln!("--- {} sidecar ---\n{}", s.pod, r.sidecar.log_tail(15));
            }
        }
        if let Err(e) = &result {
            eprintln!("chaos failed: {e:#}");
        }
        eprintln!("chaos seed was {seed}");
    }
    result
}

async fn run(c: &mut Chaos, events: usize, rng: &mut StdRng) -> anyhow::Result<()> {
    let mut namespaces = Vec::new();
    for _ in 0..NAMESPACES {
        let ns = cluster::create_namespace(&c.client, "chaos-data", &[("opmesh.io/test", &c.ns)])
            .await?;
        c.pinned.insert(ns.clone(), false);
        namespaces.push(ns);
    }
    apply_mesh(&c.client, &c.ns, "mesh", c.mesh_spec()).await?;
    c.start_manager(0).await?;
    c.start_manager(1).await?;
    for i in [0, 1, 3, 4] {
        c.start_slot(i, true).await?;
    }
    let mut started: BTreeSet<usize> = [0, 1, 3, 4].into_iter().collect();

    // A writer that creates and then keeps updating objects, bumping their
    // generation, for the whole run.
    let writer = {
        let (client, namespaces) = (c.client.clone(), namespaces.clone());
        let mut wrng = StdRng::seed_from_u64(rng.random());
        tokio::spawn(async move {
            for ns in &namespaces {
                for i in 0..OBJECTS {
                    let _ = create_generator(
                        &client,
                        ns,
                        &format!("obj-{i}"),
                        json!({"data": {"n": "0"}}),
                    )
                    .await;
                }
            }
            let mut n = 0u64;
            loop {
                n += 1;
                let ns = &namespaces[wrng.random_range(0..namespaces.len())];
                let name = format!("obj-{}", wrng.random_range(0..OBJECTS));
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), ns, &generator_resource());
                let _ = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"data": {"n": n.to_string()}}})),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let started_at = Instant::now();
    let mut counts: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut killed_manager: Option<(usize, usize)> = None;
    // Pace the faults so that each lands while the last is still settling.
    let mut pace = tokio::time::interval(Duration::from_millis(300));
    let mut event = 0usize;
    // Count only faults that were injected (a kill with one runtime left is
    // skipped), with a cap so a run always ends.
    while counts.values().sum::<usize>() < events && event < events * 3 {
        event += 1;
        pace.tick().await;
        if let Some((i, at)) = killed_manager
            && event >= at
        {
            c.start_manager(i).await?;
            killed_manager = None;
        }
        let fault = match rng.random_range(0..100) {
            0..12 => Fault::KillRuntime,
            12..22 => Fault::TermRuntime,
            22..27 => Fault::KillManager,
            27..45 => Fault::CutStream,
            45..65 => Fault::FlipWeights,
            65..80 => Fault::Relabel,
            _ => Fault::ScaleUp,
        };
        let running: Vec<usize> = (0..c.slots.len())
            .filter(|i| c.slots[*i].replica.is_some())
            .collect();
        let stopped: Vec<usize> = (0..c.slots.len())
            .filter(|i| c.slots[*i].replica.is_none())
            .collect();
        match fault {
            Fault::KillRuntime | Fault::TermRuntime if running.len() > 1 => {
                let i = running[rng.random_range(0..running.len())];
                let replica = c.slots[i].replica.take().expect("running");
                let sig = if fault == Fault::KillRuntime {
                    "KILL"
                } else {
                    "TERM"
                };
                let _ = replica.sidecar.signal(sig).await;
                if fault == Fault::KillRuntime {
                    // A pod's containers die together.
                    let _ = replica.operator.signal("KILL").await;
                } else {
                    replica.sidecar.wait_exit(Duration::from_secs(40)).await;
                }
                drop(replica);
            }
            Fault::KillManager if killed_manager.is_none() => {
                let i = rng.random_range(0..2);
                if let Some(m) = c.managers[i].take() {
                    let _ = m.process().signal("KILL").await;
                    m.process().wait_exit(Duration::from_secs(5)).await;
                    killed_manager = Some((i, event + 5));
                }
            }
            Fault::CutStream if !running.is_empty() => {
                let i = running[rng.random_range(0..running.len())];
                for p in &c.slots[i].proxies {
                    p.cut();
                }
            }
            Fault::FlipWeights => {
                let w = [0u64, 20, 50, 80, 100][rng.random_range(0..5)];
                c.weights = [("v1", 100 - w), ("v2", w)];
                apply_mesh(&c.client, &c.ns, "mesh", c.mesh_spec()).await?;
            }
            Fault::Relabel => {
                let ns = namespaces[rng.random_range(0..namespaces.len())].clone();
                let pin = !c.pinned[&ns];
                c.pinned.insert(ns.clone(), pin);
                let label = if pin {
                    json!("v2")
                } else {
                    serde_json::Value::Null
                };
                Api::<Namespace>::all(c.client.clone())
                    .patch(
                        &ns,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"chaos-pin": label}}})),
                    )
                    .await?;
            }
            Fault::ScaleUp if !stopped.is_empty() => {
                let i = stopped[rng.random_range(0..stopped.len())];
                let first = started.insert(i);
                c.start_slot(i, first).await?;
            }
            _ => continue,
        }
        *counts.entry(fault).or_default() += 1;
    }
    writer.abort();
    let _ = writer.await;
    let faults: usize = counts.values().sum();
    eprintln!(
        "chaos: {faults} faults in {:.1?}: {counts:?}",
        started_at.elapsed()
    );

    // Heal: every manager and every replica back.
    if let Some((i, _)) = killed_manager {
        c.start_manager(i).await?;
    }
    for i in 0..c.slots.len() {
        if c.slots[i].replica.is_none() {
            let first = started.insert(i);
            c.start_slot(i, first).await?;
        }
    }

    // No lost update: each object's final generation is reconciled by the
    // subset the final policy names.
    let mut finals: BTreeMap<String, i64> = BTreeMap::new();
    for ns in &namespaces {
        let api: Api<DynamicObject> =
            Api::namespaced_with(c.client.clone(), ns, &generator_resource());
        for o in api.list(&Default::default()).await? {
            finals.insert(
                format!("{ns}/{}", o.metadata.name.clone().unwrap_or_default()),
                o.metadata.generation.unwrap_or_default(),
            );
        }
    }
    anyhow::ensure!(
        finals.len() == NAMESPACES * OBJECTS,
        "only {} objects exist",
        finals.len()
    );
    let records = || -> Vec<_> {
        c.slots
            .iter()
            .flat_map(|s| {
                opmesh_tests::mesh::read_records(&c.dir.path().join(format!("{}.jsonl", s.pod)))
            })
            .collect()
    };
    let lost = eventually(
        "every final generation to be reconciled by its policy owner",
        Duration::from_secs(120),
        || async {
            let rs = records();
            let missing: Vec<String> = finals
                .iter()
                .filter(|(key, generation)| {
                    !rs.iter().any(|r| {
                        &r.key == *key
                            && r.generation == **generation
                            && r.outcome == "ok"
                            && r.subset == c.expected(key)
                    })
                })
                .map(|(k, g)| format!("{k}@{g} (want {})", c.expected(k)))
                .collect();
            Ok(missing.is_empty().then_some(0usize).or_else(|| {
                eprintln!(
                    "still waiting for {} keys, e.g. {:?}",
                    missing.len(),
                    missing.first()
                );
                None
            }))
        },
    )
    .await?;

    let rs = records();
    let overlaps = history::overlaps(&rs);
    eprintln!(
        "chaos result: {faults} faults, {} reconciles of {} keys, {} overlaps, {lost} lost updates",
        rs.len(),
        finals.len(),
        overlaps.len()
    );
    anyhow::ensure!(
        overlaps.is_empty(),
        "keys reconciled by two runtimes at once: {:#?}",
        &overlaps[..overlaps.len().min(5)]
    );
    anyhow::ensure!(
        faults >= events,
        "only {faults} of {events} faults were injected"
    );
    Ok(())
}
