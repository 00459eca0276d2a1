//! An example operator built with the opmesh SDK: `ConfigMapGenerator`,
//! and with `--bundles` a second controller, `ConfigMapBundle`, behind the
//! same sidecar.
//!
//! Each `ConfigMapGenerator` owns a ConfigMap named `<name>-generated` holding
//! its `spec.data`. The operator writes `status.handledBy` (subset/pod),
//! `status.observedGeneration` and `status.version`, and appends JSON lines
//! to `--records` so tests can check who reconciled what, and when: one when
//! a reconcile starts (so a reconcile whose process is killed still shows),
//! one when it starts working (`reconcileMs`), one before and one after each
//! API write, and one when it ends. Each write also carries the id
//! of the reconcile that made it (the ConfigMap's
//! `example.opmesh.io/written-by` annotation, `status.writtenBy`), so a
//! watcher sees in which order writes landed on the server.
//!
//! The same binary runs as every version; `--version` (`OPMESH_EXAMPLE_VERSION`)
//! only labels what it writes.
//!
//! A `ConfigMapBundle` owns one ConfigMap per name in `spec.names`
//! (`<bundle>-<name>`) and writes `status.handledBy` and
//! `status.observedGeneration` the same way, with the same records.
//!
//! ```text
//! configmap_generator crd            # print the CRD (--bundle: ConfigMapBundle's)
//! configmap_generator run --version v2 --records /tmp/v2.jsonl [--bundles]
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand};
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client, CustomResource, CustomResourceExt as _, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
};
use opmesh_sdk::{Action, Controller, Mesh};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Generates a ConfigMap from `data`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "example.opmesh.io",
    version = "v1",
    kind = "ConfigMapGenerator",
    namespaced,
    status = "ConfigMapGeneratorStatus",
    shortname = "cmg",
    printcolumn = r#"{"name":"Handled By","type":"string","jsonPath":".status.handledBy"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapGeneratorSpec {
    /// The data of the generated ConfigMap.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Fail this many reconciles of each generation before succeeding, to
    /// exercise error backoff.
    #[serde(default)]
    pub fail_times: u32,
    /// After success, reconcile again after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeue_after_ms: Option<u64>,
    /// Each reconcile works this many milliseconds before it writes: a slow
    /// operator, or with a large value one that hangs until cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_ms: Option<u64>,
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapGeneratorStatus {
    /// `subset/pod` of the replica that reconciled last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_by: Option<String>,
    /// The generation reconciled last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The operator version that reconciled last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The id of the reconcile that wrote this status (`<pid>-<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_by: Option<String>,
}

/// Owns one ConfigMap per name: `<bundle>-<name>`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "example.opmesh.io",
    version = "v1",
    kind = "ConfigMapBundle",
    namespaced,
    status = "ConfigMapBundleStatus",
    shortname = "cmb",
    printcolumn = r#"{"name":"Handled By","type":"string","jsonPath":".status.handledBy"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapBundleSpec {
    /// One ConfigMap for each.
    #[serde(default)]
    pub names: Vec<String>,
}

/// What the operator observed of a bundle.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapBundleStatus {
    /// `subset/pod` of the replica that reconciled last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_by: Option<String>,
    /// The generation reconciled last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The ConfigMap annotation naming the reconcile that wrote it.
const WRITTEN_BY: &str = "example.opmesh.io/written-by";

#[derive(Parser)]
#[command(
    name = "configmap_generator",
    version,
    about = "Example opmesh operator: ConfigMapGenerator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ConfigMapGenerator CRD as YAML.
    Crd {
        /// The ConfigMapBundle CRD instead.
        #[arg(long)]
        bundle: bool,
    },
    /// Run the operator against the sidecar at $OPMESH_RUNTIME_SOCKET.
    Run {
        /// The operator version this process reports.
        #[arg(
            long = "operator-version",
            env = "OPMESH_EXAMPLE_VERSION",
            default_value = "v1"
        )]
        version: String,
        /// Append a JSON line per reconcile to this file.
        #[arg(long, env = "OPMESH_EXAMPLE_RECORDS")]
        records: Option<PathBuf>,
        /// Reconcile without writing: read the cache, record, skip every
        /// API write. For measuring the mesh's own cost.
        #[arg(long, env = "OPMESH_EXAMPLE_DRY_RUN")]
        dry_run: bool,
        /// Also run the ConfigMapBundle controller, on the same sidecar.
        #[arg(long, env = "OPMESH_EXAMPLE_BUNDLES")]
        bundles: bool,
        /// Fail this share (0 to 1) of reconciles, as a faulty version
        /// would: for trying canary analysis.
        #[arg(long, env = "OPMESH_EXAMPLE_FAIL_RATE", default_value_t = 0.0)]
        fail_rate: f64,
        /// Requeue every object 20 ms after each reconcile, changed or not,
        /// as a version with a hot loop would.
        #[arg(long, env = "OPMESH_EXAMPLE_HOT_LOOP")]
        hot_loop: bool,
        /// Never finish a reconcile, as a version stuck on a deadlock or a
        /// call without a timeout would: for trying generation-lag
        /// analysis.
        #[arg(long, env = "OPMESH_EXAMPLE_STALL")]
        stall: bool,
    },
}

struct Ctx {
    client: Client,
    cache: opmesh_sdk::Cache,
    version: String,
    records: Option<PathBuf>,
    dry_run: bool,
    /// The share of reconciles to fail (`--fail-rate`).
    fail_rate: f64,
    /// Requeue at once after every reconcile (`--hot-loop`).
    hot_loop: bool,
    /// Never finish a reconcile (`--stall`).
    stall: bool,
    /// Failed attempts per (key, generation), for `failTimes`.
    attempts: Mutex<HashMap<(String, i64), u32>>,
    /// Reconciles started by this process, for their ids.
    started: AtomicU64,
}

/// One line of the records file.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line<'a> {
    /// A reconcile started.
    Start {
        id: &'a str,
        key: &'a str,
        runtime: &'a str,
        pid: u32,
        subset: &'a str,
        version: &'a str,
        generation: i64,
        start_us: u128,
    },
    /// A reconcile read what it needs and works (`reconcileMs`) before
    /// writing.
    Working { id: &'a str, key: &'a str },
    /// A reconcile's API write is about to be sent.
    Writing {
        id: &'a str,
        key: &'a str,
        target: &'a str,
    },
    /// A reconcile's API write returned.
    Write {
        id: &'a str,
        key: &'a str,
        target: &'a str,
        outcome: &'a str,
        end_us: u128,
    },
    /// A reconcile ended.
    End {
        id: &'a str,
        key: &'a str,
        runtime: &'a str,
        pid: u32,
        subset: &'a str,
        version: &'a str,
        generation: i64,
        start_us: u128,
        end_us: u128,
        outcome: &'a str,
    },
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("kube: {0}")]
    Kube(#[from] kube::Error),
    #[error("cache: {0}")]
    Cache(#[from] opmesh_sdk::Error),
    #[error("failing on purpose ({0} of failTimes)")]
    OnPurpose(u32),
    #[error("failing on purpose (--fail-rate)")]
    FailRate,
    #[error("reconcile called outside a task")]
    NoTask,
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

async fn reconcile(obj: Arc<ConfigMapGenerator>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let task = opmesh_sdk::current().ok_or(Error::NoTask)?;
    let generation = obj.metadata.generation.unwrap_or_default();
    let mut record = Recorder::start(&ctx, &task, generation);
    let result = apply(&obj, &ctx, &task, &record.id, generation).await;
    record.finish(&result);
    result
}

async fn reconcile_bundle(obj: Arc<ConfigMapBundle>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let task = opmesh_sdk::current().ok_or(Error::NoTask)?;
    let generation = obj.metadata.generation.unwrap_or_default();
    let mut record = Recorder::start(&ctx, &task, generation);
    let result = apply_bundle(&obj, &ctx, &task, &record.id, generation).await;
    record.finish(&result);
    result
}

impl Recorder {
    /// Records the start of a reconcile of `task`.
    fn start(ctx: &Arc<Ctx>, task: &opmesh_sdk::TaskInfo, generation: i64) -> Self {
        let n = ctx.started.fetch_add(1, Ordering::Relaxed);
        let record = Recorder {
            ctx: ctx.clone(),
            id: format!("{}-{n}", std::process::id()),
            key: task.key.clone(),
            runtime: task.runtime_id.clone(),
            subset: task.subset.clone(),
            generation,
            start_us: now_us(),
            outcome: None,
        };
        record.ctx.append(&Line::Start {
            id: &record.id,
            key: &record.key,
            runtime: &record.runtime,
            pid: std::process::id(),
            subset: &record.subset,
            version: &ctx.version,
            generation,
            start_us: record.start_us,
        });
        record
    }

    /// Notes how the reconcile ended; the record is written when dropped.
    fn finish<T>(&mut self, result: &Result<T, Error>) {
        self.outcome = Some(match result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        });
    }
}

impl Ctx {
    /// Appends one line to the records file, if there is one.
    fn append(&self, line: &Line<'_>) {
        let Some(path) = &self.records else {
            return;
        };
        let line = serde_json::to_string(line).unwrap_or_default();
        // One write per line with O_APPEND keeps lines whole.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// Records a write's outcome and passes it on.
    fn wrote<T>(&self, id: &str, key: &str, target: &str, r: kube::Result<T>) -> kube::Result<T> {
        let outcome = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) if opmesh_sdk::is_fenced(e) => format!("fenced: {e}"),
            Err(e) => format!("error: {e}"),
        };
        self.append(&Line::Write {
            id,
            key,
            target,
            outcome: &outcome,
            end_us: now_us(),
        });
        r
    }
}

/// Writes the record of one reconcile when dropped, so a reconcile that is
/// cancelled midway is recorded too (as `cancelled`).
struct Recorder {
    ctx: Arc<Ctx>,
    id: String,
    key: String,
    runtime: String,
    subset: String,
    generation: i64,
    start_us: u128,
    outcome: Option<String>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.ctx.append(&Line::End {
            id: &self.id,
            key: &self.key,
            runtime: &self.runtime,
            pid: std::process::id(),
            subset: &self.subset,
            version: &self.ctx.version,
            generation: self.generation,
            start_us: self.start_us,
            end_us: now_us(),
            outcome: self.outcome.as_deref().unwrap_or("cancelled"),
        });
    }
}

async fn apply(
    obj: &ConfigMapGenerator,
    ctx: &Ctx,
    task: &opmesh_sdk::TaskInfo,
    id: &str,
    generation: i64,
) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    if ctx.stall {
        std::future::pending::<()>().await;
    }
    if ctx.fail_rate > 0.0 {
        // Spread evenly over reconciles, without a random source: the
        // fractional part of n times the golden ratio.
        let n = ctx.started.load(Ordering::Relaxed) as f64;
        if (n * 0.618_033_988_749_895).fract() < ctx.fail_rate {
            return Err(Error::FailRate);
        }
    }
    if obj.spec.fail_times > 0 {
        let mut attempts = ctx.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let n = attempts.entry((task.key.clone(), generation)).or_insert(0);
        if *n < obj.spec.fail_times {
            *n += 1;
            return Err(Error::OnPurpose(*n));
        }
    }

    // Like any level-triggered operator, write only what differs from what
    // is there: the owned ConfigMap as the cache holds it, and our status.
    let cm_name = format!("{name}-generated");
    let current: Option<ConfigMap> = ctx.cache.get(Some(&ns), &cm_name).await?;
    let uid = obj.metadata.uid.as_deref();
    let cm_current = current.is_some_and(|cm| {
        cm.data.unwrap_or_default() == obj.spec.data
            && cm
                .metadata
                .owner_references
                .unwrap_or_default()
                .iter()
                .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
    });
    let pod = task.runtime_id.rsplit('/').next().unwrap_or_default();
    let mut want = ConfigMapGeneratorStatus {
        handled_by: Some(format!("{}/{pod}", task.subset)),
        observed_generation: Some(generation),
        version: Some(ctx.version.clone()),
        written_by: obj.status.as_ref().and_then(|s| s.written_by.clone()),
    };
    // Who wrote last is not part of the desired state.
    let status_current = obj.status.as_ref() == Some(&want);
    want.written_by = Some(id.to_string());
    if ctx.dry_run {
        return Ok(Action::await_change());
    }
    // The work between reading and writing, if the spec asks for any.
    if let Some(ms) = obj.spec.reconcile_ms {
        ctx.append(&Line::Working { id, key: &task.key });
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    // Writes are fenced: if this replica loses the key or its lease
    // mid-reconcile, they fail instead of racing the new owner.
    let client = opmesh_sdk::fenced(&ctx.client);
    if !cm_current {
        let owner = obj.controller_owner_ref(&()).into_iter().collect();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(cm_name.clone()),
                namespace: Some(ns.clone()),
                owner_references: Some(owner),
                labels: Some(BTreeMap::from([(
                    "example.opmesh.io/generator".to_string(),
                    name.clone(),
                )])),
                annotations: Some(BTreeMap::from([(WRITTEN_BY.to_string(), id.to_string())])),
                ..Default::default()
            },
            data: Some(obj.spec.data.clone()),
            ..Default::default()
        };
        let pp = PatchParams::apply("configmap-generator").force();
        ctx.append(&Line::Writing {
            id,
            key: &task.key,
            target: "configmap",
        });
        let r = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .patch(&cm_name, &pp, &Patch::Apply(&cm))
            .await;
        ctx.wrote(id, &task.key, "configmap", r)?;
    }
    if !status_current {
        let status = serde_json::json!({ "status": want });
        ctx.append(&Line::Writing {
            id,
            key: &task.key,
            target: "status",
        });
        let r = Api::<ConfigMapGenerator>::namespaced(client, &ns)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
        ctx.wrote(id, &task.key, "status", r)?;
    }

    if ctx.hot_loop {
        // A bug many operators have had: asking to be called again at once,
        // whether anything changed or not.
        return Ok(Action::requeue(Duration::from_millis(20)));
    }
    Ok(match obj.spec.requeue_after_ms {
        Some(ms) => Action::requeue(Duration::from_millis(ms)),
        None => Action::await_change(),
    })
}

async fn apply_bundle(
    obj: &ConfigMapBundle,
    ctx: &Ctx,
    task: &opmesh_sdk::TaskInfo,
    id: &str,
    generation: i64,
) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let pod = task.runtime_id.rsplit('/').next().unwrap_or_default();
    let want = ConfigMapBundleStatus {
        handled_by: Some(format!("{}/{pod}", task.subset)),
        observed_generation: Some(generation),
    };
    if ctx.dry_run {
        return Ok(Action::await_change());
    }
    let client = opmesh_sdk::fenced(&ctx.client);
    let uid = obj.metadata.uid.as_deref();
    for member in &obj.spec.names {
        let cm_name = format!("{name}-{member}");
        let current: Option<ConfigMap> = ctx.cache.get(Some(&ns), &cm_name).await?;
        let owned = current.is_some_and(|cm| {
            cm.metadata
                .owner_references
                .unwrap_or_default()
                .iter()
                .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
        });
        if owned {
            continue;
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(cm_name.clone()),
                namespace: Some(ns.clone()),
                owner_references: Some(obj.controller_owner_ref(&()).into_iter().collect()),
                annotations: Some(BTreeMap::from([(WRITTEN_BY.to_string(), id.to_string())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("member".to_string(), member.clone())])),
            ..Default::default()
        };
        ctx.append(&Line::Writing {
            id,
            key: &task.key,
            target: "configmap",
        });
        let r = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .patch(
                &cm_name,
                &PatchParams::apply("configmap-bundle").force(),
                &Patch::Apply(&cm),
            )
            .await;
        ctx.wrote(id, &task.key, "configmap", r)?;
    }
    if obj.status.as_ref() != Some(&want) {
        ctx.append(&Line::Writing {
            id,
            key: &task.key,
            target: "status",
        });
        let r = Api::<ConfigMapBundle>::namespaced(client, &ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": want })),
            )
            .await;
        ctx.wrote(id, &task.key, "status", r)?;
    }
    Ok(Action::await_change())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match Cli::parse().command {
        Command::Crd { bundle: false } => {
            print!("{}", serde_norway::to_string(&ConfigMapGenerator::crd())?);
            Ok(())
        }
        Command::Crd { bundle: true } => {
            print!("{}", serde_norway::to_string(&ConfigMapBundle::crd())?);
            Ok(())
        }
        Command::Run {
            version,
            records,
            dry_run,
            bundles,
            fail_rate,
            hot_loop,
            stall,
        } => {
            if !(0.0..=1.0).contains(&fail_rate) {
                anyhow::bail!("--fail-rate must be from 0 to 1, not {fail_rate}");
            }
            let mesh = Mesh::connect().await?;
            let ctx = Arc::new(Ctx {
                client: Client::try_default().await?,
                cache: mesh.cache(),
                version,
                records,
                dry_run,
                attempts: Mutex::default(),
                started: AtomicU64::new(0),
                fail_rate,
                hot_loop,
                stall,
            });
            let generators = Controller::<ConfigMapGenerator>::new(&mesh)
                .owns::<ConfigMap>()
                .operator_version(ctx.version.clone())
                .bind(reconcile, opmesh_sdk::default_error_policy, ctx.clone());
            let mut controllers = vec![generators];
            if bundles {
                controllers.push(
                    Controller::<ConfigMapBundle>::new(&mesh)
                        .owns::<ConfigMap>()
                        .bind(reconcile_bundle, opmesh_sdk::default_error_policy, ctx),
                );
            }
            opmesh_sdk::run_all(controllers).await?;
            Ok(())
        }
    }
}
