//! The admin API (types and paths in [`crate::api`]): HTTPS on
//! `--admin-listen`, with the session port's certificate. Reads come from
//! the coordinator's published snapshot, so they take no lock on it and
//! cost the mesh nothing; actions write the `OperatorMesh` spec, which
//! stays the one source of truth that kubectl and GitOps see.
//!
//! Every call is authenticated with the caller's own bearer token and
//! authorized with their RBAC on `operatormeshes` ([`auth`]). A standby
//! manager has no snapshot: it answers 503 and names the leader.

mod auth;
mod views;

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Instant};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{
    api::{
        self, ActionResult, DrainRequest, PinRequest, PlanRequest, UnpinRequest, WeightsRequest,
    },
    crd::{ObjectPinSpec, OperatorMesh, OperatorMeshSpec, WeightSpec},
    id::{MeshId, PodId},
    leader::Authority,
    mesh::DRAIN_ANNOTATION,
    snapshot::Published,
    tls,
};

pub(crate) use auth::{Access, Auth, Denied};

/// The largest request body read.
const MAX_BODY: usize = 1 << 20;
/// The field manager of spec changes made through the API.
const FIELD_MANAGER: &str = "opmesh-admin";

/// What the admin API serves from.
pub(crate) struct Admin {
    /// For the spec it writes and the reviews it asks.
    pub(crate) client: Client,
    /// The coordinator's published snapshot.
    pub(crate) published: Arc<Published>,
    /// Whether this manager leads.
    pub(crate) authority: Arc<Authority>,
    /// The leader-election Lease (namespace, name), to name the leader
    /// from a standby.
    pub(crate) lease: Option<(String, String)>,
    /// Reviews callers.
    pub(crate) auth: Auth,
    /// How reconciles ended, as runtimes reported.
    pub(crate) outcomes: Arc<crate::outcomes::Outcomes>,
}

/// An answer: status and JSON body.
type Answer = (StatusCode, Vec<u8>);

/// Serves the admin API on `listener` until dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    certificate: Arc<tls::Certificate>,
    admin: Arc<Admin>,
) -> anyhow::Result<()> {
    let acceptor = certificate.acceptor_for(&[b"http/1.1"])?;
    let mut incoming = tls::incoming(listener, acceptor);
    while let Some(conn) = tokio_stream::StreamExt::next(&mut incoming).await {
        let Ok(stream) = conn else { continue };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    let (status, body) = admin.handle(req).await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    Ok(())
}

/// What a path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Meshes(Option<String>),
    Mesh(MeshId),
    Keys(MeshId),
    Explain(MeshId),
    Plan(MeshId),
    Weights(MeshId),
    Pause(MeshId, bool),
    Pin(MeshId),
    Unpin(MeshId),
    Drain(MeshId),
    Analysis(MeshId),
    Rollout(MeshId),
    RolloutAction(MeshId, &'static str),
}

// === impl Route ===

impl Route {
    /// The route for `method` and `path`, or `None` if there is none.
    fn parse(method: &Method, path: &str) -> Option<Self> {
        let rest = path.strip_prefix(api::PREFIX)?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        let get = method == Method::GET;
        let post = method == Method::POST;
        let mesh = |ns: &str, name: &str| MeshId::new(ns, name);
        Some(match parts.as_slice() {
            ["meshes"] if get => Self::Meshes(None),
            ["namespaces", ns, "meshes"] if get => Self::Meshes(Some((*ns).to_string())),
            ["namespaces", ns, "meshes", name] if get => Self::Mesh(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "keys"] if get => Self::Keys(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "explain"] if get => Self::Explain(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "analysis"] if get => Self::Analysis(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "rollout"] if get => Self::Rollout(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "rollout", action] if post => {
                let action = match *action {
                    "promote" => "promote",
                    "abort" => "abort",
                    "retry" => "retry",
                    _ => return None,
                };
                Self::RolloutAction(mesh(ns, name), action)
            }
            ["namespaces", ns, "meshes", name, "plan"] if post => Self::Plan(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "weights"] if post => Self::Weights(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "pause"] if post => {
                Self::Pause(mesh(ns, name), true)
            }
            ["namespaces", ns, "meshes", name, "resume"] if post => {
                Self::Pause(mesh(ns, name), false)
            }
            ["namespaces", ns, "meshes", name, "pin"] if post => Self::Pin(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "unpin"] if post => Self::Unpin(mesh(ns, name)),
            ["namespaces", ns, "meshes", name, "drain"] if post => Self::Drain(mesh(ns, name)),
            _ => return None,
        })
    }

    /// The access the route needs.
    fn access(&self) -> Access<'_> {
        fn on<'a>(verb: &'static str, id: &'a MeshId) -> Access<'a> {
            Access {
                verb,
                namespace: Some(&id.namespace),
                name: Some(&id.name),
                subresource: None,
            }
        }
        match self {
            Self::Meshes(ns) => Access {
                verb: "list",
                namespace: ns.as_deref(),
                name: None,
                subresource: None,
            },
            Self::Mesh(id)
            | Self::Keys(id)
            | Self::Explain(id)
            | Self::Plan(id)
            | Self::Analysis(id)
            | Self::Rollout(id) => on("get", id),
            Self::RolloutAction(id, _) => on("patch", id),
            Self::Weights(id) | Self::Pause(id, _) | Self::Pin(id) | Self::Unpin(id) => {
                on("patch", id)
            }
            Self::Drain(id) => Access {
                subresource: Some("drain"),
                ..on("patch", id)
            },
        }
    }
}

// === impl Admin ===

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Answer {
        let Some(route) = Route::parse(req.method(), req.uri().path()) else {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "no such admin call: {} {} (see {} and the opmesh_manager::api docs)",
                    req.method(),
                    req.uri().path(),
                    api::PREFIX
                ),
            );
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let user = match self.auth.authenticate(bearer).await {
            Ok(u) => u,
            Err(d) => return denied(d),
        };
        if !self.authority.leading(Instant::now()) {
            let leader = self.leader().await;
            let status = api::Status {
                kind: "Status".into(),
                code: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                reason: "Standby".into(),
                message: match &leader {
                    Some(l) => format!("this manager is standing by; ask the leader, {l}"),
                    None => "this manager is standing by and no leader is known yet".into(),
                },
                leader,
            };
            return (StatusCode::SERVICE_UNAVAILABLE, json(&status));
        }
        if let Err(d) = self.auth.authorize(&user, route.access()).await {
            return denied(d);
        }
        let query = query(req.uri().query().unwrap_or(""));
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        };
        let who = user.username.unwrap_or_default();
        match self.answer(route, &query, &body, &who).await {
            Ok(a) => a,
            Err((code, message)) => error(code, message),
        }
    }

    async fn answer(
        &self,
        route: Route,
        query: &BTreeMap<String, String>,
        body: &[u8],
        who: &str,
    ) -> Result<Answer, (StatusCode, String)> {
        let snapshot = self.published.load();
        let now = Instant::now();
        let mesh = |id: &MeshId| {
            snapshot.meshes.get(id).ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    format!("this manager handles no OperatorMesh {id}"),
                )
            })
        };
        Ok(match route {
            Route::Meshes(ns) => {
                let items = snapshot
                    .meshes
                    .iter()
                    .filter(|(id, _)| ns.as_ref().is_none_or(|ns| *ns == id.namespace))
                    .map(|(id, view)| views::mesh_status(id, view, now))
                    .collect();
                ok(&api::MeshList { items })
            }
            Route::Mesh(id) => ok(&views::mesh_status(&id, mesh(&id)?, now)),
            Route::Keys(id) => ok(&views::keys(mesh(&id)?, query)?),
            Route::Explain(id) => {
                let object = query.get("key").ok_or((
                    StatusCode::BAD_REQUEST,
                    "explain needs ?key=namespace/name (or name, if cluster-scoped)".to_string(),
                ))?;
                let mut e = views::explain(mesh(&id)?, object)?;
                e.outcomes = views::outcomes(self.outcomes.of_object(&id, object));
                ok(&e)
            }
            Route::Rollout(id) => {
                let m = self.mesh(&id).await?;
                ok(&api::Rollout {
                    spec: m.spec.rollout,
                    status: m.status.and_then(|s| s.rollout),
                })
            }
            Route::RolloutAction(id, action) => {
                let m = self.mesh(&id).await?;
                let Some(rollout) = m.spec.rollout else {
                    return Err((
                        StatusCode::NOT_FOUND,
                        format!("{id} declares no rollout (spec.rollout)"),
                    ));
                };
                // Promote and abort name the run (and step) they act on, in
                // an annotation, so they never carry over to a later
                // revision or retry; retry raises the spec's counter.
                let running = m
                    .status
                    .as_ref()
                    .and_then(|s| s.rollout.as_ref())
                    .filter(|s| s.revision == rollout.revision && s.retry == rollout.retry);
                let annotations = |extra: Option<(&str, String)>| {
                    let mut a = serde_json::Map::new();
                    a.insert(
                        "opmesh.io/last-admin-action".into(),
                        format!("{who} rollout {action}").into(),
                    );
                    if let Some((k, v)) = extra {
                        a.insert(k.into(), v.into());
                    }
                    serde_json::Value::Object(a)
                };
                let (spec, annotations, what) = match action {
                    "promote" => {
                        let Some(st) = running.filter(|s| s.phase == "Paused") else {
                            return Err((
                                StatusCode::CONFLICT,
                                format!(
                                    "{id}: the rollout of {} is not paused (it is {}); promote \
                                     passes a pause step",
                                    rollout.revision,
                                    running.map_or("not started", |s| s.phase.as_str())
                                ),
                            ));
                        };
                        let mark = crate::rollout::step_mark(&st.revision, st.retry, st.step);
                        (
                            None,
                            annotations(Some((crate::rollout::PROMOTE_ANNOTATION, mark))),
                            "promoted: the current pause passes",
                        )
                    }
                    "abort" => (
                        None,
                        annotations(Some((
                            crate::rollout::ABORT_ANNOTATION,
                            crate::rollout::run_mark(&rollout.revision, rollout.retry),
                        ))),
                        "aborted: every key returns to stable",
                    ),
                    _ => (
                        Some(serde_json::json!({"rollout": {"retry": rollout.retry + 1}})),
                        annotations(None),
                        "retried: it starts over from the first step",
                    ),
                };
                let mut patch = serde_json::json!({
                    "metadata": {
                        "resourceVersion": m.metadata.resource_version,
                        "annotations": annotations,
                    },
                });
                if let Some(spec) = spec {
                    patch["spec"] = spec;
                }
                let generation = self.patch(&id, &patch).await?;
                ok(&ActionResult {
                    message: format!("{id}: rollout {what}"),
                    generation,
                })
            }
            Route::Analysis(id) => {
                let view = mesh(&id)?;
                ok(&views::analysis(
                    &id,
                    view,
                    query,
                    &self.outcomes,
                    unix_ms_now(),
                )?)
            }
            Route::Plan(id) => {
                let request: PlanRequest = parse(body)?;
                let spec = match (request.spec, request.weights) {
                    (Some(spec), None) => spec,
                    (None, Some(weights)) => with_weights(self.spec(&id).await?, &weights),
                    _ => {
                        return Err((
                            StatusCode::BAD_REQUEST,
                            "a plan needs exactly one of weights or spec".into(),
                        ));
                    }
                };
                ok(&views::plan(mesh(&id)?, &spec)?)
            }
            Route::Weights(id) => {
                let request: WeightsRequest = parse(body)?;
                let spec = with_weights(self.spec(&id).await?, &request.weights);
                // Refused here as the manager would refuse it, not after.
                views::compile(&spec)?;
                let summary = request
                    .weights
                    .iter()
                    .map(|(s, w)| format!("{s}={w}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let patch = serde_json::json!({
                    "metadata": {"annotations": {
                        "opmesh.io/last-admin-action": format!("{who} set weights {summary}")
                    }},
                    "spec": {"routing": {"weights": spec.routing.weights}}
                });
                let generation = self.patch(&id, &patch).await?;
                ok(&ActionResult {
                    message: format!("{id}: weights set to {summary}"),
                    generation,
                })
            }
            Route::Pin(id) => {
                let request: PinRequest = parse(body)?;
                self.pin(&id, &request.object, Some(&request.subset), who)
                    .await?
            }
            Route::Unpin(id) => {
                let request: UnpinRequest = parse(body)?;
                self.pin(&id, &request.object, None, who).await?
            }
            Route::Drain(id) => {
                let request: DrainRequest = parse(body)?;
                self.drain(&id, &request, who).await?
            }
            Route::Pause(id, paused) => {
                let word = if paused { "paused" } else { "resumed" };
                let patch = serde_json::json!({
                    "metadata": {"annotations": {
                        "opmesh.io/last-admin-action": format!("{who} {word} the mesh")
                    }},
                    "spec": {"paused": paused}
                });
                let generation = self.patch(&id, &patch).await?;
                ok(&ActionResult {
                    message: format!("{id}: {word}"),
                    generation,
                })
            }
        })
    }

    /// Adds, replaces or (with `subset` None) removes the pin of `object`.
    async fn pin(
        &self,
        id: &MeshId,
        object: &str,
        subset: Option<&str>,
        who: &str,
    ) -> Result<Answer, (StatusCode, String)> {
        if object.is_empty() || object.starts_with('/') || object.ends_with('/') {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "{object:?} is not an object: use namespace/name, or name if cluster-scoped"
                ),
            ));
        }
        let mesh = self.mesh(id).await?;
        let mut spec = mesh.spec.clone();
        let before = spec.routing.object_pins.len();
        spec.routing.object_pins.retain(|p| p.object != object);
        if let Some(subset) = subset {
            spec.routing.object_pins.push(ObjectPinSpec {
                object: object.to_string(),
                subset: subset.to_string(),
            });
        } else if spec.routing.object_pins.len() == before {
            return Err((
                StatusCode::NOT_FOUND,
                format!("{object} is not pinned in {id}"),
            ));
        }
        views::compile(&spec)?;
        let what = match subset {
            Some(s) => format!("pinned {object} to {s}"),
            None => format!("unpinned {object}"),
        };
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": mesh.metadata.resource_version,
                "annotations": {"opmesh.io/last-admin-action": format!("{who} {what}")},
            },
            "spec": {"routing": {"objectPins": spec.routing.object_pins}}
        });
        let generation = self.patch(id, &patch).await?;
        Ok(ok(&ActionResult {
            message: format!("{id}: {what}"),
            generation,
        }))
    }

    /// Starts or (with `undo`) stops draining a replica.
    async fn drain(
        &self,
        id: &MeshId,
        request: &DrainRequest,
        who: &str,
    ) -> Result<Answer, (StatusCode, String)> {
        let (pod_ns, pod_name) = request
            .pod
            .split_once('/')
            .unwrap_or((id.namespace.as_str(), request.pod.as_str()));
        let pod_id = PodId::new(pod_ns, pod_name);
        let mesh = self.mesh(id).await?;
        let mut drain = crate::mesh::parse_drain(
            mesh.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DRAIN_ANNOTATION))
                .map(String::as_str),
        );
        let snapshot = self.published.load();
        let view = snapshot.meshes.get(id);
        if request.undo {
            if drain.remove(&pod_id).is_none() {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("{pod_id} is not being drained in {id}"),
                ));
            }
        } else {
            let Some(view) = view else {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("this manager handles no OperatorMesh {id}"),
                ));
            };
            let Some(subset) = view
                .subsets
                .iter()
                .find(|s| s.replicas.iter().any(|r| r.holder.pod == pod_id))
            else {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("{pod_id} is not a connected runtime of {id}"),
                ));
            };
            let others = subset
                .replicas
                .iter()
                .filter(|r| {
                    r.holder.pod != pod_id && !r.draining && !drain.contains_key(&r.holder.pod)
                })
                .count();
            if others == 0 && subset.routed_keys > 0 {
                return Err((
                    StatusCode::CONFLICT,
                    format!(
                        "{pod_id} is the last replica of subset {} that is not drained, and the                          policy routes {} keys to it: they would have nowhere to go. Start                          another replica of {}, or move its weight away first",
                        subset.name, subset.routed_keys, subset.name
                    ),
                ));
            }
            let pod = Api::<Pod>::namespaced(self.client.clone(), pod_ns)
                .get_opt(pod_name)
                .await
                .map_err(|e| {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot read pod {pod_id}: {e}"),
                    )
                })?
                .ok_or((StatusCode::NOT_FOUND, format!("no pod {pod_id}")))?;
            drain.insert(pod_id.clone(), pod.metadata.uid.unwrap_or_default());
        }
        // Entries for replicas that are gone are dropped, so a later pod of
        // the same name starts clean (the UID would keep it undrained
        // anyway).
        if let Some(view) = view {
            let live: std::collections::HashSet<&PodId> = view
                .subsets
                .iter()
                .flat_map(|s| s.replicas.iter().map(|r| &r.holder.pod))
                .collect();
            drain.retain(|p, _| live.contains(p));
        }
        let value: BTreeMap<String, String> = drain
            .iter()
            .map(|(p, uid)| (p.to_string(), uid.clone()))
            .collect();
        let what = if request.undo {
            format!("stopped draining {pod_id}")
        } else {
            format!("draining {pod_id}")
        };
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": mesh.metadata.resource_version,
                "annotations": {
                    DRAIN_ANNOTATION: if value.is_empty() {
                        serde_json::Value::Null
                    } else {
                        serde_json::Value::String(serde_json::to_string(&value).unwrap_or_default())
                    },
                    "opmesh.io/last-admin-action": format!("{who} {what}"),
                },
            },
        });
        let generation = self.patch(id, &patch).await?;
        Ok(ok(&ActionResult {
            message: format!("{id}: {what}"),
            generation,
        }))
    }

    /// The mesh as stored.
    async fn mesh(&self, id: &MeshId) -> Result<OperatorMesh, (StatusCode, String)> {
        let api: Api<OperatorMesh> = Api::namespaced(self.client.clone(), &id.namespace);
        match api.get_opt(&id.name).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err((StatusCode::NOT_FOUND, format!("no OperatorMesh {id}"))),
            Err(e) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read OperatorMesh {id}: {e}"),
            )),
        }
    }

    /// The mesh's spec as stored.
    async fn spec(&self, id: &MeshId) -> Result<OperatorMeshSpec, (StatusCode, String)> {
        let api: Api<OperatorMesh> = Api::namespaced(self.client.clone(), &id.namespace);
        match api.get_opt(&id.name).await {
            Ok(Some(m)) => Ok(m.spec),
            Ok(None) => Err((StatusCode::NOT_FOUND, format!("no OperatorMesh {id}"))),
            Err(e) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read OperatorMesh {id}: {e}"),
            )),
        }
    }

    /// Merge-patches the mesh; returns its new generation.
    async fn patch(
        &self,
        id: &MeshId,
        patch: &serde_json::Value,
    ) -> Result<Option<i64>, (StatusCode, String)> {
        let api: Api<OperatorMesh> = Api::namespaced(self.client.clone(), &id.namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.patch(&id.name, &params, &Patch::Merge(patch)).await {
            Ok(m) => Ok(m.metadata.generation),
            Err(kube::Error::Api(e)) if e.code == 409 => Err((
                StatusCode::CONFLICT,
                format!("{id} changed while this was being decided; try again"),
            )),
            Err(kube::Error::Api(e)) if e.code == 422 => Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the apiserver refused the change: {}", e.message),
            )),
            Err(e) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cannot patch OperatorMesh {id} ({e}); the manager needs patch on \
                     operatormeshes.opmesh.io"
                ),
            )),
        }
    }

    /// The leader's identity, from the Lease.
    async fn leader(&self) -> Option<String> {
        let (ns, name) = self.lease.as_ref()?;
        let lease = Api::<Lease>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .ok()??;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    }
}

/// `spec` with its weights replaced by `weights` (in declared subset
/// order, then any unknown names, which compiling refuses).
fn with_weights(mut spec: OperatorMeshSpec, weights: &BTreeMap<String, u32>) -> OperatorMeshSpec {
    let mut listed: Vec<WeightSpec> = spec
        .subsets
        .iter()
        .filter_map(|s| {
            weights.get(&s.name).map(|w| WeightSpec {
                subset: s.name.clone(),
                weight: *w,
            })
        })
        .collect();
    for (name, w) in weights {
        if !spec.subsets.iter().any(|s| &s.name == name) {
            listed.push(WeightSpec {
                subset: name.clone(),
                weight: *w,
            });
        }
    }
    spec.routing.weights = listed;
    spec
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, (StatusCode, String)> {
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("cannot parse the request body: {e}"),
        )
    })
}

fn ok<T: Serialize>(value: &T) -> Answer {
    (StatusCode::OK, json(value))
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn error(code: StatusCode, message: String) -> Answer {
    let reason = match code {
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::UNPROCESSABLE_ENTITY => "Invalid",
        StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
        StatusCode::CONFLICT => "Conflict",
        _ => "ServiceUnavailable",
    };
    let status = api::Status {
        kind: "Status".into(),
        code: code.as_u16(),
        reason: reason.into(),
        message,
        leader: None,
    };
    (code, json(&status))
}

fn denied(d: Denied) -> Answer {
    match d {
        Denied::Unauthenticated(m) => error(StatusCode::UNAUTHORIZED, m),
        Denied::Forbidden(m) => error(StatusCode::FORBIDDEN, m),
        Denied::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
    }
}

/// A query string's parameters, percent-decoded.
fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_calls_and_nothing_else() {
        let id = MeshId::new("ops", "web");
        let p = |m: Method, rest: &str| Route::parse(&m, &format!("{}{rest}", api::PREFIX));
        assert_eq!(p(Method::GET, "/meshes"), Some(Route::Meshes(None)));
        assert_eq!(
            p(Method::GET, "/namespaces/ops/meshes"),
            Some(Route::Meshes(Some("ops".into())))
        );
        assert_eq!(
            p(Method::GET, "/namespaces/ops/meshes/web"),
            Some(Route::Mesh(id.clone()))
        );
        assert_eq!(
            p(Method::POST, "/namespaces/ops/meshes/web/weights"),
            Some(Route::Weights(id.clone()))
        );
        assert_eq!(
            p(Method::POST, "/namespaces/ops/meshes/web/resume"),
            Some(Route::Pause(id.clone(), false))
        );
        // Reads are GETs and actions POSTs; nothing else answers.
        assert_eq!(p(Method::GET, "/namespaces/ops/meshes/web/weights"), None);
        assert_eq!(p(Method::POST, "/namespaces/ops/meshes/web"), None);
        assert_eq!(Route::parse(&Method::GET, "/meshes"), None);
        assert_eq!(
            p(Method::GET, "/namespaces/ops/meshes/web/keys/extra"),
            None
        );
    }

    #[test]
    fn actions_need_patch_and_reads_get() {
        let id = MeshId::new("ops", "web");
        assert_eq!(Route::Weights(id.clone()).access().verb, "patch");
        assert_eq!(Route::Pause(id.clone(), true).access().verb, "patch");
        assert_eq!(Route::Plan(id.clone()).access().verb, "get");
        assert_eq!(Route::Explain(id).access().verb, "get");
        assert_eq!(Route::Meshes(None).access().namespace, None);
    }

    #[test]
    fn query_parameters_are_decoded() {
        let q = query("key=team-1%2Fsettings&limit=5&x");
        assert_eq!(q["key"], "team-1/settings");
        assert_eq!(q["limit"], "5");
        assert_eq!(q["x"], "");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[test]
    fn new_weights_keep_the_declared_order_and_keep_unknown_names_for_the_check() {
        let spec: OperatorMeshSpec = serde_json::from_value(serde_json::json!({
            "selector": {},
            "controllers": [{"primary": {"apiVersion": "v1", "kind": "ConfigMap"}}],
            "subsets": [{"name": "v1", "labels": {"v": "1"}}, {"name": "v2", "labels": {"v": "2"}}],
            "routing": {"weights": [{"subset": "v1", "weight": 100}]}
        }))
        .unwrap();
        let w = BTreeMap::from([("v2".to_string(), 10), ("v1".to_string(), 90)]);
        let s = with_weights(spec.clone(), &w);
        let names: Vec<_> = s
            .routing
            .weights
            .iter()
            .map(|w| (w.subset.as_str(), w.weight))
            .collect();
        assert_eq!(names, [("v1", 90), ("v2", 10)]);
        let w = BTreeMap::from([("v3".to_string(), 100)]);
        assert!(views::compile(&with_weights(spec, &w)).is_err());
    }
}
