//! The controller against a stand-in sidecar on a real Unix socket.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ConfigMap;
use opmesh_proto::v1::{
    CacheUpdates, CompleteResponse, Completion, CompletionBatch, GetRequest, GetResponse,
    ListRequest, ListResponse, OwnershipRequest, OwnershipResponse, RegisterRequest,
    RegisterResponse, ReleaseRequest, ReleaseResponse, Task, TaskBatch, TasksRequest,
    WatchCacheRequest,
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{Action, Controller, Mesh};
use opmesh_proto::v1::completion::Result as Outcome;

type TaskStream = Pin<Box<dyn Stream<Item = Result<Task, Status>> + Send>>;

/// The reconcile's context: where it notes when it stopped, and how it says
/// it started.
struct Ctx {
    stopped: Arc<Mutex<Option<Instant>>>,
    started: mpsc::UnboundedSender<()>,
}

/// Hands out the tasks the test sends, and passes completions back with
/// when they arrived: on the batched `Work` stream when `batched`, else as
/// an older sidecar does, with `Tasks` and one call per completion.
struct Sidecar {
    batched: bool,
    tasks: Mutex<Option<mpsc::Receiver<Result<Task, Status>>>>,
    completions: mpsc::UnboundedSender<(Completion, Instant)>,
    /// The answers to ownership questions, in order: owned or not.
    owned: Mutex<std::collections::VecDeque<bool>>,
}

#[tonic::async_trait]
impl RuntimeService for Sidecar {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(RegisterResponse::default()))
    }

    type TasksStream = TaskStream;

    async fn tasks(&self, _: Request<TasksRequest>) -> Result<Response<TaskStream>, Status> {
        let rx = self
            .tasks
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Status::already_exists("one task stream only"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WorkStream = Pin<Box<dyn Stream<Item = Result<TaskBatch, Status>> + Send>>;

    async fn work(
        &self,
        request: Request<tonic::Streaming<CompletionBatch>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        use tokio_stream::StreamExt as _;
        if !self.batched {
            return Err(Status::unimplemented("not in this sidecar"));
        }
        let mut rx = self
            .tasks
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Status::already_exists("one task stream only"))?;
        let mut up = request.into_inner();
        let completions = self.completions.clone();
        // Tasks pass through here so that, as in the sidecar, the stream
        // ends once the operator has closed its side.
        let (down_tx, down_rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    t = rx.recv() => {
                        let Some(t) = t else { break };
                        if down_tx.send(t).await.is_err() {
                            break;
                        }
                    }
                    m = up.message() => match m {
                        Ok(Some(batch)) => {
                            for c in batch.completions {
                                let _ = completions.send((c, Instant::now()));
                            }
                        }
                        _ => break,
                    },
                }
            }
        });
        let down =
            opmesh_proto::batch::ready_batches(ReceiverStream::new(down_rx), 16, 1 << 20, |_| 1);
        let down = down.map(|tasks| {
            Ok(TaskBatch {
                tasks: tasks.into_iter().collect::<Result<_, _>>()?,
            })
        });
        Ok(Response::new(Box::pin(down)))
    }

    async fn complete(
        &self,
        request: Request<Completion>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let _ = self
            .completions
            .send((request.into_inner(), Instant::now()));
        Ok(Response::new(CompleteResponse {}))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn ownership(
        &self,
        _: Request<OwnershipRequest>,
    ) -> Result<Response<OwnershipResponse>, Status> {
        let owned = self
            .owned
            .lock()
            .unwrap()
            .pop_front()
            .ok_or_else(|| Status::unimplemented("not in this test"))?;
        Ok(Response::new(OwnershipResponse {
            owned,
            lease_valid: true,
            lease_remaining_ms: 10_000,
        }))
    }

    async fn release(
        &self,
        _: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(ReleaseResponse {}))
    }

    // An older sidecar: no cache feed, one call per completion.
    async fn complete_stream(
        &self,
        _: Request<tonic::Streaming<Completion>>,
    ) -> Result<Response<CompleteResponse>, Status> {
        Err(Status::unimplemented("not in this sidecar"))
    }

    type WatchCacheStream = Pin<Box<dyn Stream<Item = Result<CacheUpdates, Status>> + Send>>;

    async fn watch_cache(
        &self,
        _: Request<WatchCacheRequest>,
    ) -> Result<Response<Self::WatchCacheStream>, Status> {
        Err(Status::unimplemented("not in this sidecar"))
    }
}

/// Notes when the reconcile holding it has stopped; stopping takes a while
/// (a reconcile cleaning up), so a completion sent at the cancel would
/// arrive first.
struct SlowStop(Arc<Mutex<Option<Instant>>>);

impl Drop for SlowStop {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(300));
        *self.0.lock().unwrap() = Some(Instant::now());
    }
}

/// A stand-in sidecar on a Unix socket in `dir` answering ownership with
/// `owned`: the mesh, the sender of its tasks and the receiver of its
/// completions.
async fn sidecar(
    dir: &std::path::Path,
    owned: &[bool],
    batched: bool,
) -> (
    Mesh,
    mpsc::Sender<Result<Task, Status>>,
    mpsc::UnboundedReceiver<(Completion, Instant)>,
) {
    let socket = dir.join("runtime.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (task_tx, task_rx) = mpsc::channel(64);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let sidecar = Sidecar {
        batched,
        tasks: Mutex::new(Some(task_rx)),
        completions: done_tx,
        owned: Mutex::new(owned.iter().copied().collect()),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(sidecar))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    (Mesh::connect_to(&socket).await.unwrap(), task_tx, done_rx)
}

fn task(id: u64) -> Task {
    Task {
        id,
        key: opmesh_proto::mesh_key("", "v1", "ConfigMap", Some("ns"), "a"),
        object: serde_json::to_vec(&ConfigMap::default()).unwrap(),
        subset: "v1".into(),
        runtime_id: "ns/op-0".into(),
        cancel: false,
        cache_seq: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_reports_its_fenced_and_conflicting_writes() {
    reports_fenced_and_conflicting_writes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_sidecar_gets_tasks_and_completions_one_by_one() {
    reports_fenced_and_conflicting_writes(false).await;
}

async fn reports_fenced_and_conflicting_writes(batched: bool) {
    let dir = tempfile::tempdir().unwrap();
    // The first write is owned (and the API server says 409), the second
    // is not (the fence refuses it), the third goes through.
    let (mesh, tasks, mut done) = sidecar(dir.path(), &[true, false, true], batched).await;
    let statuses = Arc::new(Mutex::new(vec![200u16, 409]));
    let server = tower::service_fn(move |_req: http::Request<kube::client::Body>| {
        let status = statuses.lock().unwrap().pop().unwrap_or(200);
        async move {
            let body = serde_json::to_vec(&ConfigMap::default()).unwrap();
            let mut response = http::Response::new(kube::client::Body::from(body));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let api_server = kube::Client::new(server, "ns");
    tokio::spawn(Controller::<ConfigMap>::new(&mesh).run(
        |cm: Arc<ConfigMap>, client: Arc<kube::Client>| async move {
            let api: kube::Api<ConfigMap> = kube::Api::namespaced(crate::fenced(&client), "ns");
            for _ in 0..3 {
                let _ = api.create(&Default::default(), &cm).await;
            }
            Ok::<_, std::convert::Infallible>(Action::await_change())
        },
        |_, _, _| Action::await_change(),
        Arc::new(api_server),
    ));
    tasks.send(Ok(task(7))).await.unwrap();
    let (completion, _) = tokio::time::timeout(Duration::from_secs(10), done.recv())
        .await
        .expect("the reconcile was never reported")
        .unwrap();
    assert_eq!(completion.id, 7);
    assert_eq!(
        (completion.fenced_writes, completion.conflicting_writes),
        (1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reconcile_is_reported_done_only_after_it_stopped() {
    cancelled_reconcile_is_reported_after_it_stopped(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_sidecar_hears_of_a_cancel_only_after_the_reconcile_stopped() {
    cancelled_reconcile_is_reported_after_it_stopped(false).await;
}

async fn cancelled_reconcile_is_reported_after_it_stopped(batched: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, task_tx, mut done_rx) = sidecar(dir.path(), &[], batched).await;
    let stopped: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<()>();
    let ctx = Arc::new(Ctx {
        stopped: stopped.clone(),
        started: started_tx,
    });
    tokio::spawn(Controller::<ConfigMap>::new(&mesh).run(
        |_cm: Arc<ConfigMap>, ctx: Arc<Ctx>| async move {
            let _guard = SlowStop(ctx.stopped.clone());
            let _ = ctx.started.send(());
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(Action::await_change())
        },
        |_, _, _| Action::await_change(),
        ctx,
    ));

    task_tx.send(Ok(task(1))).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("the reconcile never started");
    task_tx
        .send(Ok(Task {
            id: 1,
            cancel: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    let (completion, at) = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
        .await
        .expect("the cancelled reconcile was never reported")
        .unwrap();
    assert_eq!(completion.id, 1);
    let stopped = stopped
        .lock()
        .unwrap()
        .expect("reported done before the reconcile had stopped");
    assert!(
        stopped <= at,
        "reported done before the reconcile had stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_handed_out_together_are_each_reconciled_and_completed_once() {
    // How they are batched is `opmesh_proto::batch`'s to test; here, that
    // none is lost or repeated on the way.
    let dir = tempfile::tempdir().unwrap();
    let (mesh, task_tx, mut done_rx) = sidecar(dir.path(), &[], true).await;
    // Every reconcile waits until all of them have started, so their
    // completions are ready at once.
    const N: u64 = 40;
    let gate = Arc::new(tokio::sync::Barrier::new(N as usize));
    tokio::spawn(
        Controller::<ConfigMap>::new(&mesh)
            .concurrency(N as u32)
            .run(
                |_cm: Arc<ConfigMap>, gate: Arc<tokio::sync::Barrier>| async move {
                    gate.wait().await;
                    Ok::<_, std::convert::Infallible>(Action::await_change())
                },
                |_, _, _| Action::await_change(),
                gate,
            ),
    );
    for id in 1..=N {
        task_tx.send(Ok(task(id))).await.unwrap();
    }
    let mut ids = Vec::new();
    while ids.len() < N as usize {
        let (c, _) = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("a reconcile was never reported")
            .unwrap();
        assert!(
            matches!(c.result, Some(Outcome::Ok(_))),
            "task {} failed: {:?}",
            c.id,
            c.result
        );
        ids.push(c.id);
    }
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=N).collect::<Vec<_>>(),
        "every task completed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_controller_reports_its_last_reconcile_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, task_tx, mut done_rx) = sidecar(dir.path(), &[], true).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<()>();
    let finish = Arc::new(tokio::sync::Notify::new());
    let ctx = Arc::new((started_tx, finish.clone()));
    let controller = tokio::spawn(
        Controller::<ConfigMap>::new(&mesh)
            .shutdown_on(async move {
                let _ = stop_rx.await;
            })
            .run(
                |_cm: Arc<ConfigMap>,
                 ctx: Arc<(mpsc::UnboundedSender<()>, Arc<tokio::sync::Notify>)>| async move {
                    let _ = ctx.0.send(());
                    ctx.1.notified().await;
                    Ok::<_, std::convert::Infallible>(Action::await_change())
                },
                |_, _, _| Action::await_change(),
                ctx,
            ),
    );
    task_tx.send(Ok(task(5))).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("the reconcile never started");
    // Stop while it runs; it finishes within the grace.
    stop_tx.send(()).unwrap();
    finish.notify_one();
    let stopped = tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller did not stop")
        .unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
    // Once it has returned, its last completion has reached the sidecar.
    let (completion, _) = done_rx
        .try_recv()
        .expect("the last reconcile's completion was lost");
    assert_eq!(completion.id, 5);
    assert!(matches!(completion.result, Some(Outcome::Ok(_))));
}
