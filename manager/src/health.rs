//! `/healthz`, `/readyz` and `/metrics`, plain HTTP on `--health-listen`.
//!
//! - `/readyz`: 200 only on the leader, once its coordinator routes
//!   (namespaces listed, earlier leases run out) and has run within half a
//!   lease; 503 on a standby or a stalled leader, saying which.
//! - `/healthz`: 200 while the manager does its part: a leader whose
//!   coordinator runs, or a standby. The Deployment's probes use this one
//!   for readiness and liveness, so a standby counts as available for the
//!   PodDisruptionBudget and the Service (a standby refuses runtimes with a
//!   status that makes them retry); `/readyz` is for whoever needs the
//!   leader.
//! - `/metrics`: see [`crate::metrics`].

use std::{convert::Infallible, sync::Arc, time::Instant};

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{leader::Authority, metrics::Metrics, snapshot::Published};

/// What the endpoints read.
pub(crate) struct Health {
    /// The coordinator's published snapshot.
    pub(crate) published: Arc<Published>,
    /// Whether this manager leads.
    pub(crate) authority: Arc<Authority>,
    /// The coordinator's counters.
    pub(crate) metrics: Arc<Metrics>,
    /// The lease TTL granted to runtimes.
    pub(crate) lease_ttl: std::time::Duration,
}

/// Serves the endpoints on `listener` until dropped.
pub(crate) async fn serve(listener: TcpListener, health: Arc<Health>) -> anyhow::Result<()> {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(health.respond(&req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// === impl Health ===

impl Health {
    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let now = Instant::now();
        let leading = self.authority.leading(now);
        let (status, content_type, body) = match req.uri().path() {
            "/healthz" | "/livez" => match self.problem(now, leading, false) {
                None => (StatusCode::OK, "text/plain", "ok".to_string()),
                Some(p) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", p),
            },
            "/readyz" => match self.problem(now, leading, true) {
                None => (StatusCode::OK, "text/plain", "ok: leading".to_string()),
                Some(p) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", p),
            },
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(&self.published.load(), leading),
            ),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found".to_string()),
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    }

    /// What keeps this manager from being ready (`leader` true: from being
    /// the leader that routes), if anything.
    fn problem(&self, now: Instant, leading: bool, leader: bool) -> Option<String> {
        if !leading {
            return leader.then(|| "standby: another manager leads".to_string());
        }
        if !self.authority.may_renew(now, self.lease_ttl) {
            return Some("leading, but the coordinator has not run within half a lease".into());
        }
        if leader && !self.published.load().synced {
            return Some(
                "leading, not routing yet: listing namespaces, or waiting out the leases an \
                 earlier manager granted"
                    .into(),
            );
        }
        None
    }
}
