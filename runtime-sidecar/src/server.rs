//! The `RuntimeService` the operator uses over the Unix socket.

use std::{sync::Arc, time::Duration};

use opmesh_proto::v1::{
    CacheUpdates, CompleteResponse, Completion, CompletionBatch, ControllerTypes, GetRequest,
    GetResponse, GroupVersionKind, ListRequest, ListResponse, OwnershipRequest, OwnershipResponse,
    ReconcileReport, RegisterRequest, RegisterResponse, ReleaseRequest, ReleaseResponse, Task,
    TaskBatch, TasksRequest, WatchCacheRequest, completion::Result as Outcome,
    runtime_service_server::RuntimeService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

use crate::state::{Registration, Runtime};

/// About how much one List page carries, far below gRPC's 4 MiB message
/// limit.
const LIST_PAGE_BYTES: usize = 1024 * 1024;

/// The most tasks one `TaskBatch` carries. Tasks are bounded by the
/// operator's concurrency anyway; this only keeps a message small.
const MAX_TASK_BATCH: usize = 256;

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
        let (tx, rx) = mpsc::channel(self.task_capacity());
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
            self.complete_batch(CompletionBatch {
                completions: vec![c],
            });
        }
        Ok(Response::new(CompleteResponse {}))
    }

    type WorkStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<TaskBatch, Status>> + Send>>;

    async fn work(
        &self,
        request: Request<tonic::Streaming<CompletionBatch>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        use tokio_stream::StreamExt as _;
        let mut completions = request.into_inner();
        let (tx, rx) = mpsc::channel(self.task_capacity());
        let id = self.rt.attach_operator(tx.clone());
        let server = Self::new(self.rt.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // The operator stopped reading tasks.
                    () = tx.closed() => break,
                    m = completions.message() => match m {
                        Ok(Some(batch)) => server.complete_batch(batch),
                        // The operator closed its side, or the connection
                        // broke: it can complete nothing more.
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            tracing::info!("operator disconnected; retrying its unfinished tasks");
            server.rt.detach_operator(id);
        });
        // Whatever is ready when the stream is polled goes out as one batch.
        let batches = opmesh_proto::batch::ready_batches(
            ReceiverStream::new(rx),
            MAX_TASK_BATCH,
            opmesh_proto::batch::MAX_BYTES,
            |t: &Result<Task, Status>| t.as_ref().map_or(0, |t| t.object.len() + t.key.len()),
        )
        .map(|tasks| {
            tasks
                .into_iter()
                .collect::<Result<Vec<Task>, Status>>()
                .map(|tasks| TaskBatch { tasks })
        });
        Ok(Response::new(Box::pin(batches)))
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
    /// How many tasks may wait in an operator's stream: one more than it
    /// runs at once (a cancellation can follow a full set of tasks).
    fn task_capacity(&self) -> usize {
        let max = self.rt.registered().map_or(1, |r| {
            r.max_concurrent(self.rt.config.max_concurrent_reconciles)
        });
        max as usize + 1
    }

    /// Books every completion of a batch; one refused does not stop the
    /// others.
    fn complete_batch(&self, batch: CompletionBatch) {
        for c in batch.completions {
            let id = c.id;
            if let Err(e) = self.complete_one(c) {
                tracing::warn!(task = id, error = %e.message(), "completion refused");
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opmesh_proto::v1::{
        Empty, ObjectEvent, Welcome, object_event::Type,
        runtime_service_client::RuntimeServiceClient, runtime_service_server::RuntimeServiceServer,
    };
    use tokio::sync::watch;

    use super::*;

    /// A runtime welcomed with `n` owned ConfigMaps, registered for up to
    /// `n` reconciles at once.
    fn runtime_with_keys(n: usize) -> Arc<Runtime> {
        let rt = Arc::new(Runtime::for_test(&[]));
        let gvk = GroupVersionKind {
            version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
            ..Default::default()
        };
        rt.registration.send_replace(Some(Registration {
            operator_version: "v2".into(),
            controllers: vec![ControllerTypes {
                primary: Some(gvk.clone()),
                owns: Vec::new(),
            }],
            concurrency: u32::try_from(n).unwrap(),
        }));
        let welcome = Welcome {
            runtime_id: "ops/op-0".into(),
            subset: "v2".into(),
            lease_ttl_ms: 3_600_000,
        };
        rt.welcomed(&welcome, tokio::time::Instant::now(), &[]);
        for i in 0..n {
            let name = format!("cm-{i}");
            rt.on_event(ObjectEvent {
                key: opmesh_proto::mesh_key("", "v1", "ConfigMap", Some("ns"), &name),
                r#type: Type::Applied as i32,
                gvk: Some(gvk.clone()),
                namespace: "ns".into(),
                name,
                object: b"{\"metadata\":{\"generation\":1}}".to_vec(),
                ..Default::default()
            });
        }
        rt.on_synced();
        rt
    }

    /// Serves `rt` on a loopback port and connects a client to it.
    async fn serve(rt: Arc<Runtime>) -> RuntimeServiceClient<tonic::transport::Channel> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RuntimeServiceServer::new(RuntimeServer::new(rt)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        RuntimeServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    /// Polls `done` every 10 ms for up to 10 s.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn work_hands_out_ready_tasks_together_and_books_a_batch_of_completions() {
        const N: usize = 12;
        let rt = runtime_with_keys(N);
        let mut client = serve(rt.clone()).await;
        let (up, rx) = mpsc::unbounded_channel();
        let mut down = client
            .work(UnboundedReceiverStream::new(rx))
            .await
            .expect("the sidecar serves Work")
            .into_inner();
        let (_stop, stop) = watch::channel(false);
        let dispatch = tokio::spawn(crate::dispatch::run(rt.clone(), stop));

        let (mut tasks, mut batches) = (Vec::new(), 0);
        while tasks.len() < N {
            let batch = tokio::time::timeout(Duration::from_secs(10), down.message())
                .await
                .expect("tasks within 10 s")
                .unwrap()
                .expect("the stream stays open");
            assert!(!batch.tasks.is_empty(), "an empty batch");
            batches += 1;
            tasks.extend(batch.tasks);
        }
        let mut keys: Vec<&str> = tasks.iter().map(|t| t.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), N, "each key handed out once");
        assert!(
            batches < N,
            "{N} tasks ready together took {batches} messages"
        );

        // Every completion in one message: each is booked.
        up.send(CompletionBatch {
            completions: tasks
                .iter()
                .map(|t| Completion {
                    id: t.id,
                    result: Some(Outcome::Ok(Empty {})),
                    ..Default::default()
                })
                .collect(),
        })
        .unwrap();
        let success = rt
            .metrics
            .reconcile_total
            .get_or_create(&rt.metrics.controller(Some("success")))
            .clone();
        eventually("every completion booked", || {
            success.get() == N as u64 && rt.in_flight() == 0
        })
        .await;
        assert_eq!(rt.take_reports().0.len(), N, "one outcome report each");
        dispatch.abort();
    }

    #[tokio::test]
    async fn when_the_operator_closes_work_its_unfinished_tasks_are_retried() {
        let rt = runtime_with_keys(3);
        let mut client = serve(rt.clone()).await;
        let (up, rx) = mpsc::unbounded_channel::<CompletionBatch>();
        let mut down = client
            .work(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let (_stop, stop) = watch::channel(false);
        let dispatch = tokio::spawn(crate::dispatch::run(rt.clone(), stop));
        let first = tokio::time::timeout(Duration::from_secs(10), down.message())
            .await
            .expect("tasks within 10 s")
            .unwrap()
            .unwrap();
        assert!(!first.tasks.is_empty());
        assert!(rt.operator_present());
        // The operator goes away without completing anything.
        drop((up, down));
        eventually("the operator detached", || !rt.operator_present()).await;
        eventually("its tasks are no longer running", || rt.in_flight() == 0).await;
        // A new operator gets the whole slice again.
        let (_up, rx) = mpsc::unbounded_channel::<CompletionBatch>();
        let mut down = client
            .work(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut seen = 0;
        while seen < 3 {
            let batch = tokio::time::timeout(Duration::from_secs(10), down.message())
                .await
                .expect("the keys handed out again within 10 s")
                .unwrap()
                .unwrap();
            seen += batch.tasks.len();
        }
        dispatch.abort();
    }
}
