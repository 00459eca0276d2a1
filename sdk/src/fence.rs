//! Fenced writes: a kube `Client` that refuses to write once this replica no
//! longer owns the key being reconciled, or once too little of its lease
//! remains for the write to finish.
//!
//! The fence is a tower `Service` around the kube client's own stack. Reads
//! pass through; every write first asks the sidecar whether the key is still
//! owned and how much lease remains. A write is refused with less than
//! [`FENCE_MARGIN`] left, and otherwise must complete before the lease would run
//! out, less the margin: a write that takes longer fails with [`Fenced`]
//! instead of being waited for. A refused write surfaces as
//! `kube::Error::Service` wrapping [`Fenced`].
//!
//! The timeout bounds how long this replica acts on a write; a request the
//! apiserver already received may still be applied after it. Closing that
//! gap needs a fence on the server side (see `docs/design-notes.md`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::Poll,
    time::Duration,
};

use http::{Method, Request, Response};
use kube::client::Body;
use opmesh_proto::v1::{
    OwnershipRequest, OwnershipResponse, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// The least lease a write may start with, and by which it must finish
/// before the lease runs out: room for the request to reach the apiserver.
pub const FENCE_MARGIN: Duration = Duration::from_millis(250);

/// A write refused because this replica may no longer act for the key.
#[derive(Debug, thiserror::Error)]
#[error("write for {key:?} refused: {reason}")]
pub struct Fenced {
    /// The key being reconciled (empty outside a reconcile).
    pub key: String,
    /// Why: the key moved away, the lease ran (or is about to run) out, or
    /// there is no reconcile to write for.
    pub reason: String,
}

/// The [`Fenced`] refusal inside `error`, if that is what it is: a write
/// through [`crate::fenced`] that this replica may no longer make.
pub fn fenced_error(error: &kube::Error) -> Option<&Fenced> {
    match error {
        kube::Error::Service(e) => e.downcast_ref::<Fenced>(),
        _ => None,
    }
}

/// True if `error` is a write refused by the fence: this replica lost the
/// key or its lease, so retrying cannot help (the new owner will do the
/// work).
pub fn is_fenced(error: &kube::Error) -> bool {
    fenced_error(error).is_some()
}

/// The fencing service; see the module docs.
#[derive(Clone)]
pub struct Fence {
    /// The key and the sidecar to ask; none outside a reconcile.
    scope: Option<(String, RuntimeServiceClient<Channel>)>,
    inner: kube::Client,
    /// Where refused and conflicting writes are counted, for the
    /// reconcile's report.
    counts: Arc<WriteCounts>,
}

/// Writes of one reconcile that did not go through: the mesh's rollout
/// analysis compares how often they happen on each version.
#[derive(Debug, Default)]
pub struct WriteCounts {
    /// Refused by the fence (the key or the lease was lost).
    pub fenced: AtomicU32,
    /// Refused by the API server with 409 Conflict.
    pub conflicting: AtomicU32,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === impl Fence ===

impl Fence {
    /// Fences writes made through `inner` on behalf of `key`.
    pub fn new(key: String, sidecar: RuntimeServiceClient<Channel>, inner: kube::Client) -> Self {
        Self {
            scope: Some((key, sidecar)),
            inner,
            counts: Arc::default(),
        }
    }

    /// Counts the writes that do not go through (refused by the fence, or
    /// by the API server with 409 Conflict) in `counts`.
    pub fn counting(mut self, counts: Arc<WriteCounts>) -> Self {
        self.counts = counts;
        self
    }

    /// A fence with no reconcile to write for: it refuses every write.
    pub fn outside_reconcile(inner: kube::Client) -> Self {
        Self {
            scope: None,
            inner,
            counts: Arc::default(),
        }
    }

    /// A kube client whose writes go through this fence.
    pub fn into_client(self) -> kube::Client {
        let ns = self.inner.default_namespace().to_string();
        kube::Client::new(self, ns)
    }
}

/// How long a write for `key` may take, from the sidecar's `answer`.
fn budget(key: &str, answer: &OwnershipResponse) -> Result<Duration, Fenced> {
    let refuse = |reason: String| Fenced {
        key: key.to_string(),
        reason,
    };
    if !answer.lease_valid {
        return Err(refuse("this replica's lease has run out".into()));
    }
    if !answer.owned {
        return Err(refuse("the key is no longer owned by this replica".into()));
    }
    let remaining = Duration::from_millis(answer.lease_remaining_ms);
    if remaining <= FENCE_MARGIN {
        return Err(refuse(format!(
            "only {remaining:?} of this replica's lease remains, less than the {FENCE_MARGIN:?} a write needs"
        )));
    }
    Ok(remaining - FENCE_MARGIN)
}

impl tower::Service<Request<Body>> for Fence {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (scope, inner, counts) = (self.scope.clone(), self.inner.clone(), self.counts.clone());
        Box::pin(async move {
            let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
            if read {
                return inner.send(req).await.map_err(|e| Box::new(e) as BoxError);
            }
            let result = write(scope, inner, req).await;
            match &result {
                Ok(response) if response.status() == http::StatusCode::CONFLICT => {
                    counts.conflicting.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.is::<Fenced>() => {
                    counts.fenced.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            result
        })
    }
}

/// Sends a write through the fence: asks the sidecar for the lease left,
/// then gives the write that long.
async fn write(
    scope: Option<(String, RuntimeServiceClient<Channel>)>,
    inner: kube::Client,
    req: Request<Body>,
) -> Result<Response<Body>, BoxError> {
    let Some((key, mut sidecar)) = scope else {
        return Err(Box::new(Fenced {
            key: String::new(),
            reason: "opmesh_sdk::fenced() was called outside a reconcile, so there is \
                     no key to write for; call it inside reconcile"
                .into(),
        }) as BoxError);
    };
    // The sidecar measured the remaining lease after this instant,
    // so counting the budget from here stays on the safe side of
    // the round trip.
    let asked = tokio::time::Instant::now();
    let answer = sidecar
        .ownership(OwnershipRequest { key: key.clone() })
        .await?
        .into_inner();
    let budget = budget(&key, &answer).map_err(|f| Box::new(f) as BoxError)?;
    match tokio::time::timeout_at(asked + budget, inner.send(req)).await {
        Ok(result) => result.map_err(|e| Box::new(e) as BoxError),
        Err(_) => Err(Box::new(Fenced {
            key,
            reason: format!(
                "the write did not finish within {budget:?}, before this replica's lease \
                 would run out"
            ),
        }) as BoxError),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};

    use super::*;

    fn answer(owned: bool, lease_valid: bool, remaining_ms: u64) -> OwnershipResponse {
        OwnershipResponse {
            owned,
            lease_valid,
            lease_remaining_ms: remaining_ms,
        }
    }

    #[test]
    fn a_write_gets_the_lease_left_less_the_margin() {
        assert_eq!(
            budget("ns/a", &answer(true, true, 3000)).unwrap(),
            Duration::from_millis(3000) - FENCE_MARGIN
        );
        let short = budget("ns/a", &answer(true, true, 200)).unwrap_err();
        assert!(short.reason.contains("less than"), "{short}");
        assert!(budget("ns/a", &answer(false, true, 3000)).is_err());
        assert!(budget("ns/a", &answer(true, false, 0)).is_err());
    }

    #[tokio::test]
    async fn outside_a_reconcile_every_write_is_refused() {
        // A stand-in API server that counts what reaches it.
        let reached = Arc::new(AtomicUsize::new(0));
        let seen = reached.clone();
        let server = tower::service_fn(move |_req: Request<Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = serde_json::to_vec(&ConfigMap::default()).unwrap();
                Ok::<_, std::convert::Infallible>(Response::new(Body::from(body)))
            }
        });
        let plain = kube::Client::new(server, "default");
        let client = crate::fenced(&plain);
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let err = api
            .create(&PostParams::default(), &ConfigMap::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("outside a reconcile"), "{err}");
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "the write reached the server"
        );
        // Reads still pass.
        let _ = api.get_opt("x").await;
        assert_eq!(reached.load(Ordering::SeqCst), 1);
    }
}
