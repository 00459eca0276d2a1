//! The opmesh manager: watches the API server once per resource, routes each
//! key to one runtime sidecar, and serves the sidecars over gRPC.
//!
//! - [`config`] — settings.
//! - [`crd`] — the `OperatorMesh` custom resource.
//! - [`selector`] — label selector matching.
//! - [`policy`] — compiles a spec into a validated routing [`policy::Policy`].
//! - [`routing`] — the pure routing function (FNV-1a weight ranges, replica ring).
//! - [`ownership`] — who holds each key; revoke → released → assign.
//! - [`pending`] — the per-runtime coalescing send queue.
//! - [`watch`] — one watch per resource type, plus Namespaces and meshes.
//! - [`core`] — the single task that owns all state and applies the policy.
//! - [`server`] — the gRPC `MeshService` for runtime sidecars.
//! - [`status`] — writes `OperatorMesh` status.
//! - [`error`] — why a runtime is refused, mapped to gRPC status in one place.
//! - [`leader`] — leader election through a Lease, for several managers.
//!
//! The invariant: a key is held by at most one runtime at any time, and
//! moves only through revoke → released → assign.

pub mod config;
pub mod core;
pub mod crd;
pub mod error;
pub mod leader;
pub mod ownership;
pub mod pending;
pub mod policy;
pub mod routing;
pub mod selector;
pub mod server;
pub mod status;
pub mod watch;

use std::future::Future;

use kube::Client;
use opmesh_proto::v1::mesh_service_server::MeshServiceServer;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;

/// Capacity of the core's input channel; a full channel slows the watches.
const CORE_INPUTS: usize = 4096;

/// Runs the manager on an already-bound `listener` until `shutdown` resolves.
/// With leader election, runtimes are refused until this manager leads, and
/// losing the lead ends `run` with an error (restart to stand by again).
pub async fn run(
    config: Config,
    client: Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(CORE_INPUTS);
    let (leader_tx, leader) = tokio::sync::watch::channel(!config.leader_election);
    let election = if config.leader_election {
        Some(leader::elect(client.clone(), &config, leader_tx).await?)
    } else {
        None
    };

    // The core starts once this manager leads; sessions are refused before.
    let core_task = {
        let (client, config, tx, mut leader) =
            (client.clone(), config.clone(), tx.clone(), leader.clone());
        tokio::spawn(async move {
            if leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            tracing::info!("leading: starting the core");
            let (core, status_rx) = core::Core::new(client.clone(), tx.clone(), config.lease_ttl());
            let owned = vec![
                watch::namespaces(client.clone(), tx.clone()),
                watch::meshes(client.clone(), config.mesh_namespace.as_deref(), tx),
            ];
            let status_task = tokio::spawn(status::run(client, status_rx));
            core.run(rx, owned).await;
            status_task.abort();
        })
    };

    let service = MeshServiceServer::new(server::MeshServer::new(
        tx,
        client,
        config.lease_ttl(),
        leader.clone(),
    ));
    tracing::info!(addr = %listener.local_addr()?, "manager listening");
    let mut lost = leader.clone();
    let lost_lead = async move {
        // Only a leader can lose the lead.
        if lost.wait_for(|l| *l).await.is_ok() {
            let _ = lost.wait_for(|l| !*l).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let lost_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = lost_flag.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lost_lead => flag.store(true, std::sync::atomic::Ordering::SeqCst),
        }
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await;
    core_task.abort();
    drop(election);
    if lost_flag.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("lost the leader Lease; exiting so a restart can stand by");
    }
    result.map_err(Into::into)
}
