//! The mutating admission webhook, `POST /mutate-pods` over TLS (the
//! session port's certificate, reloaded the same way). It injects the
//! runtime into pods labelled `opmesh.io/mesh: <mesh>` (see `inject`) and
//! refuses a labelled pod whose mesh does not exist, or that two meshes'
//! selectors match. Pods without the label never reach it: the webhook
//! configuration's `objectSelector` keeps them away, so the rest of the
//! cluster never waits on the manager.

use std::{convert::Infallible, sync::Arc};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use tokio::net::TcpListener;

use crate::{
    crd::OperatorMesh,
    inject::{Injection, MESH_LABEL, inject},
    policy::selector,
    tls,
};

/// The largest AdmissionReview read.
const MAX_BODY: usize = 4 << 20;

/// Serves the webhook on `listener` until dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    certificate: Arc<tls::Certificate>,
    client: Client,
    settings: Injection,
) -> anyhow::Result<()> {
    let acceptor = certificate.acceptor_for(&[b"http/1.1"])?;
    let mut incoming = tls::incoming(listener, acceptor);
    let state = Arc::new((client, settings));
    while let Some(conn) = tokio_stream::StreamExt::next(&mut incoming).await {
        let Ok(stream) = conn else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state.0, &state.1, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    Ok(())
}

async fn respond(
    client: &Client,
    settings: &Injection,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != Method::POST || req.uri().path() != "/mutate-pods" {
        return reply(StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
    };
    let response = match serde_json::from_slice::<AdmissionReview<Pod>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            let request: Result<AdmissionRequest<Pod>, _> = r.try_into();
            request.map_err(|e| e.to_string())
        }) {
        Ok(request) => review(client, settings, &request).await,
        Err(e) => AdmissionResponse::invalid(format!("not an AdmissionReview of a Pod: {e}")),
    };
    reply(
        StatusCode::OK,
        serde_json::to_vec(&response.into_review()).unwrap_or_default(),
    )
}

/// The answer for one pod.
async fn review(
    client: &Client,
    settings: &Injection,
    request: &AdmissionRequest<Pod>,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let Some(pod) = &request.object else {
        return allow;
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.namespace())
        .unwrap_or_default();
    let Ok((spec, annotations)) = inject(pod, &namespace, settings) else {
        return allow;
    };
    let name = pod.labels().get(MESH_LABEL).cloned().unwrap_or_default();
    if let Err(why) = check_meshes(client, &namespace, &name, pod).await {
        return allow.deny(why);
    }
    let add = |path: &[&str], value: serde_json::Value| {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(path.iter().copied()),
            value,
        })
    };
    let patch = Patch(vec![
        add(&["spec", "initContainers"], json(&spec.init_containers)),
        add(&["spec", "containers"], json(&spec.containers)),
        add(&["spec", "volumes"], json(&spec.volumes)),
        add(&["metadata", "annotations"], json(&annotations)),
    ]);
    match allow.clone().with_patch(patch) {
        Ok(r) => r,
        Err(e) => allow.deny(format!("cannot encode the injection: {e}")),
    }
}

/// Fails, saying why, unless mesh `namespace/name` exists and no other
/// mesh of the namespace selects `pod` too.
async fn check_meshes(
    client: &Client,
    namespace: &str,
    name: &str,
    pod: &Pod,
) -> Result<(), String> {
    let meshes = Api::<OperatorMesh>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .map_err(|e| format!("opmesh cannot read the OperatorMeshes of {namespace}: {e}"))?;
    if !meshes.items.iter().any(|m| m.name_any() == name) {
        return Err(format!(
            "pod is labelled {MESH_LABEL}={name}, but there is no OperatorMesh {namespace}/{name}"
        ));
    }
    let labels = pod.labels();
    let selecting: Vec<String> = meshes
        .items
        .iter()
        .filter(|m| selector::matches(&m.spec.selector, labels))
        .map(|m| format!("{namespace}/{}", m.name_any()))
        .collect();
    if selecting.len() > 1 {
        return Err(format!(
            "two meshes select this pod ({}); a pod runs in one mesh: narrow their spec.selector",
            selecting.join(" and ")
        ));
    }
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}
