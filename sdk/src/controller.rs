//! The `Controller`: receives tasks from the sidecar and runs `reconcile`.

use std::{
    collections::HashMap,
    future::Future,
    marker::PhantomData,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use kube::Resource;
use opmesh_proto::v1::{
    Completion, CompletionBatch, ControllerTypes, Empty, GroupVersionKind, RegisterRequest,
    ReleaseRequest, Task, TaskBatch, TasksRequest, completion::Result as Outcome,
    runtime_service_client::RuntimeServiceClient,
};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::Instrument as _;

use crate::{
    action::Action,
    cache::{Cache, decode, gvk_of},
    error::{Error, Result},
};

/// Where the SDK looks for the sidecar's socket: the variable the runtime
/// reads for its `--socket`.
pub const SOCKET_ENV: &str = opmesh_proto::env::RUNTIME_SOCKET;
/// The socket path when [`SOCKET_ENV`] is unset, the runtime's default too.
pub const DEFAULT_SOCKET: &str = opmesh_proto::env::DEFAULT_RUNTIME_SOCKET;
/// How long [`Mesh::connect`] waits for the sidecar.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping controller waits for the sidecar to read its last
/// completions.
const COMPLETIONS_FLUSH: Duration = Duration::from_secs(2);
/// The most completions one `CompletionBatch` carries.
const MAX_COMPLETION_BATCH: usize = 256;

/// A connection to this pod's runtime sidecar.
#[derive(Clone, Debug)]
pub struct Mesh {
    client: RuntimeServiceClient<Channel>,
    socket: PathBuf,
    /// The in-process copy of the sidecar's cache.
    local: Arc<crate::local::LocalCache>,
}

/// The task being reconciled, available inside `reconcile` through
/// [`current`].
#[derive(Clone, Debug, Default)]
pub struct TaskInfo {
    /// The primary key, `namespace/name` or `name`.
    pub key: String,
    /// The subset this replica belongs to, as the manager resolved it.
    pub subset: String,
    /// This replica's runtime id (its pod, `namespace/name`).
    pub runtime_id: String,
}

struct Current {
    info: TaskInfo,
    /// The key as the mesh knows it (object and type), for the fence.
    mesh_key: String,
    sidecar: RuntimeServiceClient<Channel>,
    /// Writes of this reconcile that did not go through.
    writes: Arc<crate::fence::WriteCounts>,
}

tokio::task_local! {
    static CURRENT: Current;
}

/// The task being reconciled, when called from inside `reconcile` or the
/// error policy.
pub fn current() -> Option<TaskInfo> {
    CURRENT.try_with(|c| c.info.clone()).ok()
}

/// A client whose writes are fenced for the key being reconciled: once this
/// replica loses the key, or has less than [`crate::FENCE_MARGIN`] of its
/// lease left, writes fail with [`crate::Fenced`], and each write must finish
/// before the lease would. Call it inside `reconcile`: outside, there is no
/// key to fence for, and every write through the client is refused.
pub fn fenced(client: &kube::Client) -> kube::Client {
    CURRENT
        .try_with(|c| {
            crate::fence::Fence::new(c.mesh_key.clone(), c.sidecar.clone(), client.clone())
                .counting(c.writes.clone())
        })
        .unwrap_or_else(|_| crate::fence::Fence::outside_reconcile(client.clone()))
        .into_client()
}

/// Reconciles objects of type `K` that the sidecar hands this replica.
pub struct Controller<K> {
    mesh: Mesh,
    owns: Vec<GroupVersionKind>,
    shutdown: Option<Shutdown>,
    grace: Duration,
    concurrency: u32,
    version: Option<String>,
    _k: PhantomData<fn() -> K>,
}

/// The environment variable an operator's version is read from when
/// [`Controller::operator_version`] is not called.
pub const OPERATOR_VERSION_ENV: &str = "OPMESH_OPERATOR_VERSION";

/// A future that asks the controller to stop.
type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long [`Mesh::connect`] waits for the sidecar to come up.
pub const SIDECAR_WAIT: Duration = Duration::from_secs(10);
/// How long a stopping controller lets running reconciles finish, by
/// default: within Kubernetes' default 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

// === impl Mesh ===

impl Mesh {
    /// Connects to the sidecar at `$OPMESH_RUNTIME_SOCKET` (default
    /// `/var/run/opmesh/runtime.sock`), waiting up to [`SIDECAR_WAIT`] for
    /// it to come up (containers of a pod start together), then failing
    /// with [`Error::NoSidecar`].
    pub async fn connect() -> Result<Self> {
        Self::connect_within(SIDECAR_WAIT).await
    }

    /// Like [`Mesh::connect`], waiting up to `wait` for the sidecar.
    pub async fn connect_within(wait: Duration) -> Result<Self> {
        let path = std::env::var_os(SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::connect_to(&path).await {
                Ok(mesh) => return Ok(mesh),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Connects to the sidecar socket at `path`.
    pub async fn connect_to(path: impl Into<PathBuf>) -> Result<Self> {
        let socket = path.into();
        let no_sidecar = |reason: String| Error::NoSidecar {
            path: socket.clone(),
            reason,
        };
        if !socket.exists() {
            return Err(no_sidecar("the socket does not exist".into()));
        }
        let path = socket.clone();
        // The URI is a placeholder: the connector always dials the socket.
        let endpoint =
            Endpoint::from_static("http://opmesh-runtime.local").connect_timeout(CONNECT_TIMEOUT);
        let channel = tokio::time::timeout(
            CONNECT_TIMEOUT,
            endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            })),
        )
        .await
        .map_err(|_| no_sidecar("timed out".into()))?
        .map_err(|e| no_sidecar(format!("{e}: {}", source_chain(&e))))?;
        let client = RuntimeServiceClient::new(channel);
        Ok(Self {
            local: crate::local::LocalCache::start(client.clone()),
            client,
            socket,
        })
    }

    /// Typed reads of the slice cache: from a copy in this process, fed by
    /// the sidecar, when it serves one (from the sidecar otherwise).
    pub fn cache(&self) -> Cache {
        Cache::new(self.client.clone(), self.local.clone())
    }

    /// The socket this connection uses.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

// === impl Controller ===

impl<K> Controller<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Send + Sync + 'static,
    K::Scope: 'static,
{
    /// A controller for `K`, the primary type. (`for` is a Rust keyword, so
    /// kube-runtime's `Controller::new` shape is used.)
    pub fn new(mesh: &Mesh) -> Self {
        Self {
            mesh: mesh.clone(),
            owns: Vec::new(),
            shutdown: None,
            grace: DEFAULT_SHUTDOWN_GRACE,
            concurrency: 0,
            version: None,
            _k: PhantomData,
        }
    }

    /// Reconcile up to `n` keys at once (never one key twice). The
    /// sidecar's `OPMESH_MAX_CONCURRENT_RECONCILES`, when set, caps it;
    /// without either, one at a time.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// The operator's version (e.g. its image tag), reported with every
    /// reconcile's outcome so the mesh can compare a canary with stable.
    /// Default: `$OPMESH_OPERATOR_VERSION`, else none.
    pub fn operator_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Stops gracefully when `signal` completes, instead of on SIGTERM or
    /// Ctrl-C (the default): see [`Controller::run`].
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// How long a graceful stop lets running reconciles finish before it
    /// cancels them ([`DEFAULT_SHUTDOWN_GRACE`] by default). Keep it below
    /// the pod's `terminationGracePeriodSeconds`.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Also reconcile `K` when an object of type `C` that it controls
    /// (a controller ownerReference) changes.
    pub fn owns<C>(mut self) -> Self
    where
        C: Resource<DynamicType = ()>,
        C::Scope: 'static,
    {
        self.owns.push(gvk_of::<C>());
        self
    }

    /// Registers with the sidecar and reconciles every task it hands out
    /// until the sidecar goes away ([`Error::SidecarGone`]) or a graceful
    /// stop (`Ok`). An operator with several controllers runs them together
    /// with [`run_all`] instead.
    ///
    /// A graceful stop, on SIGTERM or Ctrl-C unless [`Controller::shutdown_on`]
    /// says otherwise: the sidecar is told to hand out nothing more, the
    /// running reconciles finish (within [`Controller::shutdown_grace`], then
    /// they are cancelled), and the sidecar says goodbye to the manager so
    /// this replica's keys move at once, with no lease to wait out.
    pub async fn run<Ctx, E, R, RFut, P>(
        self,
        reconcile: R,
        error_policy: P,
        ctx: Arc<Ctx>,
    ) -> Result<()>
    where
        Ctx: Send + Sync + 'static,
        E: std::fmt::Display + Send + 'static,
        R: Fn(Arc<K>, Arc<Ctx>) -> RFut + Send + Sync + 'static,
        RFut: Future<Output = Result<Action, E>> + Send + 'static,
        P: Fn(Arc<K>, &E, Arc<Ctx>) -> Action + Send + Sync + 'static,
    {
        run_all(vec![self.bind(reconcile, error_policy, ctx)]).await
    }

    /// This controller with its reconcile function, error policy and
    /// context, to run next to the operator's other controllers with
    /// [`run_all`].
    pub fn bind<Ctx, E, R, RFut, P>(
        self,
        reconcile: R,
        error_policy: P,
        ctx: Arc<Ctx>,
    ) -> BoundController
    where
        Ctx: Send + Sync + 'static,
        E: std::fmt::Display + Send + 'static,
        R: Fn(Arc<K>, Arc<Ctx>) -> RFut + Send + Sync + 'static,
        RFut: Future<Output = Result<Action, E>> + Send + 'static,
        P: Fn(Arc<K>, &E, Arc<Ctx>) -> Action + Send + Sync + 'static,
    {
        let reconcile = Arc::new(reconcile);
        let error_policy = Arc::new(error_policy);
        let handler: Handler = Arc::new(move |task, sidecar| {
            let (reconcile, error_policy, ctx) =
                (reconcile.clone(), error_policy.clone(), ctx.clone());
            Box::pin(async move {
                handle::<K, _, _, _, _, _>(
                    task,
                    sidecar,
                    reconcile.as_ref(),
                    error_policy.as_ref(),
                    ctx,
                )
                .await
            })
        });
        BoundController {
            mesh: self.mesh,
            kind: K::kind(&()).to_string(),
            types: ControllerTypes {
                primary: Some(gvk_of::<K>()),
                owns: self.owns,
            },
            concurrency: self.concurrency,
            shutdown: self.shutdown,
            grace: self.grace,
            version: self.version,
            handler,
        }
    }
}

/// Runs one task of a bound controller to its completion.
type Handler = Arc<
    dyn Fn(
            Task,
            RuntimeServiceClient<Channel>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Completion> + Send>>
        + Send
        + Sync,
>;

/// A [`Controller`] with its reconcile function, from [`Controller::bind`].
pub struct BoundController {
    mesh: Mesh,
    kind: String,
    types: ControllerTypes,
    concurrency: u32,
    shutdown: Option<Shutdown>,
    grace: Duration,
    version: Option<String>,
    handler: Handler,
}

/// Runs several controllers of one operator on one sidecar: they register
/// together (the mesh routes each one's keys by its primary type), share
/// the sidecar's task stream and its concurrency (the sum of what each
/// asks for), and stop together, like [`Controller::run`]. The first
/// controller's [`Controller::shutdown_on`] and the longest
/// [`Controller::shutdown_grace`] apply.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use opmesh_sdk::{Action, Controller, Mesh, kube, k8s_openapi::api::core::v1::{ConfigMap, Secret}};
/// # async fn r1(_: Arc<ConfigMap>, _: Arc<()>) -> Result<Action, kube::Error> { Ok(Action::await_change()) }
/// # async fn r2(_: Arc<Secret>, _: Arc<()>) -> Result<Action, kube::Error> { Ok(Action::await_change()) }
/// # async fn run() -> opmesh_sdk::Result<()> {
/// let mesh = Mesh::connect().await?;
/// let ctx = Arc::new(());
/// opmesh_sdk::run_all(vec![
///     Controller::<ConfigMap>::new(&mesh).bind(r1, opmesh_sdk::default_error_policy, ctx.clone()),
///     Controller::<Secret>::new(&mesh).bind(r2, opmesh_sdk::default_error_policy, ctx),
/// ])
/// .await
/// # }
/// ```
pub async fn run_all(controllers: Vec<BoundController>) -> Result<()> {
    let Some(first) = controllers.first() else {
        return Ok(());
    };
    let mut client = first.mesh.client.clone();
    let first_local = first.mesh.local.clone();
    let grace = controllers
        .iter()
        .map(|c| c.grace)
        .max()
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let mut shutdown = None;
    let mut handlers: HashMap<String, Handler> = HashMap::new();
    let mut registration = RegisterRequest::default();
    for c in controllers {
        let primary = c
            .types
            .primary
            .as_ref()
            .map(GroupVersionKind::key)
            .unwrap_or_default();
        if handlers.insert(primary.clone(), c.handler).is_some() {
            return Err(Error::Register(format!(
                "two controllers reconcile {primary}; an operator runs one per primary type"
            )));
        }
        tracing::info!(kind = %c.kind, "controller started");
        registration.max_concurrent_reconciles += c.concurrency;
        registration.controllers.push(c.types);
        if registration.operator_version.is_empty()
            && let Some(v) = c.version
        {
            registration.operator_version = v;
        }
        if shutdown.is_none() {
            shutdown = c.shutdown;
        }
    }
    if registration.operator_version.is_empty() {
        registration.operator_version = std::env::var(OPERATOR_VERSION_ENV).unwrap_or_default();
    }
    client.register(registration).await?;
    let local = first_local;
    let (mut tasks, completer) = open_work(&mut client, &local).await?;
    let running: Arc<Mutex<HashMap<u64, JoinHandle<()>>>> = Arc::default();
    // When the stream ends, stop every reconcile still running: the
    // sidecar has already taken them back and may hand the keys out again.
    let _abort_on_exit = AbortAll(running.clone());
    let mut shutdown = shutdown.unwrap_or_else(|| Box::pin(terminated()));
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let ended = loop {
        let message = tokio::select! {
            m = tasks.next() => m,
            () = &mut shutdown, if stopping.is_none() => {
                tracing::info!(grace = ?grace, "stopping: finishing running reconciles, then releasing this replica's keys");
                let release = ReleaseRequest { reason: "the operator is stopping".into() };
                if let Err(e) = client.release(release).await {
                    tracing::warn!(error = %e, "cannot tell the sidecar this operator is stopping");
                }
                stopping = Some(tokio::time::Instant::now() + grace);
                continue;
            }
            _ = tick.tick(), if stopping.is_some() => {
                let over = stopping.is_some_and(|t| tokio::time::Instant::now() >= t);
                if lock(&running).is_empty() {
                    tracing::info!("every reconcile finished; stopped");
                    break None;
                }
                if over {
                    tracing::warn!("reconciles still running at the end of the shutdown grace; cancelling them");
                    break None;
                }
                continue;
            }
        };
        let task = match message {
            Ok(Some(task)) => task,
            // The sidecar went away (it closed the stream or the
            // connection broke).
            Ok(None) | Err(_) => break Some(Error::SidecarGone),
        };
        let id = task.id;
        if task.cancel {
            // The lease ran out or the key was lost: stop, and say so.
            let handle = lock(&running).remove(&id);
            if let Some(handle) = handle {
                handle.abort();
                tracing::warn!(task = id, "reconcile cancelled by the sidecar");
                // Reported done only once the reconcile has stopped, so
                // the sidecar never counts a key free while it still runs.
                let completer = completer.clone();
                tokio::spawn(async move {
                    let _ = handle.await;
                    let completion = Completion {
                        id,
                        result: Some(Outcome::Error(
                            "cancelled: this replica lost the key or its lease".into(),
                        )),
                        no_retry: true,
                        ..Default::default()
                    };
                    completer.send(completion).await;
                });
            }
            continue;
        }
        let primary = opmesh_proto::parse_key(&task.key).1.unwrap_or_default();
        let handler = handlers.get(&primary).cloned();
        let (sidecar, done) = (client.clone(), running.clone());
        let (local, completer) = (local.clone(), completer.clone());
        let mut guard = lock(&running);
        let join = tokio::spawn(async move {
            // The cache copy must hold what the sidecar held when it
            // handed the task out.
            local.catch_up(task.cache_seq).await;
            let completion = match handler {
                Some(handler) => handler(task, sidecar.clone()).await,
                // Not this operator's: retrying cannot help.
                None => Completion {
                    result: Some(Outcome::Error(format!(
                        "no controller of this operator reconciles {primary}"
                    ))),
                    no_retry: true,
                    ..Default::default()
                },
            };
            // A cancelled task was already completed by the cancel.
            if lock(&done).remove(&id).is_none() {
                return;
            }
            completer.send(Completion { id, ..completion }).await;
        });
        guard.insert(id, join);
    };
    // Stop every reconcile still running before the task stream closes:
    // its close is what tells the sidecar the tasks are over.
    let handles: Vec<JoinHandle<()>> = lock(&running).drain().map(|(_, h)| h).collect();
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let _ = h.await;
    }
    // On `Work`, the completions sent last are still on their way up:
    // close this side and let the sidecar read them, which it has when it
    // ends the stream, rather than cut the stream under them.
    drop(completer);
    if ended.is_none() && matches!(tasks, TaskSource::Batched(..)) {
        let drained = async { while let Ok(Some(_)) = tasks.next().await {} };
        let _ = tokio::time::timeout(COMPLETIONS_FLUSH, drained).await;
    }
    drop(tasks);
    match ended {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Opens the stream of tasks and the way back for completions: both on
/// one `Work` stream, batched, or, with a sidecar that does not serve it,
/// `Tasks` with completions on `CompleteStream` (or one call each).
async fn open_work(
    client: &mut RuntimeServiceClient<Channel>,
    local: &crate::local::LocalCache,
) -> Result<(TaskSource, Completer)> {
    use tokio_stream::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Whatever completions are ready when the stream is polled go as one
    // batch.
    let up = opmesh_proto::batch::ready_batches(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        MAX_COMPLETION_BATCH,
        opmesh_proto::batch::MAX_BYTES,
        |c: &Completion| 32 + completion_error_len(c),
    )
    .map(|completions| CompletionBatch { completions });
    match client.work(up).await {
        Ok(down) => {
            return Ok((
                TaskSource::Batched(down.into_inner(), Default::default()),
                Completer::Stream(tx),
            ));
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            tracing::debug!("the sidecar has no Work stream; using Tasks");
        }
        Err(s) => return Err(s.into()),
    }
    let tasks = client.tasks(TasksRequest {}).await?.into_inner();
    // Completions travel on one stream when the sidecar takes them so.
    let completer = if local.supported().await {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut stream_client = client.clone();
        tokio::spawn(async move {
            let completions = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            if let Err(e) = stream_client.complete_stream(completions).await {
                tracing::warn!(error = %e, "the completion stream to the sidecar ended");
            }
        });
        Completer::Stream(tx)
    } else {
        Completer::Unary(client.clone())
    };
    Ok((TaskSource::Single(tasks), completer))
}

/// The length of a completion's error message, if it has one.
fn completion_error_len(c: &Completion) -> usize {
    match &c.result {
        Some(Outcome::Error(e)) => e.len(),
        _ => 0,
    }
}

/// Where tasks come from: batches on `Work`, or one at a time on `Tasks`.
enum TaskSource {
    Batched(
        tonic::Streaming<TaskBatch>,
        std::collections::VecDeque<Task>,
    ),
    Single(tonic::Streaming<Task>),
}

impl TaskSource {
    /// The next task; `None` once the sidecar ended the stream.
    async fn next(&mut self) -> std::result::Result<Option<Task>, tonic::Status> {
        match self {
            TaskSource::Single(s) => s.message().await,
            TaskSource::Batched(s, pending) => loop {
                if let Some(t) = pending.pop_front() {
                    return Ok(Some(t));
                }
                match s.message().await? {
                    Some(batch) => pending.extend(batch.tasks),
                    None => return Ok(None),
                }
            },
        }
    }
}

async fn handle<K, Ctx, E, R, RFut, P>(
    task: Task,
    sidecar: RuntimeServiceClient<Channel>,
    reconcile: &R,
    error_policy: &P,
    ctx: Arc<Ctx>,
) -> Completion
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
    E: std::fmt::Display,
    R: Fn(Arc<K>, Arc<Ctx>) -> RFut,
    RFut: Future<Output = Result<Action, E>>,
    P: Fn(Arc<K>, &E, Arc<Ctx>) -> Action,
{
    let info = TaskInfo {
        key: opmesh_proto::parse_key(&task.key).0.to_string(),
        subset: task.subset.clone(),
        runtime_id: task.runtime_id.clone(),
    };
    let mesh_key = task.key.clone();
    let obj = match decode::<K>(&task.object) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            // Retrying cannot fix an object that does not decode.
            return Completion {
                result: Some(Outcome::Error(e.to_string())),
                no_retry: true,
                ..Default::default()
            };
        }
    };
    let span = tracing::info_span!("reconcile", key = %info.key, subset = %task.subset);
    let writes = Arc::new(crate::fence::WriteCounts::default());
    let counted = writes.clone();
    let completion = CURRENT
        .scope(
            Current {
                info,
                mesh_key,
                sidecar,
                writes,
            },
            async move {
                match reconcile(obj.clone(), ctx.clone()).await {
                    Ok(action) => Completion {
                        result: Some(match action.requeue_after() {
                            Some(d) => Outcome::RequeueAfterMs(millis(d)),
                            None => Outcome::Ok(Empty {}),
                        }),
                        ..Default::default()
                    },
                    Err(e) => {
                        let action = error_policy(obj, &e, ctx);
                        Completion {
                            result: Some(Outcome::Error(e.to_string())),
                            retry_after_ms: action.requeue_after().map(millis).unwrap_or(0),
                            no_retry: !action.is_backoff() && action.requeue_after().is_none(),
                            ..Default::default()
                        }
                    }
                }
            },
        )
        .instrument(span)
        .await;
    Completion {
        fenced_writes: counted.fenced.load(Ordering::Relaxed),
        conflicting_writes: counted.conflicting.load(Ordering::Relaxed),
        ..completion
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A map of abort handles stays usable after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;

/// Where completions go: one stream, or one call each to an older sidecar.
#[derive(Clone)]
enum Completer {
    Stream(tokio::sync::mpsc::UnboundedSender<Completion>),
    Unary(RuntimeServiceClient<Channel>),
}

impl Completer {
    async fn send(&self, completion: Completion) {
        let id = completion.id;
        let sent = match self {
            Completer::Stream(tx) => tx
                .send(completion)
                .map_err(|_| "the completion stream is closed".to_string()),
            Completer::Unary(client) => client
                .clone()
                .complete(completion)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = sent {
            tracing::warn!(task = id, error = %e, "cannot report completion");
        }
    }
}

/// Aborts every task in the map when dropped.
struct AbortAll(Arc<Mutex<HashMap<u64, JoinHandle<()>>>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for (_, handle) in lock(&self.0).drain() {
            handle.abort();
        }
    }
}
