//! A real kube-apiserver and etcd on loopback ports, started for tests and the demo.
//!
//! The binaries come from `tests/control-plane/build.sh`, which builds them
//! from the Go module proxy at pinned versions and caches them. One control
//! plane serves a whole test binary ([`ControlPlane::shared`]); each test uses
//! its own namespace.

mod pki;
mod process;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::sync::OnceCell;

use self::pki::Pki;
pub use self::process::{Process, tail};

/// How long the control plane may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// What the apiserver's audit log records: who read which Pod.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["get"]
    resources: [{group: "", resources: ["pods"]}]
  - level: None
"#;

/// Options for [`ControlPlane::start`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Extra apiserver feature gates, e.g. `"ShardedListAndWatch=true"`.
    pub feature_gates: Vec<String>,
    /// A directory of CRD manifests to install before returning; each CRD is
    /// waited on until it is Established.
    pub crds_dir: Option<PathBuf>,
    /// Also run kube-controller-manager (the default), so Deployments make
    /// ReplicaSets and Pods (no scheduler or kubelet runs them), namespaces
    /// finish deleting and owned objects are garbage-collected, as in a
    /// cluster.
    pub controller_manager: bool,
}

/// A running etcd and kube-apiserver (and kube-controller-manager, if asked
/// for). Dropping it stops them and removes their temporary directory.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    server: String,
    etcd: Process,
    apiserver: Process,
    controller_manager: Option<Process>,
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

// === impl Options ===

impl Default for Options {
    fn default() -> Self {
        Self {
            feature_gates: Vec::new(),
            crds_dir: Some(repo_root().join("deploy/crds")),
            controller_manager: true,
        }
    }
}

// === impl ControlPlane ===

impl ControlPlane {
    /// The control plane shared by every test in this test binary, started on
    /// first use with the default [`Options`] (all CRDs under `deploy/crds`).
    pub async fn shared() -> anyhow::Result<&'static ControlPlane> {
        SHARED
            .get_or_try_init(|| Self::start(Options::default()))
            .await
    }

    /// The shared control plane, started with `options` if this is its
    /// first use (a test binary that needs more than the default calls this
    /// before anything else).
    pub async fn shared_with(options: Options) -> anyhow::Result<&'static ControlPlane> {
        SHARED.get_or_try_init(|| Self::start(options)).await
    }

    /// Builds (or reuses) the binaries, then starts etcd and kube-apiserver on
    /// free loopback ports and waits until the apiserver is ready.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let started = Instant::now();
        let bin_dir = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("opmesh-control-plane-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        let pki = Pki::generate(&root)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");

        let etcd = Process::spawn(
            "etcd",
            &bin_dir.join("etcd"),
            &[
                format!("--data-dir={}", root.join("etcd").display()),
                "--name=default".into(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                // Tests throw the data away; fsync would only slow them down.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &root,
            Some(&root),
        )?;

        // The audit log records each GET of a Pod, so a test can tell which
        // requests a component made (and which it did not).
        let audit_policy = root.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY)?;
        let mut args = vec![
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", root.join("audit.log").display()),
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", root.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", pki.serving_cert_file.display()),
            format!("--tls-private-key-file={}", pki.serving_key_file.display()),
            format!("--client-ca-file={}", pki.ca_file.display()),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!(
                "--service-account-key-file={}",
                pki.service_account_pub_file.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key_file.display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            // No controller-manager runs, so nothing would create the token
            // secrets this plugin expects; the helpers create ServiceAccounts.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
        ];
        if !options.feature_gates.is_empty() {
            args.push(format!(
                "--feature-gates={}",
                options.feature_gates.join(",")
            ));
        }
        let apiserver = Process::spawn(
            "kube-apiserver",
            &bin_dir.join("kube-apiserver"),
            &args,
            &root,
            Some(&root),
        )?;

        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki))?;

        let mut cp = Self {
            dir,
            kubeconfig,
            server,
            etcd,
            apiserver,
            controller_manager: None,
        };
        cp.wait_ready().await?;
        if options.controller_manager {
            let args = vec![
                format!("--kubeconfig={}", cp.kubeconfig.display()),
                format!("--authentication-kubeconfig={}", cp.kubeconfig.display()),
                format!("--authorization-kubeconfig={}", cp.kubeconfig.display()),
                format!(
                    "--service-account-private-key-file={}",
                    pki.service_account_key_file.display()
                ),
                format!("--root-ca-file={}", pki.ca_file.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                // Every namespace would get a kube-root-ca.crt ConfigMap,
                // which tests that count ConfigMaps would see.
                "--controllers=*,-root-ca-cert-publisher".into(),
            ];
            cp.controller_manager = Some(Process::spawn(
                "kube-controller-manager",
                &bin_dir.join("kube-controller-manager"),
                &args,
                &root,
                Some(&root),
            )?);
        }
        if let Some(crds) = &options.crds_dir {
            cp.install_crds(crds).await?;
        }
        eprintln!(
            "control plane ready at {} in {:.1?}",
            cp.server,
            started.elapsed()
        );
        Ok(cp)
    }

    /// The path of an admin kubeconfig that child processes and `kubectl` can use.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A temporary directory that lives as long as the control plane.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How many times the apiserver served a GET of Pod `namespace/name`,
    /// by its audit log.
    pub fn pod_gets(&self, namespace: &str, name: &str) -> usize {
        let log = std::fs::read_to_string(self.dir().join("audit.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| {
                let o = &e["objectRef"];
                e["verb"] == "get"
                    && o["resource"] == "pods"
                    && o["namespace"] == namespace
                    && o["name"] == name
            })
            .count()
    }

    /// A new admin client. Build one per test: a client belongs to the tokio
    /// runtime it was made in, and every `#[tokio::test]` has its own.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Fails, with the tail of its log, if etcd or kube-apiserver has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        self.etcd.check_running()?;
        self.apiserver.check_running()?;
        match &self.controller_manager {
            Some(p) => p.check_running(),
            None => Ok(()),
        }
    }

    /// The last lines of both logs, for a failure message.
    pub fn logs_tail(&self, lines: usize) -> String {
        [
            Some(&self.etcd),
            Some(&self.apiserver),
            self.controller_manager.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "--- {} ({}) ---\n{}",
                p.name(),
                p.log_path().display(),
                p.log_tail(lines)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// A guard that prints the tail of the control plane's logs if the test
    /// panics while it is alive.
    pub fn failure_guard(&self) -> LogsOnFailure<'_> {
        LogsOnFailure { cp: self }
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = self.client().await?;
        let mut last_err;
        loop {
            if let Err(e) = self.check_running() {
                bail!("the control plane did not start: {e}");
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await {
                Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
                Ok(Ok(body)) => last_err = body,
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "readyz timed out".into(),
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver was not ready after {READY_TIMEOUT:?} (last: {last_err})\n{}",
                    self.logs_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Applies every `*.yaml` CRD in `dir` (but its `kustomization.yaml`)
    /// and waits until each is Established.
    pub async fn install_crds(&self, dir: &Path) -> anyhow::Result<()> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let mut names = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading CRDs from {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml")
                || path.file_name().is_some_and(|n| n == "kustomization.yaml")
            {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            names.push(
                self.apply_crd(&api, &text)
                    .await
                    .with_context(|| format!("applying {}", path.display()))?,
            );
        }
        self.wait_established(&api, names).await
    }

    /// Applies one CRD manifest and waits until it is Established.
    pub async fn install_crd_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        let name = self.apply_crd(&api, yaml).await?;
        self.wait_established(&api, vec![name]).await
    }

    async fn apply_crd(
        &self,
        api: &Api<CustomResourceDefinition>,
        yaml: &str,
    ) -> anyhow::Result<String> {
        let crd: CustomResourceDefinition = serde_norway::from_str(yaml).context("parsing CRD")?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply("opmesh-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        Ok(name)
    }

    async fn wait_established(
        &self,
        api: &Api<CustomResourceDefinition>,
        names: Vec<String>,
    ) -> anyhow::Result<()> {
        for name in names {
            crate::eventually(
                &format!("CRD {name} to be Established"),
                Duration::from_secs(30),
                || {
                    let api = api.clone();
                    let name = name.clone();
                    async move {
                        let crd = api.get(&name).await?;
                        let established = crd
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        Ok(established.then_some(()))
                    }
                },
            )
            .await?;
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(p) = &self.controller_manager {
            p.stop(Duration::from_secs(15));
        }
        self.apiserver.stop(Duration::from_secs(15));
        self.etcd.stop(Duration::from_secs(15));
    }
}

/// Prints the control plane's logs if dropped during a panic.
pub struct LogsOnFailure<'a> {
    cp: &'a ControlPlane,
}

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("control plane logs:\n{}", self.cp.logs_tail(40));
        }
    }
}

/// Builds a client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Runs `tests/control-plane/build.sh` and returns the directory that holds
/// `kube-apiserver` and `etcd`. Reuses the cache, so this is fast after the
/// first build. `OPMESH_CONTROL_PLANE_BIN` overrides the directory.
pub fn binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("OPMESH_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = repo_root().join("tests/control-plane/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .context("build.sh printed no directory")?;
    Ok(PathBuf::from(dir.trim()))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "opmesh-test", "cluster": {
            "server": server,
            "certificate-authority-data": b64(&pki.ca_pem),
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": b64(&pki.admin_cert_pem),
            "client-key-data": b64(&pki.admin_key_pem),
        }}],
        "contexts": [{"name": "opmesh-test", "context": {"cluster": "opmesh-test", "user": "admin"}}],
        "current-context": "opmesh-test",
    });
    // JSON is valid YAML, and kubectl reads it as a kubeconfig.
    doc.to_string()
}
