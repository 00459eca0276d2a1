//! `kubectl opmesh`: the manager's admin API from the command line. Put
//! this binary on `PATH` and kubectl finds it as a plugin.
//!
//! It calls the manager's `--admin-listen` address (`--server`, or
//! `OPMESH_ADMIN_SERVER`) with the token of your kubeconfig, so what you may
//! do is what your RBAC on `operatormeshes.opmesh.io` allows. It trusts the
//! CA in ConfigMap `opmesh-ca` of the mesh's namespace (or
//! `--certificate-authority`). From outside the cluster, forward the port
//! first: `kubectl -n opmesh-system port-forward svc/opmesh-manager 9442`.

use std::{collections::BTreeMap, io::Write as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use opmesh_manager::{
    api::{
        self, ActionResult, Analysis, DrainRequest, Explanation, KeyList, MeshList, MeshStatus,
        PinRequest, Plan, PlanRequest, Rollout, Status, UnpinRequest, WeightsRequest,
    },
    crd::{OperatorMesh, OperatorMeshSpec},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde::Serialize;

/// Inspect and steer opmesh meshes through the manager's admin API.
#[derive(Parser)]
#[command(name = "kubectl-opmesh", bin_name = "kubectl opmesh", version)]
struct Cli {
    /// The manager's admin address, e.g. https://127.0.0.1:9442.
    #[arg(long, env = "OPMESH_ADMIN_SERVER", global = true)]
    server: Option<String>,
    /// The name the manager's certificate is for.
    #[arg(
        long,
        env = "OPMESH_TLS_SERVER_NAME",
        default_value = "opmesh-manager.opmesh-system.svc",
        global = true
    )]
    tls_server_name: String,
    /// A PEM file with the CA that signed the manager's certificate
    /// (default: ConfigMap opmesh-ca in the mesh's namespace).
    #[arg(long, global = true)]
    certificate_authority: Option<PathBuf>,
    /// The bearer token to call with (default: your kubeconfig's).
    #[arg(long, env = "OPMESH_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The mesh's namespace (default: your kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, global = true)]
    output: Option<Output>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Meshes, their subsets, replicas and moving keys.
    Status {
        /// One mesh; all of the namespace's if left out.
        mesh: Option<String>,
        /// Meshes of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Keep showing, with the keys that are moving.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// A mesh's held keys, by subset and replica.
    Keys {
        /// The mesh.
        mesh: String,
        /// Only this subset's.
        #[arg(long)]
        subset: Option<String>,
        /// Only this replica's (pod name).
        #[arg(long)]
        replica: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 500)]
        limit: usize,
    },
    /// Why an object is where it is: the rule, subset, replica and holder.
    Explain {
        /// The mesh.
        mesh: String,
        /// The object: namespace/name (or name, if cluster-scoped).
        object: String,
    },
    /// Which keys a change would move, and the shares after it. Changes
    /// nothing.
    Plan {
        /// The mesh.
        mesh: String,
        /// A file with an OperatorMesh (or its spec).
        #[arg(short = 'f', long, conflicts_with = "weights")]
        filename: Option<PathBuf>,
        /// New weights, e.g. v1=90,v2=10.
        #[arg(long, value_parser = parse_weights)]
        weights: Option<BTreeMap<String, u32>>,
    },
    /// Set the weights (writes the OperatorMesh's spec).
    Weights {
        /// The mesh.
        mesh: String,
        /// The weights, e.g. v1=90,v2=10.
        #[arg(value_parser = parse_weights)]
        weights: BTreeMap<String, u32>,
    },
    /// Freeze ownership changes.
    Pause {
        /// The mesh.
        mesh: String,
    },
    /// Let ownership change again.
    Resume {
        /// The mesh.
        mesh: String,
    },
    /// Send one object to a subset ahead of every other rule (an emergency
    /// override); only its keys move.
    Pin {
        /// The mesh.
        mesh: String,
        /// The object: namespace/name (or name, if cluster-scoped).
        object: String,
        /// The subset.
        subset: String,
    },
    /// Remove an object's pin; it returns to where the policy sends it.
    Unpin {
        /// The mesh.
        mesh: String,
        /// The object.
        object: String,
    },
    /// Compare a canary subset's reconciles with stable's over a window:
    /// error rate, p99 duration, reconciles per generation. Pass, Fail, or
    /// Wait for enough reconciles.
    Analyze {
        /// The mesh.
        mesh: String,
        /// The canary subset.
        #[arg(long)]
        canary: String,
        /// The stable subset.
        #[arg(long)]
        stable: String,
        /// The window, in seconds (at most 900).
        #[arg(long, default_value_t = 300)]
        window: u64,
        /// Reconciles each side needs before a verdict.
        #[arg(long, default_value_t = 2000)]
        min_samples: u64,
    },
    /// A canary rollout: its status, or promote, abort or retry it.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        action: RolloutCommand,
    },
    /// Move every key off a replica, so its pod can be deleted without its
    /// keys waiting for a lease to run out.
    Drain {
        /// The mesh.
        mesh: String,
        /// The replica's pod (name, or namespace/name).
        pod: String,
        /// Stop draining it.
        #[arg(long)]
        undo: bool,
        /// Wait until it holds no keys.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Where the rollout is: step, canary share, each analysis's numbers,
    /// what happens next.
    Status {
        /// The mesh.
        mesh: String,
        /// Keep showing it until it is promoted or rolled back.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Let the current pause pass (the rollout must be paused).
    Promote {
        /// The mesh.
        mesh: String,
    },
    /// Stop this run of the rollout, and return every key to stable.
    Abort {
        /// The mesh.
        mesh: String,
    },
    /// Start a rolled-back or aborted rollout over.
    Retry {
        /// The mesh.
        mesh: String,
    },
}

fn parse_weights(s: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected SUBSET=WEIGHT, e.g. v1=90,v2=10"))?;
        let w: u32 = w
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: the weight must be a whole number"))?;
        if out.insert(name.trim().to_string(), w).is_some() {
            return Err(format!("subset {name:?} is given twice"));
        }
    }
    if out.is_empty() {
        return Err("no weights given; e.g. v1=90,v2=10".into());
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let kube = kube::Config::infer().await.ok();
    let namespace = cli
        .namespace
        .clone()
        .or_else(|| kube.as_ref().map(|k| k.default_namespace.clone()))
        .unwrap_or_else(|| "default".into());
    let client = Admin::new(&cli, kube.as_ref(), &namespace).await?;
    let output = cli.output;
    let base = format!("{}/namespaces/{namespace}/meshes", api::PREFIX);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Status {
            mesh,
            all_namespaces,
            watch,
        } => loop {
            let list: MeshList = match (&mesh, all_namespaces) {
                (Some(m), _) => MeshList {
                    items: vec![client.get(&format!("{base}/{m}")).await?],
                },
                (None, true) => client.get(&format!("{}/meshes", api::PREFIX)).await?,
                (None, false) => client.get(&base).await?,
            };
            if watch {
                // Clear the screen, like `watch`.
                write!(out, "\x1b[2J\x1b[H")?;
            }
            print_status(&mut out, &list, output, all_namespaces)?;
            if !watch {
                break;
            }
            out.flush()?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        Command::Keys {
            mesh,
            subset,
            replica,
            limit,
        } => {
            let mut query = vec![format!("limit={}", limit.clamp(1, 5000))];
            if let Some(s) = subset {
                query.push(format!("subset={}", encode(&s)));
            }
            if let Some(r) = replica {
                query.push(format!("replica={}", encode(&r)));
            }
            let keys: KeyList = client
                .get(&format!("{base}/{mesh}/keys?{}", query.join("&")))
                .await?;
            match output {
                Some(Output::Json | Output::Yaml) => emit(&mut out, &keys, output)?,
                _ => {
                    let rows = keys
                        .items
                        .iter()
                        .map(|k| {
                            vec![
                                k.key.clone(),
                                k.subset.clone().unwrap_or_else(|| "<none>".into()),
                                k.replica.clone(),
                                yes_no(k.moving),
                            ]
                        })
                        .collect();
                    table(&mut out, &["KEY", "SUBSET", "REPLICA", "MOVING"], rows)?;
                    if keys.continue_.is_some() {
                        writeln!(
                            out,
                            "(more keys: raise --limit, or narrow with --subset or --replica)"
                        )?;
                    }
                }
            }
        }
        Command::Explain { mesh, object } => {
            let e: Explanation = client
                .get(&format!("{base}/{mesh}/explain?key={}", encode(&object)))
                .await?;
            match output {
                Some(Output::Json | Output::Yaml) => emit(&mut out, &e, output)?,
                _ => print_explanation(&mut out, &e)?,
            }
        }
        Command::Plan {
            mesh,
            filename,
            weights,
        } => {
            let request = match (filename, weights) {
                (Some(f), _) => PlanRequest {
                    spec: Some(read_spec(&f)?),
                    weights: None,
                },
                (None, Some(w)) => PlanRequest {
                    weights: Some(w),
                    spec: None,
                },
                (None, None) => bail!("plan needs -f FILE or --weights v1=90,v2=10"),
            };
            let plan: Plan = client
                .post(&format!("{base}/{mesh}/plan"), &request)
                .await?;
            match output {
                Some(Output::Json | Output::Yaml) => emit(&mut out, &plan, output)?,
                _ => print_plan(&mut out, &plan)?,
            }
        }
        Command::Weights { mesh, weights } => {
            let r: ActionResult = client
                .post(
                    &format!("{base}/{mesh}/weights"),
                    &WeightsRequest { weights },
                )
                .await?;
            action(&mut out, &r, output)?;
        }
        Command::Pause { mesh } => {
            let r: ActionResult = client.post(&format!("{base}/{mesh}/pause"), &()).await?;
            action(&mut out, &r, output)?;
        }
        Command::Resume { mesh } => {
            let r: ActionResult = client.post(&format!("{base}/{mesh}/resume"), &()).await?;
            action(&mut out, &r, output)?;
        }
        Command::Rollout { action: command } => {
            let (mesh, verb) = match &command {
                RolloutCommand::Status { mesh, .. } => (mesh.clone(), None),
                RolloutCommand::Promote { mesh } => (mesh.clone(), Some("promote")),
                RolloutCommand::Abort { mesh } => (mesh.clone(), Some("abort")),
                RolloutCommand::Retry { mesh } => (mesh.clone(), Some("retry")),
            };
            if let Some(verb) = verb {
                let r: ActionResult = client
                    .post(&format!("{base}/{mesh}/rollout/{verb}"), &())
                    .await?;
                action(&mut out, &r, output)?;
                return Ok(());
            }
            let watch = matches!(command, RolloutCommand::Status { watch: true, .. });
            loop {
                let r: Rollout = client.get(&format!("{base}/{mesh}/rollout")).await?;
                if watch {
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                match output {
                    Some(Output::Json | Output::Yaml) => emit(&mut out, &r, output)?,
                    _ => print_rollout(&mut out, &r)?,
                }
                // Done once the declared rollout (not an earlier revision's
                // status) has ended; nothing declared, nothing to follow.
                let done = match (&r.spec, &r.status) {
                    (None, _) => true,
                    (Some(spec), Some(st)) => {
                        st.revision == spec.revision
                            && st.retry == spec.retry
                            && (st.phase == "Promoted" || st.phase == "RolledBack")
                    }
                    (Some(_), None) => false,
                };
                if !watch || done {
                    break;
                }
                out.flush()?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Command::Analyze {
            mesh,
            canary,
            stable,
            window,
            min_samples,
        } => {
            let a: Analysis = client
                .get(&format!(
                    "{base}/{mesh}/analysis?canary={}&stable={}&windowSeconds={window}&minSamples={min_samples}",
                    encode(&canary),
                    encode(&stable)
                ))
                .await?;
            match output {
                Some(Output::Json | Output::Yaml) => emit(&mut out, &a, output)?,
                _ => {
                    let rows = [&a.canary, &a.stable]
                        .into_iter()
                        .map(|s| {
                            vec![
                                s.subset.clone(),
                                s.reconciles.to_string(),
                                format!("{:.2}%", s.error_rate_percent),
                                format!("{:.1}ms", s.p99_ms),
                                format!("{:.2}", s.reconciles_per_generation),
                            ]
                        })
                        .collect();
                    table(
                        &mut out,
                        &["SUBSET", "RECONCILES", "ERRORS", "P99", "PER GENERATION"],
                        rows,
                    )?;
                    writeln!(
                        out,
                        "\n{} (last {}s, at least {} reconciles each)",
                        a.verdict, a.window_seconds, a.min_samples
                    )?;
                    for r in &a.reasons {
                        writeln!(out, "  {r}")?;
                    }
                }
            }
        }
        Command::Pin {
            mesh,
            object,
            subset,
        } => {
            let r: ActionResult = client
                .post(
                    &format!("{base}/{mesh}/pin"),
                    &PinRequest { object, subset },
                )
                .await?;
            action(&mut out, &r, output)?;
        }
        Command::Unpin { mesh, object } => {
            let r: ActionResult = client
                .post(&format!("{base}/{mesh}/unpin"), &UnpinRequest { object })
                .await?;
            action(&mut out, &r, output)?;
        }
        Command::Drain {
            mesh,
            pod,
            undo,
            wait,
        } => {
            let r: ActionResult = client
                .post(
                    &format!("{base}/{mesh}/drain"),
                    &DrainRequest {
                        pod: pod.clone(),
                        undo,
                    },
                )
                .await?;
            action(&mut out, &r, output)?;
            if wait && !undo {
                let full = if pod.contains('/') {
                    pod.clone()
                } else {
                    format!("{namespace}/{pod}")
                };
                loop {
                    let m: MeshStatus = client.get(&format!("{base}/{mesh}")).await?;
                    let held: Option<u64> = m
                        .subsets
                        .iter()
                        .flat_map(|s| &s.replicas)
                        .find(|r| r.pod == full)
                        .map(|r| r.owned_keys);
                    if m.moving == 0 && held.unwrap_or(0) == 0 {
                        writeln!(out, "{full} holds no keys; its pod can be deleted")?;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    Ok(())
}

/// An OperatorMesh's spec from a YAML or JSON file holding the object or
/// just its spec.
fn read_spec(path: &PathBuf) -> anyhow::Result<OperatorMeshSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(mesh) = serde_norway::from_str::<OperatorMesh>(&text) {
        return Ok(mesh.spec);
    }
    serde_norway::from_str::<OperatorMeshSpec>(&text).with_context(|| {
        format!(
            "{} holds neither an OperatorMesh nor its spec",
            path.display()
        )
    })
}

/// The admin API over HTTPS.
struct Admin {
    server: Uri,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    token: String,
}

impl Admin {
    async fn new(cli: &Cli, kube: Option<&kube::Config>, namespace: &str) -> anyhow::Result<Self> {
        let server = cli.server.clone().context(
            "no admin address: pass --server https://HOST:PORT (or set OPMESH_ADMIN_SERVER); \
             from outside the cluster, first `kubectl -n opmesh-system port-forward \
             svc/opmesh-manager 9442`",
        )?;
        let server: Uri = server
            .parse()
            .with_context(|| format!("--server {server:?} is not a URL"))?;
        if server.scheme_str() != Some("https") {
            bail!("--server must be an https:// address: the admin API is served over TLS only");
        }
        let token = match (&cli.token, kube) {
            (Some(t), _) => t.clone(),
            (None, Some(k)) => token_of(k)?,
            (None, None) => {
                bail!("no token: no kubeconfig was found; pass --token or set KUBECONFIG")
            }
        };
        let ca = match &cli.certificate_authority {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("reading --certificate-authority {}", path.display()))?,
            None => {
                let k = kube.context(
                    "no kubeconfig to read ConfigMap opmesh-ca with; pass --certificate-authority",
                )?;
                let client = kube::Client::try_from(k.clone())?;
                let cm = kube::Api::<ConfigMap>::namespaced(client, namespace)
                    .get("opmesh-ca")
                    .await
                    .with_context(|| {
                        format!(
                            "reading ConfigMap {namespace}/opmesh-ca for the manager's CA; pass \
                             --certificate-authority instead"
                        )
                    })?;
                cm.data
                    .and_then(|d| d.get("ca.crt").cloned())
                    .context("ConfigMap opmesh-ca has no ca.crt")?
                    .into_bytes()
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.context("the CA file is not PEM")?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            server,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(cli.tls_server_name.clone())?,
            token,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, Vec::new()).await
    }

    async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(Method::POST, path, serde_json::to_vec(body)?)
            .await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<T> {
        let authority = self.server.authority().context("--server has no host")?;
        let port = authority.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .with_context(|| format!("cannot reach the manager at {}", self.server))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS with the manager at {}", self.server))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            let message = match serde_json::from_slice::<Status>(&bytes) {
                Ok(s) => match s.leader {
                    Some(l) => {
                        format!("{} ({} {}; the leader is {l})", s.message, s.code, s.reason)
                    }
                    None => format!("{} ({} {})", s.message, s.code, s.reason),
                },
                Err(_) => format!("{status}: {}", String::from_utf8_lossy(&bytes)),
            };
            bail!(message);
        }
        serde_json::from_slice(&bytes).context("the manager's answer does not parse")
    }
}

/// The bearer token of a kubeconfig's user.
fn token_of(k: &kube::Config) -> anyhow::Result<String> {
    use secrecy::ExposeSecret as _;
    if let Some(t) = &k.auth_info.token {
        return Ok(t.expose_secret().to_string());
    }
    if let Some(f) = &k.auth_info.token_file {
        return Ok(std::fs::read_to_string(f)
            .with_context(|| format!("reading the kubeconfig's token file {f}"))?
            .trim()
            .to_string());
    }
    bail!(
        "your kubeconfig's user has no bearer token (client certificates and exec plugins are not \
         passed on): pass --token, e.g. --token \"$(kubectl create token <service-account>)\""
    )
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A kubectl-style table: upper-case headers, columns three spaces apart.
fn table(
    out: &mut impl std::io::Write,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    (*c).to_string()
                } else {
                    format!("{c:<w$}   ", w = widths[i])
                }
            })
            .collect::<String>()
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn emit<T: Serialize>(
    out: &mut impl std::io::Write,
    value: &T,
    output: Option<Output>,
) -> anyhow::Result<()> {
    match output {
        Some(Output::Yaml) => write!(out, "{}", serde_norway::to_string(value)?)?,
        _ => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
    }
    Ok(())
}

fn action(
    out: &mut impl std::io::Write,
    r: &ActionResult,
    output: Option<Output>,
) -> anyhow::Result<()> {
    match output {
        Some(Output::Json | Output::Yaml) => emit(out, r, output),
        _ => Ok(writeln!(out, "{}", r.message)?),
    }
}

fn print_status(
    out: &mut impl std::io::Write,
    list: &MeshList,
    output: Option<Output>,
    all_namespaces: bool,
) -> anyhow::Result<()> {
    if matches!(output, Some(Output::Json | Output::Yaml)) {
        return emit(out, list, output);
    }
    let wide = output == Some(Output::Wide);
    let mut headers = vec![];
    if all_namespaces {
        headers.push("NAMESPACE");
    }
    headers.extend([
        "MESH", "SUBSET", "WEIGHT", "OBSERVED", "KEYS", "REPLICAS", "MOVING",
    ]);
    if wide {
        headers.extend(["PAUSED", "REPLICA PODS"]);
    }
    let mut rows = Vec::new();
    for m in &list.items {
        for s in &m.subsets {
            let ready = s.replicas.iter().filter(|r| r.ready).count();
            let mut row = vec![];
            if all_namespaces {
                row.push(m.namespace.clone());
            }
            row.extend([
                m.name.clone(),
                s.name.clone(),
                format!("{:.1}%", s.configured_share),
                format!("{:.1}%", s.observed_share),
                s.routed_keys.to_string(),
                format!("{ready}/{}", s.replicas.len()),
                m.moving.to_string(),
            ]);
            if wide {
                row.push(yes_no(m.paused));
                let pods: Vec<String> = s
                    .replicas
                    .iter()
                    .map(|r| {
                        format!(
                            "{}(keys={},running={}/{},queued={},lease={:.1}s{})",
                            r.pod.rsplit('/').next().unwrap_or(&r.pod),
                            r.owned_keys,
                            r.in_flight,
                            r.capacity,
                            r.queue_depth,
                            r.lease_remaining_ms as f64 / 1000.0,
                            if r.draining { ",draining" } else { "" }
                        )
                    })
                    .collect();
                row.push(if pods.is_empty() {
                    "<none>".into()
                } else {
                    pods.join(",")
                });
            }
            rows.push(row);
        }
    }
    table(out, &headers, rows)?;
    for m in &list.items {
        if let Some(why) = &m.invalid {
            writeln!(
                out,
                "\n{}/{}: the latest spec is refused, the last valid one stays in force: {why}",
                m.namespace, m.name
            )?;
        }
        if m.moving > 0 {
            let held = m.held_keys.max(1);
            let done = held.saturating_sub(m.moving);
            let width = 30;
            let filled = done * width / held;
            writeln!(
                out,
                "\n{}/{}: moving {} keys [{}{}] {}/{} settled",
                m.namespace,
                m.name,
                m.moving,
                "#".repeat(filled),
                "-".repeat(width - filled),
                done,
                held
            )?;
            for k in &m.moving_keys {
                writeln!(out, "  {k}")?;
            }
        }
    }
    Ok(())
}

fn print_explanation(out: &mut impl std::io::Write, e: &Explanation) -> anyhow::Result<()> {
    writeln!(out, "Object:   {}", e.object)?;
    writeln!(out, "Rule:     {}", e.rule)?;
    writeln!(out, "Detail:   {}", e.detail)?;
    writeln!(out, "Subset:   {}", e.subset.as_deref().unwrap_or("<none>"))?;
    writeln!(
        out,
        "Replica:  {}",
        e.replica.as_deref().unwrap_or("<none>")
    )?;
    if e.keys.is_empty() {
        writeln!(out, "Held:     <no runtime holds its keys>")?;
    } else {
        writeln!(out, "Held:")?;
        let rows = e
            .keys
            .iter()
            .map(|k| vec![k.key.clone(), k.replica.clone(), yes_no(k.moving)])
            .collect();
        let mut buf = Vec::new();
        table(&mut buf, &["KEY", "HOLDER", "MOVING"], rows)?;
        for line in String::from_utf8_lossy(&buf).lines() {
            writeln!(out, "  {line}")?;
        }
    }
    if e.outcomes.is_empty() {
        writeln!(out, "Last reconciles: <none reported>")?;
    } else {
        writeln!(out, "Last reconciles:")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or_default();
        let rows = e
            .outcomes
            .iter()
            .map(|o| {
                vec![
                    format!(
                        "{:.1}s ago",
                        (now - o.finished_unix_ms).max(0) as f64 / 1000.0
                    ),
                    o.result.clone(),
                    format!("{:.1}ms", o.duration_ms),
                    o.operator_version.clone(),
                    o.generation.to_string(),
                    o.replica.clone(),
                    o.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut buf = Vec::new();
        table(
            &mut buf,
            &[
                "WHEN",
                "RESULT",
                "DURATION",
                "VERSION",
                "GENERATION",
                "REPLICA",
                "ERROR",
            ],
            rows,
        )?;
        for line in String::from_utf8_lossy(&buf).lines() {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

fn print_rollout(out: &mut impl std::io::Write, r: &Rollout) -> anyhow::Result<()> {
    let Some(spec) = &r.spec else {
        writeln!(out, "no rollout is declared (spec.rollout)")?;
        return Ok(());
    };
    // A status of an earlier revision or retry is not this rollout's.
    let current = r
        .status
        .as_ref()
        .filter(|s| s.revision == spec.revision && s.retry == spec.retry);
    let Some(st) = current else {
        writeln!(
            out,
            "{} -> {} ({}): not started yet",
            spec.stable, spec.canary, spec.revision
        )?;
        return Ok(());
    };
    writeln!(
        out,
        "Rollout:  {} -> {} ({})",
        spec.stable, spec.canary, st.revision
    )?;
    writeln!(out, "Phase:    {}", st.phase)?;
    writeln!(
        out,
        "Step:     {} (since {})",
        st.step_text, st.step_started_at
    )?;
    let width = 30;
    let filled = (st.weight.min(100) as usize) * width / 100;
    writeln!(
        out,
        "Canary:   [{}{}] {}%",
        "#".repeat(filled),
        "-".repeat(width - filled),
        st.weight
    )?;
    writeln!(out, "Next:     {}", st.message)?;
    if !st.analyses.is_empty() {
        writeln!(out, "Analyses:")?;
        for a in &st.analyses {
            writeln!(out, "  step {} {} at {}", a.step + 1, a.verdict, a.at)?;
            writeln!(out, "    canary: {}", a.canary)?;
            writeln!(out, "    stable: {}", a.stable)?;
            for why in &a.reasons {
                writeln!(out, "    {why}")?;
            }
        }
    }
    Ok(())
}

fn print_plan(out: &mut impl std::io::Write, plan: &Plan) -> anyhow::Result<()> {
    let before: BTreeMap<&str, (u64, f64)> = plan
        .before
        .iter()
        .map(|s| (s.subset.as_str(), (s.keys, s.percent)))
        .collect();
    let rows = plan
        .after
        .iter()
        .map(|s| {
            let (k, p) = before.get(s.subset.as_str()).copied().unwrap_or((0, 0.0));
            vec![
                s.subset.clone(),
                format!("{k} ({p:.1}%)"),
                format!("{} ({:.1}%)", s.keys, s.percent),
            ]
        })
        .collect();
    table(out, &["SUBSET", "KEYS NOW", "KEYS AFTER"], rows)?;
    writeln!(out, "\n{} keys would move:", plan.moves.len())?;
    let rows = plan
        .moves
        .iter()
        .map(|m| {
            vec![
                m.key.clone(),
                m.from.clone().unwrap_or_else(|| "<none>".into()),
                m.to.clone().unwrap_or_else(|| "<none>".into()),
            ]
        })
        .collect();
    table(out, &["KEY", "FROM", "TO"], rows)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_weights("v1=90, v2=10").unwrap(),
            BTreeMap::from([("v1".into(), 90), ("v2".into(), 10)])
        );
        assert!(parse_weights("v1").unwrap_err().contains("SUBSET=WEIGHT"));
        assert!(parse_weights("v1=x").unwrap_err().contains("whole number"));
        assert!(parse_weights("v1=1,v1=2").unwrap_err().contains("twice"));
        assert!(parse_weights("").is_err());
    }

    #[test]
    fn tables_align_like_kubectl() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["A", "LONGER"],
            vec![
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A     LONGER\nxyz   1\nq     22\n"
        );
    }
}
