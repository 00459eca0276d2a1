//! End-to-end tests for opmesh and the harness they run on.
//!
//! - [`control_plane`]: a real kube-apiserver and etcd, built from the Go module
//!   proxy by `tests/control-plane/build.sh`, one per test binary.
//! - [`cluster`]: helpers for namespaces, Pods, bound tokens and token reviews.
//! - [`mesh`]: the manager, sidecars and example operator as real processes.
//! - [`tls`]: the session port's CA and serving certificates.
//! - [`session`]: a raw session client, for hellos no runtime would send.
//! - [`proxy`]: a loopback TCP proxy that cuts, blackholes, delays and
//!   stalls connections.
//! - [`injected`]: runs a webhook-injected pod's runtime and operator.
//! - [`manifests`]: renders the Helm chart and kustomize overlays and applies
//!   them with strict validation.
//! - [`history`]: checks reconcile records for overlaps, stale writes and
//!   contested handoffs.
//! - [`landed`]: watches in which order the example operator's writes land.
//! - [`world`]: one test's namespace, manager and replicas.
//! - [`oracle`]: where the published routing function sends a key.
//! - [`eventually`]: poll a condition until a deadline instead of sleeping.
//!
//! The tests themselves live in `tests/tests/`.

pub mod cluster;
pub mod control_plane;
pub mod history;
pub mod injected;
pub mod landed;
pub mod manifests;
pub mod mesh;
pub mod oracle;
pub mod proxy;
pub mod session;
pub mod tls;
pub mod world;

use std::{future::Future, time::Duration};

pub use control_plane::ControlPlane;

/// Polls `check` every 100 ms until it returns `Ok(Some(value))`, and fails
/// with `what` and the last error if `timeout` passes first. Errors from
/// `check` count as "not yet".
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
