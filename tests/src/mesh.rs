//! A running mesh for end-to-end tests and the demo: the manager, and
//! replicas that are each a runtime sidecar plus the example operator, as
//! real processes on loopback, each with a Pod object carrying its labels.

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
};
use opmesh_proto::env;
use serde::Deserialize;

use crate::{
    ControlPlane, cluster,
    control_plane::{Process, free_port},
    eventually,
};

/// The lease TTL the test managers grant: short, so that failover is quick,
/// yet long enough for a loaded 2-core machine.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Paths of the binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `opmesh-manager`.
    pub manager: PathBuf,
    /// `opmesh-runtime`.
    pub runtime: PathBuf,
    /// The example operator.
    pub operator: PathBuf,
}

/// The manager process.
pub struct Manager {
    process: Process,
    addr: String,
}

/// One operator replica: a Pod object, a sidecar and an operator process.
pub struct Replica {
    /// The pod's name.
    pub pod: String,
    /// The subset label value (`version`).
    pub version: String,
    /// Where the operator records its reconciles.
    pub records: PathBuf,
    /// The sidecar's health port.
    pub health_port: u16,
    /// The sidecar.
    pub sidecar: Process,
    /// The operator.
    pub operator: Process,
}

/// One reconcile, as the example operator records it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The reconcile's id, `<pid>-<n>`, which its writes carry.
    #[serde(default)]
    pub id: String,
    /// The primary key.
    pub key: String,
    /// The runtime (pod) that reconciled.
    pub runtime: String,
    /// The operator process that reconciled.
    #[serde(default)]
    pub pid: u32,
    /// Its subset.
    pub subset: String,
    /// The operator version.
    pub version: String,
    /// The object's generation.
    pub generation: i64,
    /// Start, in µs since the epoch.
    pub start_us: u128,
    /// End, in µs since the epoch.
    pub end_us: u128,
    /// `ok`, `error: ...` or `cancelled`; for a reconcile that never
    /// recorded its end, see [`crate::history::read`].
    pub outcome: String,
}

/// The example CRD's API resource.
pub fn generator_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.opmesh.io", "v1", "ConfigMapGenerator"),
        "configmapgenerators",
    )
}

/// The example operator's second kind, `ConfigMapBundle` (its `--bundles`
/// controller).
pub fn bundle_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.opmesh.io", "v1", "ConfigMapBundle"),
        "configmapbundles",
    )
}

/// Creates an operator Pod with `labels`, running as ServiceAccount
/// `operator`, which may read the example operator's types (see
/// [`grant_example_reads`]).
pub async fn create_operator_pod(
    client: &Client,
    namespace: &str,
    pod: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<k8s_openapi::api::core::v1::Pod> {
    let created = cluster::create_pod(client, namespace, pod, labels, "operator").await?;
    grant_example_reads(client, namespace).await?;
    Ok(created)
}

/// Lets ServiceAccount `operator` of `namespace` read the example
/// operator's types in all namespaces, as its install would: the manager
/// sends a runtime only what its own identity could read.
pub async fn grant_example_reads(client: &Client, namespace: &str) -> anyhow::Result<()> {
    let (generators, bundles) = (generator_resource().plural, bundle_resource().plural);
    cluster::grant_cluster(
        client,
        "opmesh-tests:example-operator-read",
        &[
            ("example.opmesh.io", &generators),
            ("example.opmesh.io", &bundles),
            ("", "configmaps"),
        ],
        &["get", "list", "watch"],
        namespace,
        "operator",
    )
    .await
}

// === impl Binaries ===

impl Binaries {
    /// Finds the binaries next to the running executable (the cargo target
    /// directory). They must be built first: `make test` does.
    pub fn locate() -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        for dir in exe.ancestors().skip(1) {
            let manager = dir.join("opmesh-manager");
            if manager.exists() {
                let bins = Self {
                    manager,
                    runtime: dir.join("opmesh-runtime"),
                    operator: dir.join("examples/configmap_generator"),
                };
                for p in [&bins.runtime, &bins.operator] {
                    if !p.exists() {
                        bail!(
                            "{} is missing; run `cargo build --workspace --bins --examples` first (`make test` does)",
                            p.display()
                        );
                    }
                }
                return Ok(bins);
            }
        }
        bail!(
            "opmesh-manager not found near {}; run `cargo build --workspace --bins --examples` first (`make test` does)",
            exe.display()
        )
    }

    /// Installs the example operator's CRDs (from `configmap_generator crd`
    /// and `crd --bundle`).
    pub async fn install_example_crd(&self, cp: &ControlPlane) -> anyhow::Result<()> {
        for args in [&["crd"][..], &["crd", "--bundle"]] {
            let out = Command::new(&self.operator).args(args).output()?;
            if !out.status.success() {
                bail!(
                    "{} {args:?} failed: {}",
                    self.operator.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            cp.install_crd_yaml(&String::from_utf8(out.stdout)?).await?;
        }
        Ok(())
    }
}

// === impl Manager ===

impl Manager {
    /// Starts a manager that handles the meshes in `mesh_namespace`.
    pub async fn start(
        cp: &ControlPlane,
        bins: &Binaries,
        dir: &Path,
        mesh_namespace: &str,
    ) -> anyhow::Result<Self> {
        Self::start_on(cp, bins, dir, mesh_namespace, free_port()?, None).await
    }

    /// Starts a manager on `port`; with `lease`, it competes for leadership
    /// through that Lease (in `mesh_namespace`).
    pub async fn start_on(
        cp: &ControlPlane,
        bins: &Binaries,
        dir: &Path,
        mesh_namespace: &str,
        port: u16,
        lease: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_with(cp, bins, dir, mesh_namespace, port, lease, &[]).await
    }

    /// [`Manager::start_on`] with `extra_env` (for example a `KUBECONFIG`
    /// through a proxy).
    pub async fn start_with(
        cp: &ControlPlane,
        bins: &Binaries,
        dir: &Path,
        mesh_namespace: &str,
        port: u16,
        lease: Option<&str>,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "run".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--mesh-namespace={mesh_namespace}"),
            format!("--lease-ttl-ms={}", LEASE_TTL.as_millis()),
        ];
        if let Some(lease) = lease {
            args.extend([
                "--leader-election".into(),
                format!("--lease-name={lease}"),
                format!("--lease-namespace={mesh_namespace}"),
                format!("--identity=manager-{port}"),
                "--leader-lease-seconds=3".into(),
            ]);
        }
        Self::spawn(cp, bins, dir, port, &args, extra_env).await
    }

    /// Starts a manager on `port` with `args` after `run`, and `extra_env`
    /// (for example a `KUBECONFIG` with another identity).
    pub async fn spawn(
        cp: &ControlPlane,
        bins: &Binaries,
        dir: &Path,
        port: u16,
        args: &[String],
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut vars = vec![("RUST_LOG", "info,opmesh_manager=debug")];
        vars.extend_from_slice(extra_env);
        let process = Process::spawn_with_env(
            &format!("manager-{port}"),
            &bins.manager,
            args,
            &process_env(cp, &vars),
            dir,
            None,
        )?;
        let addr = format!("127.0.0.1:{port}");
        eventually("the manager to listen", Duration::from_secs(30), || {
            let ok = TcpStream::connect(&addr).is_ok();
            let running = process.check_running();
            async move {
                running?;
                Ok(ok.then_some(()))
            }
        })
        .await?;
        Ok(Self {
            process,
            addr: format!("https://{addr}"),
        })
    }

    /// The manager's port.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// The gRPC address runtimes dial.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The process.
    pub fn process(&self) -> &Process {
        &self.process
    }
}

/// How to start one replica: the Pod it stands for and where its
/// processes run.
#[derive(Clone, Copy)]
pub struct ReplicaOptions<'a> {
    /// The shared control plane.
    pub cp: &'a ControlPlane,
    /// The binaries under test.
    pub bins: &'a Binaries,
    /// Where sockets, records and logs go.
    pub dir: &'a Path,
    /// The manager address(es) the sidecar dials, comma-separated.
    pub manager: &'a str,
    /// The mesh, `namespace/name`.
    pub mesh: &'a str,
    /// The Pod's namespace.
    pub namespace: &'a str,
    /// The Pod's name.
    pub pod: &'a str,
    /// The Pod's labels, set when [`Replica::start`] creates it.
    pub labels: &'a [(&'a str, &'a str)],
    /// The operator version, recorded with each reconcile.
    pub version: &'a str,
    /// Extra environment for both processes; each ignores what it does not
    /// read.
    pub extra_env: &'a [(&'a str, &'a str)],
    /// Extra environment for the operator only, after `extra_env` (for
    /// example a `KUBECONFIG` through a proxy).
    pub operator_env: &'a [(&'a str, &'a str)],
}

// === impl Replica ===

impl Replica {
    /// Creates the replica's Pod with its labels, then starts its sidecar
    /// and operator.
    pub async fn start(client: &Client, opts: &ReplicaOptions<'_>) -> anyhow::Result<Self> {
        create_operator_pod(client, opts.namespace, opts.pod, opts.labels).await?;
        Self::start_processes(opts).await
    }

    /// Starts the sidecar and operator for an existing (or absent) Pod.
    pub async fn start_processes(opts: &ReplicaOptions<'_>) -> anyhow::Result<Self> {
        let &ReplicaOptions {
            cp,
            bins,
            dir,
            manager,
            mesh,
            namespace,
            pod,
            version,
            extra_env,
            ..
        } = opts;
        let socket = dir.join(format!("{pod}.sock"));
        let records = dir.join(format!("{pod}.jsonl"));
        let health_port = free_port()?;
        // What the kubelet would project: a token bound to the Pod, if it
        // exists.
        let token = dir.join(format!("{pod}.token"));
        write_pod_token(cp, namespace, pod, &token).await?;
        let token_env = token.display().to_string();
        // A killed sidecar leaves its socket behind; waiting for the file
        // below must see the new one.
        let _ = std::fs::remove_file(&socket);
        let sidecar = Process::spawn_with_env(
            &format!("{pod}-sidecar"),
            &bins.runtime,
            &[],
            &process_env(
                cp,
                &[
                    (env::MANAGER_ADDR, manager),
                    (env::MESH, mesh),
                    (env::POD_NAMESPACE, namespace),
                    (env::POD_NAME, pod),
                    (env::RUNTIME_SOCKET, &socket.display().to_string()),
                    (env::HEALTH_ADDR, &format!("127.0.0.1:{health_port}")),
                    (env::MAX_CONCURRENT_RECONCILES, "4"),
                    (env::TOKEN_FILE, &token_env),
                ]
                .into_iter()
                .chain(extra_env.iter().copied())
                .collect::<Vec<_>>(),
            ),
            dir,
            None,
        )?;
        // The operator needs the socket; wait for the sidecar to bind it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            sidecar.check_running()?;
            if std::time::Instant::now() > deadline {
                bail!("the sidecar of {pod} did not create {}", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let operator = spawn_operator(opts, &socket, &records)?;
        Ok(Self {
            pod: pod.to_string(),
            version: version.to_string(),
            records,
            health_port,
            sidecar,
            operator,
        })
    }

    /// Replaces the operator process with a new one, as a kubelet restarts
    /// a crashed container while the sidecar stays up. The old one must
    /// have exited (or is killed now).
    pub fn restart_operator(&mut self, opts: &ReplicaOptions<'_>) -> anyhow::Result<()> {
        let socket = opts.dir.join(format!("{}.sock", self.pod));
        let operator = spawn_operator(opts, &socket, &self.records)?;
        drop(std::mem::replace(&mut self.operator, operator));
        Ok(())
    }

    /// True when the sidecar's `/readyz` says ready.
    pub fn ready(&self) -> bool {
        http_get(self.health_port, "/readyz").is_some_and(|(code, _)| code == 200)
    }

    /// The sidecar's `/metrics` text.
    pub fn metrics(&self) -> Option<String> {
        http_get(self.health_port, "/metrics").map(|(_, body)| body)
    }

    /// The records written so far.
    pub fn records(&self) -> Vec<Record> {
        read_records(&self.records)
    }

    /// Fails if either process died.
    pub fn check_running(&self) -> anyhow::Result<()> {
        self.sidecar.check_running()?;
        self.operator.check_running()
    }
}

/// Writes a token for Pod `namespace/name` (audience `opmesh`, bound to the
/// Pod) to `path`, as the kubelet projects one; nothing if there is no such
/// Pod.
pub async fn write_pod_token(
    cp: &ControlPlane,
    namespace: &str,
    name: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let client = cp.client().await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let _ = std::fs::remove_file(path);
    if let Some(pod) = pods.get_opt(name).await? {
        let token = cluster::pod_token(&client, &pod, &[env::TOKEN_AUDIENCE]).await?;
        std::fs::write(path, token)?;
    }
    Ok(())
}

/// Starts the example operator of a replica against its sidecar's socket.
fn spawn_operator(
    opts: &ReplicaOptions<'_>,
    socket: &Path,
    records: &Path,
) -> anyhow::Result<Process> {
    let socket_env = socket.display().to_string();
    let records_env = records.display().to_string();
    let mut operator_vars = vec![
        (env::RUNTIME_SOCKET, socket_env.as_str()),
        ("OPMESH_EXAMPLE_VERSION", opts.version),
        ("OPMESH_EXAMPLE_RECORDS", records_env.as_str()),
    ];
    operator_vars.extend_from_slice(opts.extra_env);
    operator_vars.extend_from_slice(opts.operator_env);
    Process::spawn_with_env(
        &format!("{}-operator", opts.pod),
        &opts.bins.operator,
        &["run".into()],
        &process_env(opts.cp, &operator_vars),
        opts.dir,
        None,
    )
}

/// Reads the reconciles that ended from a records file; a missing file is
/// empty.
pub fn read_records(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(r#""event":"end""#))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `spec.controllers` for the example operator: ConfigMapGenerators, which
/// own ConfigMaps.
pub fn example_controllers() -> serde_json::Value {
    serde_json::json!([{
        "primary": {"apiVersion": "example.opmesh.io/v1", "kind": "ConfigMapGenerator"},
        "owns": [{"apiVersion": "v1", "kind": "ConfigMap"}],
    }])
}

/// `spec.controllers` for the example operator run with `--bundles`:
/// ConfigMapGenerators and ConfigMapBundles, both owning ConfigMaps.
pub fn example_controllers_with_bundles() -> serde_json::Value {
    let mut all = example_controllers();
    if let Some(list) = all.as_array_mut() {
        list.push(serde_json::json!({
            "primary": {"apiVersion": "example.opmesh.io/v1", "kind": "ConfigMapBundle"},
            "owns": [{"apiVersion": "v1", "kind": "ConfigMap"}],
        }));
    }
    all
}

/// Applies an OperatorMesh (server-side apply) from a JSON spec.
pub async fn apply_mesh(
    client: &Client,
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &mesh_resource());
    let obj = serde_json::json!({
        "apiVersion": "opmesh.io/v1alpha1",
        "kind": "OperatorMesh",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("opmesh-tests").force(),
        &Patch::Apply(&obj),
    )
    .await
    .with_context(|| format!("applying OperatorMesh {namespace}/{name}"))?;
    Ok(())
}

/// The OperatorMesh API resource.
pub fn mesh_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("opmesh.io", "v1alpha1", "OperatorMesh"),
        "operatormeshes",
    )
}

/// Creates a ConfigMapGenerator with `spec`.
pub async fn create_generator(
    client: &Client,
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<()> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &generator_resource());
    let mut obj = DynamicObject::new(name, &generator_resource()).within(namespace);
    obj.data = serde_json::json!({ "spec": spec });
    api.create(&Default::default(), &obj)
        .await
        .with_context(|| format!("creating ConfigMapGenerator {namespace}/{name}"))?;
    Ok(())
}

/// `status.handledBy` of every ConfigMapGenerator in `namespaces`, keyed by
/// `namespace/name` (`None` until handled).
pub async fn handled_by(
    client: &Client,
    namespaces: &[String],
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let mut out = BTreeMap::new();
    for ns in namespaces {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &generator_resource());
        for o in api.list(&Default::default()).await? {
            let key = format!("{ns}/{}", o.metadata.name.clone().unwrap_or_default());
            let by = o.data["status"]["handledBy"].as_str().map(str::to_string);
            out.insert(key, by);
        }
    }
    Ok(out)
}

fn process_env(cp: &ControlPlane, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = vec![(
        "KUBECONFIG".to_string(),
        cp.kubeconfig().display().to_string(),
    )];
    // Managers serve TLS and runtimes trust its CA, unless `extra` says
    // otherwise (an empty value unsets a variable).
    v.extend(crate::tls::MeshTls::shared(cp.dir()).env());
    if std::env::var_os("RUST_LOG").is_none() {
        v.push(("RUST_LOG".into(), "info".into()));
    }
    v.extend(
        extra
            .iter()
            .map(|(k, val)| (k.to_string(), val.to_string())),
    );
    // A later entry replaces an earlier one; an empty one removes it.
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for (k, val) in v {
        last.insert(k, val);
    }
    last.into_iter()
        .filter(|(_, val)| !val.is_empty())
        .collect()
}

/// A minimal HTTP/1.0 GET against 127.0.0.1:`port`, returning status and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}
