//! The simulated cluster: a coordinator, the runtimes' view built from the
//! messages they read, and the watches' inputs.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use opmesh_proto::v1::{HeldKey, Hello, manager_message::Msg};
use proptest::prelude::*;
use tokio::sync::oneshot;

use super::{
    MESH_NS, NAMES, NAMESPACES, Op, PODS, Power, TTL,
    fixtures::{gvk, key, namespace, object, pod_labels, spec},
};
use crate::{
    coordinator::{Connected, Coordinator, Effect, Input},
    crd::{OperatorMesh, OperatorMeshSpec},
    id::{MeshId, PodId},
    policy::{Labels, Policy, ReplicaRing},
    watch::WatchEvent,
};

/// What one runtime believes, from the messages it read.
#[derive(Default)]
pub(super) struct Runtime {
    session: Option<Connected>,
    /// The runtime's own lease: from the heartbeat it sent, plus the TTL.
    lease_until: Option<Instant>,
    /// Keys it was handed and may reconcile.
    held: HashSet<String>,
    /// Revoked keys it may still be reconciling until it answers.
    draining: HashSet<String>,
    /// Every revoked key it owes a `Released` for.
    to_release: Vec<String>,
    /// A reconcile hangs: no revoke is answered, heartbeats go on.
    stalled: bool,
    /// Revoked keys still draining when the stream broke: bounded by the
    /// lease they were revoked under.
    orphans: Vec<(String, Instant)>,
}

pub(super) struct Sim {
    now: Instant,
    coordinator: Coordinator,
    watching: bool,
    /// The mesh asked for its type to be looked up, unanswered so far.
    resolving: bool,
    runtimes: Vec<Runtime>,
    spec: OperatorMeshSpec,
    canary: BTreeSet<usize>,
    objects: BTreeSet<(usize, usize)>,
    /// The last pod that held each key, and whether it let go by expiry.
    last_holder: HashMap<String, (usize, bool)>,
    pub(super) power: Power,
}

// === impl Sim ===

impl Sim {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        let mut sim = Self {
            now,
            coordinator: Coordinator::new(TTL, now),
            watching: false,
            resolving: false,
            runtimes: (0..PODS.len()).map(|_| Runtime::default()).collect(),
            spec: spec(20, false, false, false),
            canary: BTreeSet::new(),
            objects: (0..NAMESPACES)
                .flat_map(|n| (0..NAMES).map(move |o| (n, o)))
                .collect(),
            last_holder: HashMap::new(),
            power: Power::default(),
        };
        sim.boot();
        sim
    }

    fn step(&mut self, input: Input) {
        for effect in self.coordinator.step(input, self.now) {
            match effect {
                // The mesh was deleted: the lookup is dropped.
                Effect::StopResolving(k) => {
                    assert_eq!(k, gvk().key());
                    self.resolving = false;
                }
                // Answered by `Op::Discover`, if ever.
                Effect::Resolve(t) => {
                    assert_eq!(t.key(), gvk().key());
                    self.resolving = true;
                }
                Effect::Watch(g) => {
                    assert_eq!(g.key(), gvk().key());
                    self.watching = true;
                    for &(n, o) in &self.objects.clone() {
                        self.step(Input::Object {
                            gvk: g.key(),
                            event: WatchEvent::Apply(object(n, o)),
                        });
                    }
                    let present = self
                        .objects
                        .iter()
                        .map(|&(n, o)| (namespace(n), format!("app-{o}")))
                        .collect();
                    self.step(Input::Object {
                        gvk: g.key(),
                        event: WatchEvent::Relisted(present),
                    });
                }
            }
        }
    }

    /// What a fresh coordinator's watches deliver first.
    fn boot(&mut self) {
        self.apply_mesh();
        for n in 0..NAMESPACES {
            self.apply_namespace(n);
        }
        let present = (0..NAMESPACES)
            .map(|n| (String::new(), namespace(n)))
            .collect();
        self.step(Input::Namespace(WatchEvent::Relisted(present)));
    }

    fn apply_mesh(&mut self) {
        let mut om = OperatorMesh::new("mesh", self.spec.clone());
        om.metadata.namespace = Some(MESH_NS.into());
        om.metadata.generation = Some(1);
        self.step(Input::Mesh(WatchEvent::Apply(Arc::new(om))));
    }

    fn labels_of(&self, n: usize) -> Labels {
        let mut labels = Labels::new();
        if self.canary.contains(&n) {
            labels.insert("canary".into(), "true".into());
        }
        labels
    }

    fn apply_namespace(&mut self, n: usize) {
        let labels = self.labels_of(n);
        self.step(Input::Namespace(WatchEvent::Apply(Arc::new((
            (String::new(), namespace(n)),
            labels,
        )))));
    }

    fn lease_valid(&self, i: usize) -> bool {
        self.runtimes[i].lease_until.is_some_and(|t| self.now < t)
    }

    pub(super) fn apply(&mut self, op: Op) {
        match op {
            Op::Policy(v2, pin, paused, by_namespace) => {
                self.spec = spec(v2, pin, paused, by_namespace);
                self.apply_mesh();
            }
            Op::Relabel(n) => {
                if !self.canary.remove(&n) {
                    self.canary.insert(n);
                }
                self.apply_namespace(n);
            }
            Op::Object(n, o, exists) => {
                let changed = if exists {
                    self.objects.insert((n, o))
                } else {
                    self.objects.remove(&(n, o))
                };
                if changed && self.watching {
                    let event = if exists {
                        WatchEvent::Apply(object(n, o))
                    } else {
                        WatchEvent::Delete(object(n, o))
                    };
                    self.step(Input::Object {
                        gvk: gvk().key(),
                        event,
                    });
                }
            }
            Op::Connect(i) => self.connect(i),
            Op::Drop(i) => self.drop_stream(i),
            Op::Goodbye(i) => {
                if let Some(c) = self.runtimes[i].session.take() {
                    // Drained: nothing is running, everything is released.
                    let rt = &mut self.runtimes[i];
                    rt.held.clear();
                    rt.draining.clear();
                    rt.to_release.clear();
                    rt.lease_until = None;
                    self.step(Input::Disconnect {
                        holder: c.holder,
                        graceful: true,
                        operator_gone: None,
                    });
                }
            }
            Op::Deliver(i) => self.deliver(i),
            Op::Stall(i, on) => self.runtimes[i].stalled = on,
            Op::Release(i) => {
                let rt = &mut self.runtimes[i];
                if rt.stalled {
                    return;
                }
                if let Some(c) = &rt.session
                    && !rt.to_release.is_empty()
                {
                    let holder = c.holder.clone();
                    rt.draining.clear();
                    let keys = std::mem::take(&mut rt.to_release);
                    self.step(Input::Released { holder, keys });
                }
            }
            Op::Heartbeat(i) => {
                if self.lost_by_manager(i) {
                    return;
                }
                if self.lease_valid(i)
                    && let Some(c) = &self.runtimes[i].session
                {
                    c.contact.touch(self.now);
                    self.runtimes[i].lease_until = Some(self.now + TTL);
                }
            }
            Op::Advance(ms) => {
                // Time passes in steps of a third of a TTL, the heartbeat
                // interval of a healthy session: a stalled runtime's session
                // is healthy, so it heartbeats at each step.
                let mut left = Duration::from_millis(ms);
                while !left.is_zero() {
                    for i in 0..PODS.len() {
                        if self.runtimes[i].stalled {
                            self.apply(Op::Heartbeat(i));
                        }
                    }
                    let step = left.min(TTL / 3);
                    left -= step;
                    self.now += step;
                    self.expire_runtimes();
                    self.step(Input::Tick);
                }
            }
            Op::Recreate => {
                let mut om = OperatorMesh::new("mesh", self.spec.clone());
                om.metadata.namespace = Some(MESH_NS.into());
                self.step(Input::Mesh(WatchEvent::Delete(Arc::new(om))));
                self.apply_mesh();
            }
            Op::Discover => {
                if std::mem::take(&mut self.resolving) {
                    self.step(Input::Resolved(crate::gvk::Gvk::from(&gvk())));
                }
            }
            Op::Restart => {
                self.power.failovers += 1;
                self.coordinator.close();
                for i in 0..PODS.len() {
                    self.runtimes[i].session = None;
                    self.orphan_draining(i);
                }
                self.coordinator = Coordinator::new(TTL, self.now);
                self.watching = false;
                self.resolving = false;
                self.boot();
            }
        }
    }

    fn connect(&mut self, i: usize) {
        self.drop_stream(i);
        let valid = self.lease_valid(i);
        let rt = &mut self.runtimes[i];
        if !valid {
            rt.held.clear();
        }
        let hello = Hello {
            mesh_namespace: MESH_NS.into(),
            mesh_name: "mesh".into(),
            pod_namespace: MESH_NS.into(),
            pod_name: PODS[i].0.into(),
            primary: Some(gvk()),
            held: rt.held.iter().map(|k| HeldKey { key: k.clone() }).collect(),
            ..Default::default()
        };
        self.power.reported_on_reconnect += hello.held.len();
        let (reply, mut answer) = oneshot::channel();
        self.step(Input::Connect {
            pod_uid: String::new(),
            hello: Box::new(hello),
            pod_labels: pod_labels(i),
            reply,
        });
        if let Ok(Ok(c)) = answer.try_recv() {
            let rt = &mut self.runtimes[i];
            rt.session = Some(c);
            // Welcomed: the lease counts from the hello.
            rt.lease_until = Some(self.now + TTL);
        }
    }

    /// True, and the runtime's stream ends, if the manager closed its
    /// session (a revoke it did not answer in time): it gets no renewal and
    /// keeps its keys only until its lease runs out.
    fn lost_by_manager(&mut self, i: usize) -> bool {
        let closed = self.runtimes[i]
            .session
            .as_ref()
            .is_some_and(|c| c.pending.is_closed());
        if closed {
            self.runtimes[i].session = None;
            self.orphan_draining(i);
            self.power.ended_by_manager += 1;
        }
        closed
    }

    fn drop_stream(&mut self, i: usize) {
        if let Some(c) = self.runtimes[i].session.take() {
            self.orphan_draining(i);
            self.step(Input::Disconnect {
                holder: c.holder,
                graceful: false,
                operator_gone: None,
            });
        }
    }

    /// The answer to revokes still draining is lost with the stream; those
    /// reconciles end by the lease they were revoked under.
    fn orphan_draining(&mut self, i: usize) {
        let rt = &mut self.runtimes[i];
        let until = rt.lease_until.unwrap_or(self.now);
        rt.orphans.extend(rt.draining.drain().map(|k| (k, until)));
        rt.to_release.clear();
    }

    fn expire_runtimes(&mut self) {
        for i in 0..PODS.len() {
            let now = self.now;
            self.runtimes[i].orphans.retain(|(_, t)| *t > now);
            if self.runtimes[i].lease_until.is_some_and(|t| t <= now) {
                let rt = &mut self.runtimes[i];
                for k in rt.held.drain().chain(rt.draining.drain()) {
                    self.last_holder.insert(k, (i, true));
                }
                rt.to_release.clear();
                rt.lease_until = None;
                // A runtime without a lease stops; its stream ends.
                if let Some(c) = rt.session.take() {
                    self.step(Input::Disconnect {
                        holder: c.holder,
                        graceful: false,
                        operator_gone: None,
                    });
                }
            }
        }
    }

    fn deliver(&mut self, i: usize) {
        if self.lost_by_manager(i) {
            return;
        }
        let Some(batch) = self.runtimes[i]
            .session
            .as_ref()
            .and_then(|c| c.pending.drain_now())
        else {
            return;
        };
        for msg in batch {
            match msg.msg {
                Some(Msg::Event(ev)) => {
                    let k = ev.key;
                    if !self.runtimes[i].held.contains(&k) {
                        match self.last_holder.get(&k) {
                            Some(&(j, true)) if j != i => self.power.handoffs_after_expiry += 1,
                            Some(&(j, false)) if j != i => self.power.handoffs_after_release += 1,
                            _ => {}
                        }
                    }
                    self.runtimes[i].held.insert(k);
                }
                Some(Msg::Revoke(r)) => {
                    let rt = &mut self.runtimes[i];
                    for k in r.keys {
                        if rt.held.remove(&k) {
                            rt.draining.insert(k.clone());
                            self.last_holder.insert(k.clone(), (i, false));
                        }
                        rt.to_release.push(k);
                    }
                }
                Some(Msg::Events(_)) => {
                    unreachable!(
                        "the coordinator queues events one by one; its session writer batches them"
                    )
                }
                Some(Msg::Welcome(_) | Msg::Synced(_) | Msg::Lease(_)) | None => {}
            }
        }
    }

    /// No key is held by two runtimes, counting everything a runtime may
    /// still be reconciling.
    pub(super) fn check(&self) -> Result<(), TestCaseError> {
        let mut seen: HashMap<&String, usize> = HashMap::new();
        for (i, rt) in self.runtimes.iter().enumerate() {
            let mut mine: HashSet<&String> = HashSet::new();
            if self.lease_valid(i) {
                mine.extend(rt.held.iter().chain(&rt.draining));
            }
            mine.extend(rt.orphans.iter().map(|(k, _)| k));
            for k in mine {
                if let Some(j) = seen.insert(k, i) {
                    return Err(TestCaseError::fail(format!(
                        "{k} is held by {} and {} at once",
                        PODS[j].0, PODS[i].0
                    )));
                }
            }
        }
        Ok(())
    }

    /// Stops faults: unpauses, connects every pod, and lets time, heartbeats,
    /// deliveries and releases run until the mesh settles.
    pub(super) fn settle(&mut self) {
        for rt in &mut self.runtimes {
            rt.stalled = false;
        }
        self.spec.paused = false;
        self.apply_mesh();
        // Four seconds: past any lease, any earlier manager's leases and any
        // revoke deadline, with a round per revoke → release → assign step.
        // A runtime whose session ended (the manager closed it, or its lease
        // ran out) connects again, as the real one does.
        for _ in 0..16 {
            for i in 0..PODS.len() {
                self.lost_by_manager(i);
                if self.runtimes[i].session.is_none() {
                    self.connect(i);
                }
                self.apply(Op::Heartbeat(i));
                self.apply(Op::Deliver(i));
                self.apply(Op::Release(i));
            }
            self.apply(Op::Advance(TTL.as_millis() as u64 / 4));
        }
    }

    /// Builds a snapshot, as the driver does every so often.
    pub(super) fn snapshot(&mut self) {
        let _ = self.coordinator.snapshot();
    }

    /// Every key with an object is held by the replica its policy names, in
    /// the runtimes' view and in the coordinator's snapshot.
    pub(super) fn check_settled(&mut self) -> Result<(), TestCaseError> {
        let policy = Policy::compile(&self.spec).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // The exact split divides the namespaces that hold objects.
        let namespaces: HashMap<String, Labels> = (0..NAMESPACES)
            .filter(|n| self.objects.iter().any(|(m, _)| m == n))
            .map(|n| (namespace(n), self.labels_of(n)))
            .collect();
        let exact = policy.apportion(&namespaces);
        let rings: Vec<ReplicaRing> = policy
            .subsets()
            .iter()
            .map(|subset| {
                let pods: Vec<PodId> = PODS
                    .iter()
                    .filter(|(_, s)| *s == subset.name)
                    .map(|(p, _)| PodId::new(MESH_NS, *p))
                    .collect();
                ReplicaRing::new(&pods)
            })
            .collect();
        let snapshot = self.coordinator.snapshot();
        let mesh = snapshot
            .meshes
            .get(&MeshId::new(MESH_NS, "mesh"))
            .ok_or_else(|| TestCaseError::fail("no mesh in the snapshot"))?;
        // The counts the snapshot reuses while nothing they depend on
        // changed: keys routed to each subset, and keys no one holds.
        let mut routed = vec![0u64; policy.subsets().len()];
        for n in 0..NAMESPACES {
            for o in 0..NAMES {
                let k = key(n, o);
                let holders: Vec<usize> = (0..PODS.len())
                    .filter(|i| self.runtimes[*i].held.contains(&k))
                    .collect();
                if !self.objects.contains(&(n, o)) {
                    prop_assert!(
                        holders.is_empty(),
                        "{k} has no object but is held by {holders:?}"
                    );
                    continue;
                }
                let subset = policy
                    .route(&k, &self.labels_of(n), &exact)
                    .ok_or_else(|| TestCaseError::fail(format!("{k} routes nowhere")))?;
                routed[subset] += 1;
                let want = rings[subset]
                    .owner(&k)
                    .cloned()
                    .ok_or_else(|| TestCaseError::fail("empty ring"))?;
                let got: Vec<&str> = holders.iter().map(|i| PODS[*i].0).collect();
                prop_assert_eq!(got, vec![want.name.as_str()], "runtimes holding {}", k);
                let view = mesh.keys.get(&k);
                prop_assert!(
                    view.is_some_and(|v| v.holder.pod == want && !v.moving),
                    "snapshot has {:?} for {}, want {}",
                    view,
                    k,
                    want
                );
            }
        }
        let got: Vec<u64> = mesh.subsets.iter().map(|s| s.routed_keys).collect();
        prop_assert_eq!(got, routed, "keys routed per subset in the snapshot");
        prop_assert_eq!(
            mesh.unowned,
            0,
            "unowned keys in the snapshot of a settled mesh"
        );
        Ok(())
    }
}
