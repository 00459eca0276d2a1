//! The controller against a stand-in sidecar on a real Unix socket.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ConfigMap;
use opmesh_proto::v1::{
    CompleteResponse, Completion, GetRequest, GetResponse, ListRequest, ListResponse,
    OwnershipRequest, OwnershipResponse, RegisterRequest, RegisterResponse, ReleaseRequest,
    ReleaseResponse, Task, TasksRequest,
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{Action, Controller, Mesh};

type TaskStream = Pin<Box<dyn Stream<Item = Result<Task, Status>> + Send>>;

/// The reconcile's context: where it notes when it stopped, and how it says
/// it started.
struct Ctx {
    stopped: Arc<Mutex<Option<Instant>>>,
    started: mpsc::UnboundedSender<()>,
}

/// Hands out the tasks the test sends, and passes completions back with
/// when they arrived.
struct Sidecar {
    tasks: Mutex<Option<mpsc::Receiver<Result<Task, Status>>>>,
    completions: mpsc::UnboundedSender<(Completion, Instant)>,
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
        Err(Status::unimplemented("not in this test"))
    }

    async fn release(
        &self,
        _: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(ReleaseResponse {}))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reconcile_is_reported_done_only_after_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("runtime.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (task_tx, task_rx) = mpsc::channel(8);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let sidecar = Sidecar {
        tasks: Mutex::new(Some(task_rx)),
        completions: done_tx,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(sidecar))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let mesh = Mesh::connect_to(&socket).await.unwrap();
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

    let object = serde_json::to_vec(&ConfigMap::default()).unwrap();
    let task = Task {
        id: 1,
        key: opmesh_proto::mesh_key("", "v1", "ConfigMap", Some("ns"), "a"),
        object,
        subset: "v1".into(),
        runtime_id: "ns/op-0".into(),
        cancel: false,
    };
    task_tx.send(Ok(task)).await.unwrap();
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
