//! The runtime's metrics, under controller-runtime's names so existing
//! dashboards work.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(String, String)>;

/// Every metric of the runtime, registered once.
pub(crate) struct Metrics {
    registry: Registry,
    name: Labels,
    /// `workqueue_depth`.
    pub(crate) depth: Family<Labels, Gauge>,
    /// `workqueue_adds_total`.
    pub(crate) adds: Family<Labels, Counter>,
    /// `workqueue_retries_total`.
    pub(crate) retries: Family<Labels, Counter>,
    /// `workqueue_queue_duration_seconds`.
    pub(crate) queue_duration: Family<Labels, Histogram>,
    /// `workqueue_work_duration_seconds`.
    pub(crate) work_duration: Family<Labels, Histogram>,
    /// `controller_runtime_reconcile_total` by result.
    pub(crate) reconcile_total: Family<Labels, Counter>,
    /// `controller_runtime_reconcile_errors_total`.
    pub(crate) reconcile_errors: Family<Labels, Counter>,
    /// `controller_runtime_reconcile_time_seconds`.
    pub(crate) reconcile_time: Family<Labels, Histogram>,
    /// `controller_runtime_active_workers`.
    pub(crate) active_workers: Family<Labels, Gauge>,
    /// `controller_runtime_max_concurrent_reconciles`.
    pub(crate) max_concurrent: Family<Labels, Gauge>,
    /// `opmesh_runtime_owned_keys`.
    pub(crate) owned_keys: Gauge,
    /// Time from a heartbeat to the renewal that answers it.
    pub(crate) lease_renewal: Histogram,
    /// Cache reads the operator made by calling the sidecar (Get and List
    /// pages), rather than from its in-process copy.
    pub(crate) cache_calls: Counter,
    /// Copies of the cache being fed to operator processes.
    pub(crate) cache_copies: Gauge,
}

fn buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
    ])
}

// === impl Metrics ===

impl Metrics {
    /// Metrics for controller `name` (the workqueue's and controller's label).
    pub(crate) fn new(name: &str) -> Self {
        let mut registry = Registry::default();
        let depth = Family::<Labels, Gauge>::default();
        let adds = Family::<Labels, Counter>::default();
        let retries = Family::<Labels, Counter>::default();
        let queue_duration =
            Family::<Labels, Histogram>::new_with_constructor(buckets as fn() -> Histogram);
        let work_duration =
            Family::<Labels, Histogram>::new_with_constructor(buckets as fn() -> Histogram);
        let reconcile_total = Family::<Labels, Counter>::default();
        let reconcile_errors = Family::<Labels, Counter>::default();
        let reconcile_time =
            Family::<Labels, Histogram>::new_with_constructor(buckets as fn() -> Histogram);
        let active_workers = Family::<Labels, Gauge>::default();
        let max_concurrent = Family::<Labels, Gauge>::default();
        let owned_keys = Gauge::default();
        let lease_renewal = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "workqueue_depth",
            "Current depth of workqueue",
            depth.clone(),
        );
        registry.register(
            "workqueue_adds",
            "Total number of adds handled by workqueue",
            adds.clone(),
        );
        registry.register(
            "workqueue_retries",
            "Total number of retries handled by workqueue",
            retries.clone(),
        );
        registry.register(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            queue_duration.clone(),
        );
        registry.register(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            work_duration.clone(),
        );
        registry.register(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller",
            reconcile_total.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_errors",
            "Total number of reconciliation errors per controller",
            reconcile_errors.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            reconcile_time.clone(),
        );
        registry.register(
            "controller_runtime_active_workers",
            "Number of currently used workers per controller",
            active_workers.clone(),
        );
        registry.register(
            "controller_runtime_max_concurrent_reconciles",
            "Maximum number of concurrent reconciles per controller",
            max_concurrent.clone(),
        );
        registry.register(
            "opmesh_runtime_owned_keys",
            "Keys this runtime owns",
            owned_keys.clone(),
        );
        let cache_calls = Counter::default();
        let cache_copies = Gauge::default();
        registry.register(
            "opmesh_runtime_cache_calls",
            "Cache reads the operator made by calling the sidecar (Get and List pages) instead of reading its in-process copy",
            cache_calls.clone(),
        );
        registry.register(
            "opmesh_runtime_cache_copies",
            "Copies of the slice cache fed to operator processes",
            cache_copies.clone(),
        );
        registry.register(
            "opmesh_runtime_lease_renewal_seconds",
            "Time from a heartbeat to the manager's renewal of the lease; a renewal later than the lease TTL is a lapsed lease",
            lease_renewal.clone(),
        );
        Self {
            cache_calls,
            cache_copies,
            registry,
            name: vec![("name".into(), name.into())],
            depth,
            adds,
            retries,
            queue_duration,
            work_duration,
            reconcile_total,
            reconcile_errors,
            reconcile_time,
            active_workers,
            max_concurrent,
            owned_keys,
            lease_renewal,
        }
    }

    /// The `name` label for workqueue metrics.
    pub(crate) fn queue(&self) -> &Labels {
        &self.name
    }

    /// The `controller` label, plus `result` when given.
    pub(crate) fn controller(&self, result: Option<&str>) -> Labels {
        let mut l = vec![("controller".to_string(), self.name[0].1.clone())];
        if let Some(r) = result {
            l.push(("result".into(), r.into()));
        }
        l
    }

    /// The Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
