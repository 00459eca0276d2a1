//! The `RuntimeService` the operator uses over the Unix socket.

use std::{sync::Arc, time::Duration};

use opmesh_proto::v1::{
    CacheUpdates, CompleteResponse, Completion, ControllerTypes, GetRequest, GetResponse,
    GroupVersionKind, ListRequest, ListResponse, OwnershipRequest, OwnershipResponse,
    ReconcileReport, RegisterRequest, RegisterResponse, ReleaseRequest, ReleaseResponse, Task,
    TasksRequest, WatchCacheRequest, completion::Result as Outcome,
    runtime_service_server::RuntimeService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

use crate::state::{Registration, Runtime};

/// About how much one List page carries, far below gRPC's 4 MiB message
/// limit.
const LIST_PAGE_BYTES: usize = 1024 * 1024;

/// Serves `RuntimeService` from the runtime's state.
pub(crate) struct RuntimeServer {
    rt: Arc<Runtime>,
}

// === impl RuntimeServer ===

impl RuntimeServer {
    /// A server over `rt`.
    pub(crate) fn new(rt: Arc<Runtime>) -> Self {
        Self { rt }
    }
}

#[tonic::async_trait]
impl RuntimeService for RuntimeServer {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        let controllers =
            ControllerTypes::declared(&req.controllers, req.primary.as_ref(), &req.owns);
        let named = |g: &Option<GroupVersionKind>| {
            g.as_ref().is_some_and(|g| {
                !g.kind.is_empty() && !g.version.is_empty() && !g.plural.is_empty()
            })
        };
        if controllers.is_empty() || !controllers.iter().all(|c| named(&c.primary)) {
            return Err(Status::invalid_argument(
                "every controller must name a primary kind, version and plural",
            ));
        }
        let reg = Registration {
            controllers,
            concurrency: req.max_concurrent_reconciles,
            operator_version: req.operator_version.clone(),
        };
        if let Some(existing) = self.rt.registered()
            && existing.primaries() != reg.primaries()
        {
            return Err(Status::failed_precondition(format!(
                "this sidecar serves the controllers of {}, not {}; an operator registers all of \
                 its controllers at once, and a new operator process the same ones",
                existing.primaries().join(", "),
                reg.primaries().join(", ")
            )));
        }
        tracing::info!(controllers = %reg.primaries().join(", "), "operator registered");
        self.rt.registration.send_replace(Some(reg));
        let c = &self.rt.config;
        Ok(Response::new(RegisterResponse {
            mesh_namespace: c.mesh.namespace.clone(),
            mesh_name: c.mesh.name.clone(),
            pod_namespace: c.pod_namespace.clone(),
            pod_name: c.pod_name.clone(),
        }))
    }

    type TasksStream = ReceiverStream<Result<Task, Status>>;

    async fn tasks(
        &self,
        _request: Request<TasksRequest>,
    ) -> Result<Response<Self::TasksStream>, Status> {
        let max = self.rt.registered().map_or(1, |r| {
            r.max_concurrent(self.rt.config.max_concurrent_reconciles)
        });
        let capacity = max as usize + 1;
        let (tx, rx) = mpsc::channel(capacity);
        let id = self.rt.attach_operator(tx.clone());
        let rt = self.rt.clone();
        tokio::spawn(async move {
            // The stream's receiver is dropped when the operator goes away.
            tx.closed().await;
            tracing::info!("operator disconnected; retrying its unfinished tasks");
            rt.detach_operator(id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn complete(
        &self,
        request: Request<Completion>,
    ) -> Result<Response<CompleteResponse>, Status> {
        self.complete_one(request.into_inner())?;
        Ok(Response::new(CompleteResponse {}))
    }

    async fn complete_stream(
        &self,
        request: Request<tonic::Streaming<Completion>>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let mut completions = request.into_inner();
        while let Some(c) = completions.message().await? {
            let id = c.id;
            if let Err(e) = self.complete_one(c) {
                // One bad completion does not end the others.
                tracing::warn!(task = id, error = %e.message(), "completion refused");
            }
        }
        Ok(Response::new(CompleteResponse {}))
    }

    type WatchCacheStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<CacheUpdates, Status>> + Send + 'static>,
    >;

    async fn watch_cache(
        &self,
        _request: Request<WatchCacheRequest>,
    ) -> Result<Response<Self::WatchCacheStream>, Status> {
        use tokio_stream::StreamExt as _;
        let rx = self.rt.cache().watch();
        // Counted while the operator's end of the feed is open.
        let copies = self.rt.metrics.cache_copies.clone();
        copies.inc();
        let gone = Gone(copies);
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(rx).map(move |u| {
                let _ = &gone;
                Ok(u)
            }),
        )))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.rt.metrics.cache_calls.inc();
        let req = request.into_inner();
        let gvk = req
            .gvk
            .ok_or_else(|| Status::invalid_argument("gvk is required"))?;
        let object = self
            .rt
            .cache()
            .get(&(gvk.key(), req.namespace, req.name))
            .map(|b| b.as_ref().clone());
        Ok(Response::new(GetResponse { object }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.rt.metrics.cache_calls.inc();
        let req = request.into_inner();
        let gvk = req
            .gvk
            .ok_or_else(|| Status::invalid_argument("gvk is required"))?;
        let (objects, next) = self.rt.cache().list_page(
            &gvk.key(),
            &req.namespace,
            &req.owner_uid,
            &req.continue_token,
            LIST_PAGE_BYTES,
        );
        Ok(Response::new(ListResponse {
            objects: objects.into_iter().map(|b| b.as_ref().clone()).collect(),
            continue_token: next.unwrap_or_default(),
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let reason = request.into_inner().reason;
        tracing::info!(reason = %reason, "the operator is stopping; releasing this runtime's keys once its tasks are done");
        self.rt.operator_leaves();
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn ownership(
        &self,
        request: Request<OwnershipRequest>,
    ) -> Result<Response<OwnershipResponse>, Status> {
        let key = request.into_inner().key;
        let (_, lease_valid) = self.rt.owns(&key);
        let owned = self.rt.may_write(&key);
        let remaining = self.rt.lease_remaining();
        Ok(Response::new(OwnershipResponse {
            owned,
            lease_valid,
            lease_remaining_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

// === impl RuntimeServer (completions) ===

impl RuntimeServer {
    /// Books one completion: its metrics and report, and what the queue
    /// does with the key next.
    #[allow(clippy::result_large_err)]
    fn complete_one(&self, c: Completion) -> Result<(), Status> {
        let rt = &self.rt;
        let done = rt.complete(c.id).ok_or_else(|| {
            Status::not_found(format!(
                "unknown task {} (already completed, or from an earlier connection)",
                c.id
            ))
        })?;
        let key = done.key.clone();
        let m = &rt.metrics;
        let elapsed = done.started.elapsed().as_secs_f64();
        m.work_duration.get_or_create(m.queue()).observe(elapsed);
        m.reconcile_time
            .get_or_create(&m.controller(None))
            .observe(elapsed);
        let still_owned = rt.owns(&key).0;
        let mut error = None;
        let result = match c.result {
            Some(Outcome::Ok(_)) => {
                rt.queue.forget(&key);
                "success"
            }
            Some(Outcome::RequeueAfterMs(ms)) => {
                rt.queue.forget(&key);
                if still_owned {
                    rt.queue.add_after(&key, Duration::from_millis(ms));
                }
                "requeue_after"
            }
            Some(Outcome::Error(msg)) => {
                tracing::info!(key = %key, error = %msg, "reconcile failed");
                error = Some(msg.clone());
                m.reconcile_errors.get_or_create(&m.controller(None)).inc();
                if c.no_retry {
                    rt.queue.forget(&key);
                } else if still_owned {
                    m.retries.get_or_create(m.queue()).inc();
                    if c.retry_after_ms > 0 {
                        rt.queue
                            .add_after(&key, Duration::from_millis(c.retry_after_ms));
                    } else {
                        rt.queue.add_rate_limited(&key);
                    }
                }
                "error"
            }
            None => {
                rt.queue.done(&key);
                rt.bump();
                return Err(Status::invalid_argument("completion has no result"));
            }
        };
        m.reconcile_total
            .get_or_create(&m.controller(Some(result)))
            .inc();
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        rt.report(ReconcileReport {
            key: key.clone(),
            ok: result != "error",
            error: error.unwrap_or_default(),
            duration_us: micros(done.started.elapsed()),
            queue_wait_us: micros(done.waited),
            operator_version: rt.operator_version(),
            generation: done.generation,
            finished_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or_default(),
            fenced_writes: c.fenced_writes,
            conflicting_writes: c.conflicting_writes,
        });
        rt.queue.done(&key);
        rt.bump();
        Ok(())
    }
}

/// Counts a cache copy gone when its feed is dropped.
struct Gone(prometheus_client::metrics::gauge::Gauge);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.dec();
    }
}
