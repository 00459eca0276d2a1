//! Fenced writes: a kube `Client` that refuses to write once this replica no
//! longer owns the key being reconciled, or once its lease has run out.
//!
//! The fence is a tower `Service` around the kube client's own stack. Reads
//! pass through; every write first asks the sidecar whether the key is still
//! owned and the lease valid. A refused write fails with [`Fenced`], which
//! kube surfaces as `kube::Error::Service`.

use std::{future::Future, pin::Pin, task::Poll};

use http::{Method, Request, Response};
use kube::client::Body;
use opmesh_proto::v1::{OwnershipRequest, runtime_service_client::RuntimeServiceClient};
use tonic::transport::Channel;

/// A write refused because this replica may no longer act for the key.
#[derive(Debug, thiserror::Error)]
#[error("write for {key} refused: {reason}")]
pub struct Fenced {
    /// The key being reconciled.
    pub key: String,
    /// Why: the key moved away, or the lease ran out.
    pub reason: &'static str,
}

/// The fencing service; see the module docs.
#[derive(Clone)]
pub struct Fence {
    key: String,
    sidecar: RuntimeServiceClient<Channel>,
    inner: kube::Client,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === impl Fence ===

impl Fence {
    /// Fences writes made through `inner` on behalf of `key`.
    pub fn new(key: String, sidecar: RuntimeServiceClient<Channel>, inner: kube::Client) -> Self {
        Self {
            key,
            sidecar,
            inner,
        }
    }

    /// A kube client whose writes go through this fence.
    pub fn into_client(self) -> kube::Client {
        let ns = self.inner.default_namespace().to_string();
        kube::Client::new(self, ns)
    }
}

impl tower::Service<Request<Body>> for Fence {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (key, mut sidecar, inner) =
            (self.key.clone(), self.sidecar.clone(), self.inner.clone());
        Box::pin(async move {
            let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
            if !read {
                let answer = sidecar
                    .ownership(OwnershipRequest { key: key.clone() })
                    .await?
                    .into_inner();
                if !answer.lease_valid {
                    return Err(Box::new(Fenced {
                        key,
                        reason: "this replica's lease has run out",
                    }) as BoxError);
                }
                if !answer.owned {
                    return Err(Box::new(Fenced {
                        key,
                        reason: "the key is no longer owned by this replica",
                    }) as BoxError);
                }
            }
            inner.send(req).await.map_err(|e| Box::new(e) as BoxError)
        })
    }
}
