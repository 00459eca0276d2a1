//! Chaos: while objects are created and updated continuously, with
//! reconciles that take up to a lease TTL, fail, requeue or hang, the mesh
//! is hit by faults:
//!
//! - runtimes killed (-9, with their operator) or stopped (SIGTERM);
//! - the leading manager killed, another taking over;
//! - runtime streams cut;
//! - weights flipped, namespaces relabelled, replicas scaled up;
//! - the leader cut off from the apiserver (its traffic blackholed);
//! - a manager, or a whole pod, frozen (SIGSTOP) for longer than a TTL;
//! - a runtime's apiserver writes delayed by twice the TTL;
//! - a reconcile that hangs (four TTLs) until something cancels it;
//! - the operator crashing while its sidecar stays up;
//! - a runtime that stops reading its stream.
//!
//! Then every fault heals, every object is changed once more, and the run
//! checks, from the records (written when a reconcile starts, when it writes
//! and when it ends) and from the order writes landed on the apiserver:
//!
//! - no key was reconciled twice at once, by two runtimes or one;
//! - no stale write: no old owner's write landed after a newer owner's;
//! - no lost update: every object's last generation is reconciled, after the
//!   heal, by the subset the final policy names;
//! - enough handoffs met a reconcile in flight ("contested") for the run to
//!   mean something, and every kind of fault happened.
//!
//! `OPMESH_CHAOS_EVENTS` sets the number of faults (default 200, what CI
//! runs); `OPMESH_CHAOS_SEED` replays a run. Traffic stays on loopback.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::{
    ControlPlane, cluster, eventually,
    history::now_us,
    history::{self, Deaths},
    landed::WriteLog,
    mesh::{
        Binaries, LEASE_TTL, Manager, Replica, ReplicaOptions, apply_mesh, create_generator,
        generator_resource,
    },
    oracle::{oracle, weight_hash},
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
/// The managers' leader Lease duration (`Manager::start_on` sets 3 s).
const LEADER_LEASE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRuntime,
    TermRuntime,
    KillManager,
    CutStream,
    FlipWeights,
    Relabel,
    ScaleUp,
    PartitionLeader,
    StopManager,
    StopRuntime,
    DelayWrites,
    HangReconcile,
    CrashOperator,
    StallStream,
}

/// Every kind, in the order a run first tries them.
const ALL: [Fault; 14] = [
    Fault::KillRuntime,
    Fault::PartitionLeader,
    Fault::TermRuntime,
    Fault::DelayWrites,
    Fault::KillManager,
    Fault::HangReconcile,
    Fault::CutStream,
    Fault::StopRuntime,
    Fault::FlipWeights,
    Fault::CrashOperator,
    Fault::Relabel,
    Fault::StallStream,
    Fault::ScaleUp,
    Fault::StopManager,
];
const KINDS: usize = ALL.len();

/// What a fault with a duration undoes when its time comes.
#[derive(Debug, Clone, Copy)]
enum Heal {
    /// Reconnect a partitioned manager, resume a stopped one, and start it
    /// again if it exited (a leader that lost its Lease exits).
    Manager(usize),
    /// Resume a frozen pod.
    Thaw(usize),
    /// Stop delaying a runtime's writes.
    Writes(usize),
    /// Let a runtime read its stream again.
    Stream(usize),
    /// Start a crashed operator again, next to its sidecar.
    Operator(usize),
}

struct Slot {
    pod: &'static str,
    version: &'static str,
    /// To manager 0 and manager 1.
    proxies: [Proxy; 2],
    /// The operator's way to the apiserver.
    api: Proxy,
    kubeconfig: String,
    replica: Option<Replica>,
    /// A fault with a duration is under way.
    busy: bool,
}

struct Mgr {
    port: u16,
    /// The manager's way to the apiserver.
    api: Proxy,
    kubeconfig: String,
    process: Option<Manager>,
    busy: bool,
}

struct Chaos {
    cp: &'static ControlPlane,
    client: Client,
    bins: Binaries,
    dir: tempfile::TempDir,
    ns: String,
    lease: String,
    managers: Vec<Mgr>,
    slots: Vec<Slot>,
    started: BTreeSet<usize>,
    /// Sidecars asked to stop, until they have.
    terminating: Vec<(Replica, Instant)>,
    heals: Vec<(Instant, Heal)>,
    deaths: Deaths,
    weights: [(&'static str, u64); 2],
    pinned: BTreeMap<String, bool>,
}

/// SIGKILLs `p`, waits for it to be gone, and returns when it died: right
/// after the signal was sent. A killed process runs no more of its own code
/// after that (the kernel stops it before it returns to user space), and
/// nobody can act on its death before it happens, so this is the instant
/// that neither hides an overlap nor invents one, unlike the moment the
/// exit was noticed, which comes some milliseconds later.
async fn killed(p: &opmesh_tests::control_plane::Process) -> u128 {
    let _ = p.signal("KILL").await;
    let died = now_us();
    p.wait_exit(Duration::from_secs(10)).await;
    died
}

impl Chaos {
    fn mesh_spec(&self) -> serde_json::Value {
        json!({
            "selector": {"matchLabels": {"app": "cmg"}},
            "controllers": opmesh_tests::mesh::example_controllers(),
            "namespaceSelector": {"matchLabels": {"opmesh.io/test": self.ns}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            "routing": {
                "pins": [{"subset": "v2", "namespaceSelector": {"matchLabels": {"chaos-pin": "v2"}}}],
                "weights": self.weights.iter().map(|(s, w)| json!({"subset": s, "weight": w})).collect::<Vec<_>>(),
            },
        })
    }

    async fn start_slot(&mut self, i: usize) -> anyhow::Result<()> {
        let managers = format!(
            "{},{}",
            self.slots[i].proxies[0].url(),
            self.slots[i].proxies[1].url()
        );
        let mesh = format!("{}/mesh", self.ns);
        let kubeconfig = [("KUBECONFIG", self.slots[i].kubeconfig.as_str())];
        let (pod, version) = (self.slots[i].pod, self.slots[i].version);
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
            operator_env: &kubeconfig,
        };
        let replica = if self.started.insert(i) {
            Replica::start(&self.client, &opts).await?
        } else {
            Replica::start_processes(&opts).await?
        };
        self.slots[i].replica = Some(replica);
        Ok(())
    }

    async fn restart_operator(&mut self, i: usize) -> anyhow::Result<()> {
        let managers = String::new();
        let mesh = format!("{}/mesh", self.ns);
        let path = self.slots[i].kubeconfig.clone();
        let kubeconfig = [("KUBECONFIG", path.as_str())];
        let Some(mut replica) = self.slots[i].replica.take() else {
            return Ok(());
        };
        let (pod, version) = (self.slots[i].pod, self.slots[i].version);
        let opts = ReplicaOptions {
            cp: self.cp,
            bins: &self.bins,
            dir: self.dir.path(),
            manager: &managers,
            mesh: &mesh,
            namespace: &self.ns,
            pod,
            labels: &[],
            version,
            extra_env: &[],
            operator_env: &kubeconfig,
        };
        let restarted = replica.restart_operator(&opts);
        self.slots[i].replica = Some(replica);
        restarted
    }

    async fn start_manager(&mut self, i: usize) -> anyhow::Result<()> {
        if self.managers[i].process.is_some() {
            // A restart gets a fresh port (the old one may have been taken
            // by another process meanwhile); the proxies follow it, as a
            // Service would.
            self.managers[i].port = opmesh_tests::control_plane::free_port()?;
            let to = std::net::SocketAddr::from(([127, 0, 0, 1], self.managers[i].port));
            for slot in &self.slots {
                slot.proxies[i].retarget(to).await;
            }
        }
        let m = Manager::start_with(
            self.cp,
            &self.bins,
            self.dir.path(),
            &self.ns,
            self.managers[i].port,
            Some(&self.lease),
            &[("KUBECONFIG", &self.managers[i].kubeconfig)],
        )
        .await?;
        self.managers[i].process = Some(m);
        Ok(())
    }

    /// The manager holding the leader Lease, if known.
    async fn leader(&self) -> Option<usize> {
        let lease = Api::<Lease>::namespaced(self.client.clone(), &self.ns)
            .get(&self.lease)
            .await
            .ok()?;
        let holder = lease.spec?.holder_identity?;
        self.managers
            .iter()
            .position(|m| holder == format!("manager-{}", m.port))
    }

    /// Signals both processes of a pod.
    async fn signal_pod(&self, i: usize, sig: &str) {
        if let Some(r) = &self.slots[i].replica {
            let _ = r.sidecar.signal(sig).await;
            let _ = r.operator.signal(sig).await;
        }
    }

    /// Kills what is left of `replica` and notes when its operator died.
    async fn buried(&mut self, replica: Replica) {
        let pid = replica.operator.pid().await;
        let died = killed(&replica.operator).await;
        let _ = replica.sidecar.signal("KILL").await;
        replica.sidecar.wait_exit(Duration::from_secs(10)).await;
        if let Some(pid) = pid {
            self.deaths.exited.insert(pid, died);
        }
    }

    async fn heal(&mut self, heal: Heal) -> anyhow::Result<()> {
        match heal {
            Heal::Manager(i) => {
                let m = &mut self.managers[i];
                m.api.blackhole(false);
                m.api.cut();
                if let Some(p) = &m.process {
                    let _ = p.process().signal("CONT").await;
                }
                m.busy = false;
            }
            Heal::Thaw(i) => {
                let pod = self.slots[i].pod.to_string();
                if let Some(last) = self.deaths.frozen.get_mut(&pod).and_then(|f| f.last_mut()) {
                    last.1 = now_us();
                }
                self.signal_pod(i, "CONT").await;
                self.slots[i].busy = false;
            }
            Heal::Writes(i) => {
                self.slots[i].api.delay(Duration::ZERO);
                self.slots[i].busy = false;
            }
            Heal::Stream(i) => {
                for p in &self.slots[i].proxies {
                    p.hold_replies(false);
                }
                self.slots[i].busy = false;
            }
            Heal::Operator(i) => {
                self.restart_operator(i).await?;
                self.slots[i].busy = false;
            }
        }
        Ok(())
    }

    /// Heals what is due, reaps stopped sidecars and starts again every
    /// manager that exited (as a Deployment would).
    async fn tend(&mut self, all: bool) -> anyhow::Result<()> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.heals)
            .into_iter()
            .partition(|(at, _)| all || *at <= now);
        self.heals = later;
        for (_, h) in due {
            self.heal(h).await?;
        }
        let mut still = Vec::new();
        for (r, since) in std::mem::take(&mut self.terminating) {
            if r.sidecar.is_running() && !all && since.elapsed() < Duration::from_secs(40) {
                still.push((r, since));
            } else {
                self.buried(r).await;
            }
        }
        self.terminating = still;
        for i in 0..self.managers.len() {
            let m = &self.managers[i];
            if !m.busy && m.process.as_ref().is_none_or(|p| !p.process().is_running()) {
                self.start_manager(i).await?;
            }
        }
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

    fn record_paths(&self) -> Vec<PathBuf> {
        self.slots
            .iter()
            .map(|s| self.dir.path().join(format!("{}.jsonl", s.pod)))
            .collect()
    }

    fn dump_logs(&self) {
        for (i, m) in self.managers.iter().enumerate() {
            if let Some(m) = &m.process {
                eprintln!("--- manager {i} ---\n{}", m.process().log_tail(40));
            }
        }
        for s in &self.slots {
            if let Some(r) = &s.replica {
                eprintln!("--- {} sidecar ---\n{}", s.pod, r.sidecar.log_tail(15));
                eprintln!("--- {} operator ---\n{}", s.pod, r.operator.log_tail(10));
            }
        }
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
    eprintln!("chaos: {events} faults, seed {seed} (replay with OPMESH_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let cp = ControlPlane::shared().await?;
    let bins = Binaries::locate()?;
    bins.install_example_crd(cp).await?;
    let client = cp.client().await?;
    let ns = cluster::create_namespace(&client, "chaos", &[]).await?;
    let dir = tempfile::Builder::new().prefix("opmesh-chaos-").tempdir()?;
    let mut managers = Vec::new();
    for i in 0..2 {
        let kubeconfig = dir.path().join(format!("manager-{i}.kubeconfig"));
        managers.push(Mgr {
            port: opmesh_tests::control_plane::free_port()?,
            api: Proxy::to_apiserver(cp, &kubeconfig).await?,
            kubeconfig: kubeconfig.display().to_string(),
            process: None,
            busy: false,
        });
    }
    let target = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let mut slots = Vec::new();
    for (pod, version) in SLOTS {
        let kubeconfig = dir.path().join(format!("{pod}.kubeconfig"));
        slots.push(Slot {
            pod,
            version,
            proxies: [
                Proxy::start(target(managers[0].port)).await?,
                Proxy::start(target(managers[1].port)).await?,
            ],
            api: Proxy::to_apiserver(cp, &kubeconfig).await?,
            kubeconfig: kubeconfig.display().to_string(),
            replica: None,
            busy: false,
        });
    }
    let mut c = Chaos {
        cp,
        client: client.clone(),
        bins,
        dir,
        lease: format!("opmesh-{ns}"),
        ns: ns.clone(),
        managers,
        slots,
        started: BTreeSet::new(),
        terminating: Vec::new(),
        heals: Vec::new(),
        deaths: Deaths::default(),
        weights: [("v1", 50), ("v2", 50)],
        pinned: BTreeMap::new(),
    };
    let result = run(&mut c, events, &mut rng).await;
    if let Err(e) = &result {
        c.dump_logs();
        eprintln!("chaos failed: {e:#}");
        eprintln!("chaos seed was {seed}");
        // Keep the logs and records for a look afterwards.
        let kept = std::mem::replace(&mut c.dir, tempfile::tempdir()?).keep();
        eprintln!("logs and records kept in {}", kept.display());
    }
    // Nothing stays frozen behind the test.
    let _ = c.tend(true).await;
    result
}

/// A spec change the writer makes: new data, and how the next reconciles
/// behave: most are quick, some take up to a TTL, some fail once or
/// requeue.
fn spec_change(rng: &mut StdRng, n: u64) -> serde_json::Value {
    let ttl = LEASE_TTL.as_millis() as u64;
    let reconcile_ms = if rng.random_bool(0.3) {
        rng.random_range(0..ttl)
    } else {
        rng.random_range(0..200)
    };
    let fail_times = u32::from(rng.random_bool(0.15));
    let requeue: Option<u64> = rng.random_bool(0.1).then_some(2000);
    json!({"spec": {
        "data": {"n": n.to_string()},
        "reconcileMs": reconcile_ms,
        "failTimes": fail_times,
        "requeueAfterMs": requeue,
    }})
}

async fn patch_generator(
    client: &Client,
    key: &str,
    patch: &serde_json::Value,
) -> anyhow::Result<()> {
    let (ns, name) = key.split_once('/').unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &generator_resource());
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

async fn run(c: &mut Chaos, events: usize, rng: &mut StdRng) -> anyhow::Result<()> {
    let mut namespaces = Vec::new();
    for _ in 0..NAMESPACES {
        let ns = cluster::create_namespace(&c.client, "chaos-data", &[("opmesh.io/test", &c.ns)])
            .await?;
        c.pinned.insert(ns.clone(), false);
        namespaces.push(ns);
    }
    let keys: Vec<String> = namespaces
        .iter()
        .flat_map(|ns| (0..OBJECTS).map(move |i| format!("{ns}/obj-{i}")))
        .collect();
    let writes = WriteLog::start(&c.client, &namespaces);
    apply_mesh(&c.client, &c.ns, "mesh", c.mesh_spec()).await?;
    c.start_manager(0).await?;
    c.start_manager(1).await?;
    for i in [0, 1, 3, 4] {
        c.start_slot(i).await?;
    }
    for key in &keys {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        create_generator(&c.client, ns, name, json!({"data": {"n": "0"}})).await?;
    }

    // A writer that keeps changing objects, bumping their generation, for
    // the whole run.
    let writer = {
        let (client, keys) = (c.client.clone(), keys.clone());
        let mut wrng = StdRng::seed_from_u64(rng.random());
        tokio::spawn(async move {
            for n in 1u64.. {
                let key = &keys[wrng.random_range(0..keys.len())];
                let _ = patch_generator(&client, key, &spec_change(&mut wrng, n)).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let started_at = Instant::now();
    let mut counts: BTreeMap<Fault, usize> = BTreeMap::new();
    // Pace the faults so that each lands while the last is still settling.
    let mut pace = tokio::time::interval(Duration::from_millis(300));
    let mut tries = 0usize;
    // When each fault struck, to count the handoffs that met a reconcile.
    let mut struck: Vec<u128> = Vec::new();
    let ttl = LEASE_TTL;
    // Count only faults that were injected (a kill with one runtime left is
    // skipped), with a cap so a run always ends.
    while counts.values().sum::<usize>() < events && tries < events * 4 {
        tries += 1;
        pace.tick().await;
        c.tend(false).await?;
        // Every kind once first, then at random.
        let fault = if tries <= KINDS {
            ALL[tries - 1]
        } else {
            fault_kind(rng.random_range(0..100))
        };
        let free: Vec<usize> = (0..c.slots.len())
            .filter(|i| c.slots[*i].replica.is_some() && !c.slots[*i].busy)
            .collect();
        let stopped: Vec<usize> = (0..c.slots.len())
            .filter(|i| {
                c.slots[*i].replica.is_none()
                    && !c.terminating.iter().any(|(r, _)| r.pod == c.slots[*i].pod)
            })
            .collect();
        let free_managers: Vec<usize> = (0..2)
            .filter(|i| !c.managers[*i].busy && c.managers[*i].process.is_some())
            .collect();
        let pick = |rng: &mut StdRng, v: &[usize]| v[rng.random_range(0..v.len())];
        match fault {
            Fault::KillRuntime | Fault::TermRuntime if free.len() > 1 => {
                let i = pick(rng, &free);
                let replica = c.slots[i].replica.take().expect("running");
                if fault == Fault::KillRuntime {
                    // A pod's containers die together.
                    c.buried(replica).await;
                } else {
                    let _ = replica.sidecar.signal("TERM").await;
                    c.terminating.push((replica, Instant::now()));
                }
            }
            Fault::KillManager if !free_managers.is_empty() => {
                let i = pick(rng, &free_managers);
                if let Some(m) = &c.managers[i].process {
                    let _ = m.process().signal("KILL").await;
                    m.process().wait_exit(Duration::from_secs(5)).await;
                }
                c.managers[i].busy = true;
                c.heals.push((
                    Instant::now() + Duration::from_millis(1500),
                    Heal::Manager(i),
                ));
            }
            Fault::PartitionLeader if free_managers.len() == 2 => {
                let i = match c.leader().await {
                    Some(i) => i,
                    None => pick(rng, &free_managers),
                };
                c.managers[i].api.blackhole(true);
                c.managers[i].busy = true;
                c.heals
                    .push((Instant::now() + LEADER_LEASE * 2, Heal::Manager(i)));
            }
            Fault::StopManager if !free_managers.is_empty() => {
                let i = pick(rng, &free_managers);
                if let Some(m) = &c.managers[i].process {
                    let _ = m.process().signal("STOP").await;
                }
                c.managers[i].busy = true;
                c.heals
                    .push((Instant::now() + LEADER_LEASE + ttl / 2, Heal::Manager(i)));
            }
            Fault::StopRuntime if free.len() > 1 => {
                let i = pick(rng, &free);
                c.signal_pod(i, "STOP").await;
                let pod = c.slots[i].pod.to_string();
                c.deaths
                    .frozen
                    .entry(pod)
                    .or_default()
                    .push((now_us(), u128::MAX));
                c.slots[i].busy = true;
                c.heals
                    .push((Instant::now() + ttl + ttl / 2, Heal::Thaw(i)));
            }
            Fault::DelayWrites if !free.is_empty() => {
                let i = pick(rng, &free);
                c.slots[i].api.delay(ttl * 2);
                c.slots[i].busy = true;
                c.heals.push((Instant::now() + ttl * 2, Heal::Writes(i)));
            }
            Fault::StallStream if !free.is_empty() => {
                let i = pick(rng, &free);
                for p in &c.slots[i].proxies {
                    p.hold_replies(true);
                }
                c.slots[i].busy = true;
                c.heals
                    .push((Instant::now() + ttl + ttl / 2, Heal::Stream(i)));
            }
            Fault::CrashOperator if !free.is_empty() => {
                let i = pick(rng, &free);
                if let Some(r) = &c.slots[i].replica {
                    let pid = r.operator.pid().await;
                    let died = killed(&r.operator).await;
                    if let Some(pid) = pid {
                        c.deaths.exited.insert(pid, died);
                    }
                }
                c.slots[i].busy = true;
                c.heals.push((
                    Instant::now() + Duration::from_millis(500),
                    Heal::Operator(i),
                ));
            }
            Fault::HangReconcile => {
                let key = &keys[rng.random_range(0..keys.len())];
                let hang = json!({"spec": {"reconcileMs": (ttl * 4).as_millis() as u64, "data": {"hang": tries.to_string()}}});
                patch_generator(&c.client, key, &hang).await?;
            }
            Fault::CutStream if !free.is_empty() => {
                let i = pick(rng, &free);
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
                let i = pick(rng, &stopped);
                c.start_slot(i).await?;
            }
            _ => continue,
        }
        *counts.entry(fault).or_default() += 1;
        struck.push(now_us());
    }
    writer.abort();
    let _ = writer.await;
    let faults: usize = counts.values().sum();
    eprintln!(
        "chaos: {faults} faults in {:.1?}: {counts:?}",
        started_at.elapsed()
    );

    // Heal: every fault undone, every manager and replica back.
    c.tend(true).await?;
    for i in 0..c.slots.len() {
        if c.slots[i].replica.is_none() {
            c.start_slot(i).await?;
        }
    }
    // Then change every object once more, with quick reconciles: each of
    // these last generations must be reconciled after the heal, by the
    // subset the final policy names.
    let healed_us = now_us();
    for (n, key) in keys.iter().enumerate() {
        let last = json!({"spec": {"data": {"n": format!("final-{n}"), "hang": null}, "reconcileMs": 20, "failTimes": 0, "requeueAfterMs": null}});
        patch_generator(&c.client, key, &last).await?;
    }
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
        finals.len() == keys.len(),
        "only {} objects exist",
        finals.len()
    );
    let paths = c.record_paths();
    let read = |c: &Chaos| {
        let paths: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
        history::read(&paths, &c.deaths, now_us())
    };
    let c_ref = &*c;
    eventually(
        "every last generation to be reconciled after the heal by its policy owner",
        Duration::from_secs(120),
        || async {
            let rs = read(c_ref);
            let missing: Vec<String> = finals
                .iter()
                .filter(|(key, generation)| {
                    !rs.iter().any(|r| {
                        &r.key == *key
                            && r.generation == **generation
                            && r.outcome == "ok"
                            && r.start_us >= healed_us
                            && r.subset == c_ref.expected(key)
                    })
                })
                .map(|(k, g)| format!("{k}@{g} (want {})", c_ref.expected(k)))
                .collect();
            if missing.is_empty() {
                return Ok(Some(()));
            }
            eprintln!(
                "still waiting for {} keys, e.g. {:?}",
                missing.len(),
                missing.first()
            );
            Ok(None)
        },
    )
    .await?;

    let rs = read(c);
    let overlaps = history::overlaps(&rs);
    let landed = writes.landed();
    let stale = history::stale_writes(&landed, &rs)?;
    let contested = history::contested_handoffs(&rs, &struck);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rs {
        let o = if r.outcome.starts_with("error") {
            "error"
        } else {
            r.outcome.as_str()
        };
        *outcomes.entry(o).or_default() += 1;
    }
    eprintln!(
        "chaos result: {faults} faults, {} reconciles of {} keys {outcomes:?}, {} writes landed, \
         {} overlaps, 0 lost updates, {} stale writes, {contested} contested handoffs",
        rs.len(),
        finals.len(),
        landed.len(),
        overlaps.len(),
        stale.len(),
    );
    anyhow::ensure!(
        overlaps.is_empty(),
        "keys reconciled twice at once: {:#?}",
        &overlaps[..overlaps.len().min(5)]
    );
    anyhow::ensure!(
        stale.is_empty(),
        "old owners' writes landed after newer owners': {:#?}",
        &stale[..stale.len().min(5)]
    );
    anyhow::ensure!(
        writes.relists() == 0,
        "the write watch listed again {} times, so writes may be missing (after: {:?})",
        writes.relists(),
        writes.relist_causes()
    );
    anyhow::ensure!(
        faults >= events,
        "only {faults} of {events} faults were injected"
    );
    anyhow::ensure!(
        events < KINDS || counts.len() == KINDS,
        "not every kind of fault happened: {counts:?}"
    );
    // A run where handoffs never met a running reconcile proves little.
    let floor = faults / 20;
    anyhow::ensure!(
        contested >= floor,
        "only {contested} handoffs met a reconcile in flight (want at least {floor}): the run proves too little"
    );
    Ok(())
}

/// The fault for a roll of 0..100.
fn fault_kind(roll: u32) -> Fault {
    match roll {
        0..7 => Fault::KillRuntime,
        7..14 => Fault::TermRuntime,
        14..16 => Fault::KillManager,
        16..30 => Fault::CutStream,
        30..46 => Fault::FlipWeights,
        46..56 => Fault::Relabel,
        56..68 => Fault::ScaleUp,
        68..70 => Fault::PartitionLeader,
        70..72 => Fault::StopManager,
        72..78 => Fault::StopRuntime,
        78..84 => Fault::DelayWrites,
        84..90 => Fault::HangReconcile,
        90..95 => Fault::CrashOperator,
        _ => Fault::StallStream,
    }
}
