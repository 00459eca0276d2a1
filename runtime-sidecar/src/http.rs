//! `/healthz`, `/readyz` and `/metrics`.

use std::{convert::Infallible, sync::Arc};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use crate::state::Runtime;

/// Serves health and metrics on `listener` until `shutdown` fires.
pub(crate) async fn serve(
    rt: Arc<Runtime>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(e) => {
                tracing::warn!(error = %e, "health listener accept failed");
                continue;
            }},
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, Infallible>(respond(&rt, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            // Health probes are short; a stuck client must not pin a task.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn respond<B>(rt: &Runtime, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz" | "/livez" => (StatusCode::OK, "ok".to_string()),
        "/readyz" => {
            if rt.ready() {
                (StatusCode::OK, "ok".to_string())
            } else if rt.registered().is_none() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the operator to register".to_string(),
                )
            } else if !rt.operator_present() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the operator is gone or stopping; its keys are released after the grace period"
                        .to_string(),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no session with the manager, or slice not synced".to_string(),
                )
            }
        }
        "/metrics" => (StatusCode::OK, rt.metrics.encode()),
        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
