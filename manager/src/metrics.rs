//! The manager's Prometheus metrics. Counters and the handoff histogram are
//! atomics the coordinator updates as things happen; the gauges (sessions,
//! pending messages, held keys, leading) are read from the published
//! snapshot when scraped.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::snapshot::Snapshot;

type Labels = Vec<(String, String)>;

/// Every metric of the manager.
pub(crate) struct Metrics {
    /// `opmesh_manager_routed_events_total`: watch events routed to a key.
    pub(crate) routed_events: Counter,
    /// `opmesh_manager_handoffs_total`: keys moved by a revoke and its
    /// release.
    pub(crate) handoffs: Counter,
    /// `opmesh_manager_handoff_duration_seconds`: from a revoke to its
    /// release.
    pub(crate) handoff_duration: Histogram,
    /// `opmesh_manager_lease_expiries_total`: sessions whose keys were
    /// freed because their lease ran out.
    pub(crate) lease_expiries: Counter,
    /// `opmesh_manager_watch_restarts_total`: watch failures, after each of
    /// which the watch starts again.
    pub(crate) watch_restarts: Counter,
    /// `opmesh_manager_reconciles_total{mesh, subset, result}`, from the
    /// runtimes' reports.
    pub(crate) reconciles: Family<Labels, Counter>,
    /// `opmesh_manager_reconcile_duration_seconds{mesh, subset}`.
    pub(crate) reconcile_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// `opmesh_manager_reports_dropped_total`: outcomes runtimes dropped
    /// because their buffer was full.
    pub(crate) reports_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            routed_events: Counter::default(),
            handoffs: Counter::default(),
            handoff_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            lease_expiries: Counter::default(),
            watch_restarts: Counter::default(),
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_buckets),
            reports_dropped: Counter::default(),
        }
    }
}

fn reconcile_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
    ])
}

// === impl Metrics ===

impl Metrics {
    /// Counts the outcomes a runtime of `mesh`'s `subset` reported.
    pub(crate) fn reconciled(
        &self,
        mesh: &crate::id::MeshId,
        subset: &str,
        reports: &[opmesh_proto::v1::ReconcileReport],
        dropped: u64,
    ) {
        let base = vec![
            ("mesh".to_string(), mesh.to_string()),
            ("subset".to_string(), subset.to_string()),
        ];
        let mut ok = base.clone();
        ok.push(("result".into(), "success".into()));
        let mut failed = base.clone();
        failed.push(("result".into(), "error".into()));
        let durations = self.reconcile_duration.get_or_create(&base);
        for r in reports {
            self.reconciles
                .get_or_create(if r.ok { &ok } else { &failed })
                .inc();
            durations.observe(r.duration_us as f64 / 1e6);
        }
        self.reports_dropped.inc_by(dropped);
    }

    /// The text exposition of every metric, with the gauges read from
    /// `snapshot` and `leading`.
    pub(crate) fn encode(&self, snapshot: &Snapshot, leading: bool) -> String {
        let mut registry = Registry::with_prefix("opmesh_manager");
        registry.register(
            "routed_events",
            "Watch events routed to a key",
            self.routed_events.clone(),
        );
        registry.register(
            "handoffs",
            "Keys moved from one runtime to another through a revoke and its release",
            self.handoffs.clone(),
        );
        registry.register(
            "handoff_duration_seconds",
            "Time from a key's revoke to its release",
            self.handoff_duration.clone(),
        );
        registry.register(
            "lease_expiries",
            "Sessions whose keys were freed because their lease ran out",
            self.lease_expiries.clone(),
        );
        registry.register(
            "watch_restarts",
            "Watch failures, after each of which the watch starts again",
            self.watch_restarts.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles the runtimes reported, by mesh, subset and result",
            self.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reported reconciles ran, by mesh and subset",
            self.reconcile_duration.clone(),
        );
        registry.register(
            "reports_dropped",
            "Reconcile outcomes runtimes dropped because their buffer was full",
            self.reports_dropped.clone(),
        );
        let lead = Gauge::<i64>::default();
        lead.set(i64::from(leading));
        registry.register("leading", "1 while this manager leads", lead);

        let sessions = Family::<Labels, Gauge>::default();
        let pending = Family::<Labels, Gauge>::default();
        let held = Family::<Labels, Gauge>::default();
        let moving = Family::<Labels, Gauge>::default();
        for (id, mesh) in &snapshot.meshes {
            let mesh_label = ("mesh".to_string(), id.to_string());
            moving
                .get_or_create(&vec![mesh_label.clone()])
                .set(i64::try_from(mesh.moving()).unwrap_or(i64::MAX));
            for s in &mesh.subsets {
                let subset = vec![mesh_label.clone(), ("subset".into(), s.name.clone())];
                sessions
                    .get_or_create(&subset)
                    .set(i64::try_from(s.replicas.len()).unwrap_or(i64::MAX));
                let owned: u64 = s.replicas.iter().map(|r| r.owned_keys).sum();
                held.get_or_create(&subset)
                    .set(i64::try_from(owned).unwrap_or(i64::MAX));
                for r in &s.replicas {
                    pending
                        .get_or_create(&vec![
                            mesh_label.clone(),
                            ("pod".into(), r.holder.pod.to_string()),
                        ])
                        .set(i64::try_from(r.pending).unwrap_or(i64::MAX));
                }
            }
        }
        registry.register(
            "sessions",
            "Connected runtimes, by mesh and subset",
            sessions,
        );
        registry.register(
            "pending_messages",
            "Messages queued for a runtime and not yet sent",
            pending,
        );
        registry.register(
            "held_keys",
            "Keys held by a subset's runtimes (not counting moving ones)",
            held,
        );
        registry.register("moving_keys", "Keys being moved, by mesh", moving);
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
