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
//! - `admin` — the admin API ([`api`]), and `health` — `/healthz`,
//!   `/readyz` and `/metrics` (`metrics`); both read the published
//!   snapshot.
//! - `snapshot` — the typed view the coordinator publishes (`arc-swap`), read
//!   by the status writer (`status`) and, next, the admin API, webhook and
//!   rollout controller.
//! - `leader` — leader election through a Lease, and this manager's
//!   authority as a deadline on its own clock: past it, the driver closes
//!   every session and heartbeats are no longer renewed.
//! - `id`, `gvk` — typed identities and resource types.
//! - [`config`], [`crd`], `error` — settings, the `OperatorMesh` resource,
//!   and why a runtime is refused (mapped to a gRPC status in one place).
//!
//! The invariant: a key is held by at most one runtime at any time, and
//! moves only through revoke → released → assign, a goodbye, or the end of
//! the holder's lease.

#![warn(unreachable_pub)]

mod admin;
mod admission;
mod analysis;
pub mod api;
#[doc(hidden)]
pub mod bench;
pub mod config;
mod coordinator;
// The schema derive copies the spec types into a private module, which the
// lint sees as unreachable `pub` items; the types themselves are public.
#[allow(unreachable_pub)]
pub mod crd;
mod driver;
mod error;
mod events;
mod gvk;
mod health;
mod id;
mod inject;
mod leader;
mod limits;
mod mesh;
mod metrics;
mod object;
mod outcomes;
mod policy;
mod rollout;
mod server;
mod snapshot;
mod status;
mod task;
mod tls;
mod watch;
mod webhook;

use std::{future::Future, sync::Arc};

use kube::Client;
use opmesh_proto::v1::mesh_service_server::MeshServiceServer;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;

use crate::{driver::Driver, leader::Authority, snapshot::Published, task::Task};

/// Capacity of the coordinator's input channel; a full channel slows the
/// watches.
const INPUTS: usize = 4096;

/// How long open sessions get to close once the manager stops, before their
/// connections are dropped.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the manager on an already-bound `listener` until `shutdown` resolves.
/// With leader election, runtimes are refused until this manager leads.
/// Losing the lead (by this manager's own clock, see `leader`) closes every
/// session and ends `run` with an error within a few seconds, even with
/// sessions open; restart to stand by again. So does a coordinator that
/// stops.
pub async fn run(
    config: Config,
    client: Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // TLS first: a manager that would serve plaintext by mistake never
    // starts.
    let mut managed = None;
    let certificate = match (
        &config.tls_cert_file,
        &config.tls_key_file,
        &config.tls_secret,
    ) {
        (Some(cert), Some(key), _) => Some(tls::Certificate::load(cert, key)?),
        (_, _, Some((namespace, name))) => {
            let m = tls::Managed::new(
                client.clone(),
                namespace,
                name,
                config.tls_dns_names.clone(),
                std::time::Duration::from_secs(config.tls_cert_validity_seconds),
            )
            .with_webhook(config.webhook_configuration.clone());
            let issued = m.ensure().await?;
            managed = Some(m);
            Some(Arc::new(tls::Certificate::from_pem(
                &issued.cert,
                &issued.key,
            )?))
        }
        _ if config.insecure_plaintext => {
            tracing::warn!(
                "--insecure-plaintext: sessions are not encrypted; anyone on the network path \
                 can read the objects sent to runtimes and pose as the manager"
            );
            None
        }
        _ => anyhow::bail!(
            "no TLS certificate for the session port: pass --tls-cert-file and --tls-key-file \
             (e.g. tls.crt and tls.key of a mounted kubernetes.io/tls Secret), or --tls-secret \
             NAMESPACE/NAME for one the manager makes and renews, or --insecure-plaintext for \
             development only"
        ),
    };
    let (tx, rx) = mpsc::channel(INPUTS);
    let authority = Arc::new(Authority::new(config.leader_election));
    let election = if config.leader_election {
        Some(leader::elect(client.clone(), &config, authority.clone()).await?)
    } else {
        None
    };

    // The coordinator starts once this manager leads and stops when it no
    // longer does; sessions are refused outside that window.
    let published = Arc::new(Published::new());
    let metrics = Arc::new(metrics::Metrics::default());
    let outcomes = Arc::new(outcomes::Outcomes::default());
    let mut coordinator = {
        let (client, config, tx, authority, published, metrics, outcomes) = (
            client.clone(),
            config.clone(),
            tx.clone(),
            authority.clone(),
            published.clone(),
            metrics.clone(),
            outcomes.clone(),
        );
        tokio::spawn(async move {
            authority.wait_leading().await;
            tracing::info!("leading: starting the coordinator");
            let _status = Task::spawn(status::run(client.clone(), published.clone()));
            let _events = Task::spawn(events::run(
                client.clone(),
                published.clone(),
                config.identity.clone(),
            ));
            let _rollouts = Task::spawn(rollout::run(
                client.clone(),
                published.clone(),
                outcomes.clone(),
                config.mesh_namespace.clone(),
                config.identity.clone(),
            ));
            let driver = Driver {
                client,
                mesh_namespace: config.mesh_namespace.clone(),
                lease_ttl: config.lease_ttl(),
                published,
                authority,
                metrics,
                outcomes,
            };
            driver.run(tx, rx).await;
        })
    };

    if config.insecure_allow_unauthenticated_runtimes {
        tracing::warn!(
            "--insecure-allow-unauthenticated-runtimes: runtimes without a token are admitted as \
             whatever pod they claim; any process that reaches this port can impersonate an operator"
        );
    }
    let admission = admission::Admission::new(
        client.clone(),
        !config.insecure_allow_unauthenticated_runtimes,
    );
    let client_for_webhook = client.clone();
    let client_for_admin = client.clone();
    let service = MeshServiceServer::new(
        server::MeshServer::new(
            tx,
            client,
            config.lease_ttl(),
            authority.clone(),
            admission,
            published.clone(),
            limits::Limits::new(
                usize::try_from(config.max_sessions).unwrap_or(usize::MAX),
                config.max_hellos_per_second,
            ),
        )
        .with_reports(outcomes.clone(), metrics.clone()),
    )
    .max_decoding_message_size(server::MAX_MESSAGE);
    tracing::info!(addr = %listener.local_addr()?, tls = certificate.is_some(), "manager listening");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(service);
    let stopped = async move {
        let _ = stop_rx.await;
    };
    // The webhook, on a port of its own, with the same certificate.
    if config.webhook_listen.is_some() && certificate.is_none() {
        anyhow::bail!(
            "--webhook-listen needs a TLS certificate: the apiserver calls webhooks over TLS only"
        );
    }
    let _webhook = match (&config.webhook_listen, &certificate) {
        (Some(addr), Some(cert)) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --webhook-listen {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "sidecar-injection webhook listening");
            let settings = inject::Injection {
                image: config.runtime_image.clone(),
                manager_addr: config.injected_manager_addr.clone(),
            };
            let serving = webhook::serve(listener, cert.clone(), client_for_webhook, settings);
            Some(Task::spawn(async move {
                if let Err(e) = serving.await {
                    tracing::error!(error = %format!("{e:#}"), "the webhook stopped");
                }
            }))
        }
        _ => None,
    };
    // The admin API, on a port of its own, with the same certificate.
    if config.admin_listen.is_some() && certificate.is_none() {
        anyhow::bail!(
            "--admin-listen needs a TLS certificate: callers send their Kubernetes tokens to it"
        );
    }
    let _admin = match (&config.admin_listen, &certificate) {
        (Some(addr), Some(cert)) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --admin-listen {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "admin API listening");
            let admin = Arc::new(admin::Admin {
                client: client_for_admin.clone(),
                published: published.clone(),
                authority: authority.clone(),
                lease: config
                    .leader_election
                    .then(|| (config.lease_namespace.clone(), config.lease_name.clone())),
                auth: admin::Auth::new(client_for_admin),
                outcomes: outcomes.clone(),
            });
            let serving = admin::serve(listener, cert.clone(), admin);
            Some(Task::spawn(async move {
                if let Err(e) = serving.await {
                    tracing::error!(error = %format!("{e:#}"), "the admin API stopped");
                }
            }))
        }
        _ => None,
    };
    let _health = match &config.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --health-listen {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "health and metrics listening");
            let health = Arc::new(health::Health {
                published: published.clone(),
                authority: authority.clone(),
                metrics: metrics.clone(),
                lease_ttl: config.lease_ttl(),
            });
            Some(Task::spawn(async move {
                if let Err(e) = health::serve(listener, health).await {
                    tracing::error!(error = %format!("{e:#}"), "the health endpoint stopped");
                }
            }))
        }
        None => None,
    };
    let _managed = match (managed, &certificate) {
        (Some(m), Some(cert)) => Some(Task::spawn(m.run(cert.clone(), published.clone()))),
        _ => None,
    };
    let mut _reload = None;
    let mut server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match &certificate {
        Some(cert) => {
            _reload = Some(Task::spawn(cert.clone().watch()));
            let incoming = tls::incoming(listener, cert.acceptor()?);
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        None => {
            // As for TLS sessions (`tls::incoming`): no Nagle delay.
            use futures::StreamExt as _;
            let incoming = TcpListenerStream::new(listener).map(|tcp| {
                let tcp = tcp?;
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(tcp)
            });
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    let ended = tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        _ = shutdown => None,
        ended = &mut coordinator => Some(ended),
    };
    // Stop accepting; open sessions get a moment to close, then are dropped.
    let _ = stop_tx.send(());
    coordinator.abort();
    let _ = tokio::time::timeout(DRAIN, &mut server).await;
    drop(election);
    match ended {
        None => Ok(()),
        Some(_) if !authority.leading(std::time::Instant::now()) => {
            anyhow::bail!("lost the leader Lease; exiting so a restart can stand by")
        }
        Some(Err(e)) if e.is_panic() => anyhow::bail!("the coordinator panicked: {e}"),
        Some(_) => anyhow::bail!("the coordinator stopped; exiting so a restart can recover"),
    }
}
