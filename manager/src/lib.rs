//! The opmesh manager: watches the API server once per resource, routes each
//! key to one runtime sidecar, and serves the sidecars over gRPC.
//!
//! The rooms, from the pure core outwards:
//!
//! - `policy` — a spec compiled into a validated routing policy: selectors,
//!   pins, weight ranges and the replica ring. Pure.
//! - `mesh` — one mesh's state: its types, the index of objects by primary
//!   key, and who holds each key. Pure.
//! - `coordinator` — the one owner of all mutable state. `step(input, now)`
//!   returns effects; messages for runtimes go into each session's outbox.
//!   No I/O, no clock, no client: property-tested in process.
//! - `driver` — the coordinator's task: feeds it inputs and the time,
//!   starts the watches it asks for, publishes its snapshots.
//! - `watch` — watchers as streams; they know nothing of their reader.
//! - `server` — the gRPC edge: admission and session pumps.
//! - `snapshot` — the typed view the coordinator publishes (`arc-swap`), read
//!   by the status writer (`status`) and, next, the admin API, webhook and
//!   rollout controller.
//! - `leader` — leader election through a Lease.
//! - `id`, `gvk` — typed identities and resource types.
//! - [`config`], [`crd`], `error` — settings, the `OperatorMesh` resource,
//!   and why a runtime is refused (mapped to a gRPC status in one place).
//!
//! The invariant: a key is held by at most one runtime at any time, and
//! moves only through revoke → released → assign, a goodbye, or the end of
//! the holder's lease.

#![warn(unreachable_pub)]

pub mod config;
mod coordinator;
// The schema derive copies the spec types into a private module, which the
// lint sees as unreachable `pub` items; the types themselves are public.
#[allow(unreachable_pub)]
pub mod crd;
mod driver;
mod error;
mod gvk;
mod id;
mod leader;
mod mesh;
mod policy;
mod server;
mod snapshot;
mod status;
mod task;
mod watch;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use kube::Client;
use opmesh_proto::v1::mesh_service_server::MeshServiceServer;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;

use crate::{driver::Driver, snapshot::Published, task::Task};

/// Capacity of the coordinator's input channel; a full channel slows the
/// watches.
const INPUTS: usize = 4096;

/// Runs the manager on an already-bound `listener` until `shutdown` resolves.
/// With leader election, runtimes are refused until this manager leads, and
/// losing the lead ends `run` with an error (restart to stand by again).
pub async fn run(
    config: Config,
    client: Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(INPUTS);
    let (leader_tx, leader) = tokio::sync::watch::channel(!config.leader_election);
    let election = if config.leader_election {
        Some(leader::elect(client.clone(), &config, leader_tx).await?)
    } else {
        None
    };

    // The coordinator starts once this manager leads; sessions are refused
    // before.
    let coordinator = {
        let (client, config, tx, mut leader) =
            (client.clone(), config.clone(), tx.clone(), leader.clone());
        Task::spawn(async move {
            if leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            tracing::info!("leading: starting the coordinator");
            let published = Arc::new(Published::new());
            let _status = Task::spawn(status::run(client.clone(), published.clone()));
            let driver = Driver {
                client,
                mesh_namespace: config.mesh_namespace.clone(),
                lease_ttl: config.lease_ttl(),
                published,
            };
            driver.run(tx, rx).await;
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
    let lost_flag = Arc::new(AtomicBool::new(false));
    let flag = lost_flag.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lost_lead => flag.store(true, Ordering::SeqCst),
        }
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await;
    drop(coordinator);
    drop(election);
    if lost_flag.load(Ordering::SeqCst) {
        anyhow::bail!("lost the leader Lease; exiting so a restart can stand by");
    }
    result.map_err(Into::into)
}
