//! `make demo`: a canary of the example operator on a local control plane.
//!
//! Starts etcd, kube-apiserver and the manager, then v1 with two replicas and
//! v2 with one (each a sidecar plus an operator process, with a Pod object
//! carrying its labels). Applies a mesh with one pin and an 80/20 split,
//! creates objects in 50 namespaces, and prints who handled what, next to
//! what the policy says. Ctrl-C stops everything.
//!
//! `--exit` (or `OPMESH_DEMO_EXIT=1`) exits after the table instead of
//! waiting for Ctrl-C.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::bail;
use kube::Api;
use opmesh_tests::{
    ControlPlane, cluster,
    control_plane::Options,
    eventually,
    mesh::{Binaries, Manager, Replica, ReplicaOptions, apply_mesh, create_generator, handled_by},
    oracle::{oracle, weight_hash},
};
use serde_json::json;

const TEAMS: [&str; 50] = [
    "payments",
    "checkout",
    "search",
    "ads",
    "billing",
    "catalog",
    "identity",
    "inventory",
    "shipping",
    "reviews",
    "pricing",
    "fraud",
    "loyalty",
    "mobile",
    "web",
    "data",
    "ml",
    "analytics",
    "support",
    "growth",
    "platform",
    "infra",
    "security",
    "compliance",
    "finance",
    "hr",
    "legal",
    "marketing",
    "sales",
    "partners",
    "media",
    "content",
    "video",
    "audio",
    "maps",
    "weather",
    "news",
    "sports",
    "games",
    "music",
    "chat",
    "email",
    "calendar",
    "docs",
    "photos",
    "storage",
    "backup",
    "metrics",
    "logging",
    "tracing",
];
/// Namespaces labelled `canary=true`, which the pin sends to v2.
const CANARY: [&str; 3] = ["checkout", "search", "mobile"];
const OBJECTS: [&str; 2] = ["web", "worker"];
const WEIGHTS: [(&str, u64); 2] = [("v1", 80), ("v2", 20)];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let exit = std::env::args().any(|a| a == "--exit")
        || std::env::var("OPMESH_DEMO_EXIT").is_ok_and(|v| v == "1");
    let started = Instant::now();
    let bins = Binaries::locate()?;
    println!("starting etcd and kube-apiserver...");
    let cp = ControlPlane::start(Options::default()).await?;
    bins.install_example_crd(&cp).await?;
    let client = cp.client().await?;
    let dir = tempfile::Builder::new().prefix("opmesh-demo-").tempdir()?;

    let ns = "opmesh-demo";
    cluster::create_named_namespace(&client, ns, &[]).await?;
    println!("starting the manager...");
    let manager = Manager::start(&cp, &bins, dir.path(), ns).await?;
    apply_mesh(
        &client,
        ns,
        "configmap-generator",
        json!({
            "selector": {"matchLabels": {"app": "configmap-generator"}},
            "controllers": opmesh_tests::mesh::example_controllers(),
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
            "routing": {
                "granularity": "Object",
                "pins": [{"subset": "v2", "namespaceSelector": {"matchLabels": {"canary": "true"}}}],
                "weights": WEIGHTS.iter().map(|(s, w)| json!({"subset": s, "weight": w})).collect::<Vec<_>>(),
                "exclude": [ns],
            },
        }),
    )
    .await?;

    println!("starting v1 (2 replicas) and v2 (1 replica)...");
    let mut replicas = Vec::new();
    for (pod, version) in [
        ("operator-v1-0", "v1"),
        ("operator-v1-1", "v1"),
        ("operator-v2-0", "v2"),
    ] {
        replicas.push(
            Replica::start(
                &client,
                &ReplicaOptions {
                    cp: &cp,
                    bins: &bins,
                    dir: dir.path(),
                    manager: manager.addr(),
                    mesh: &format!("{ns}/configmap-generator"),
                    namespace: ns,
                    pod,
                    labels: &[("app", "configmap-generator"), ("version", version)],
                    version,
                    extra_env: &[],
                    operator_env: &[],
                },
            )
            .await?,
        );
    }
    eventually(
        "every sidecar to be ready",
        Duration::from_secs(60),
        || async {
            for r in &replicas {
                r.check_running()?;
            }
            Ok(replicas.iter().all(Replica::ready).then_some(()))
        },
    )
    .await?;

    println!(
        "creating {} objects in {} namespaces...",
        TEAMS.len() * OBJECTS.len(),
        TEAMS.len()
    );
    let mut namespaces = Vec::new();
    for team in TEAMS {
        let name = format!("team-{team}");
        let canary = if CANARY.contains(&team) {
            "true"
        } else {
            "false"
        };
        cluster::create_named_namespace(&client, &name, &[("canary", canary)]).await?;
        for obj in OBJECTS {
            create_generator(&client, &name, obj, json!({"data": {"team": team}})).await?;
        }
        namespaces.push(name);
    }
    let expected = TEAMS.len() * OBJECTS.len();
    let handled = eventually(
        "every object to be handled",
        Duration::from_secs(120),
        || async {
            let all = handled_by(&client, &namespaces).await?;
            let done = all.len() == expected && all.values().all(Option::is_some);
            Ok(done.then_some(all))
        },
    )
    .await?;

    let ok = print_table(&handled, &replicas);
    print_mesh_status(&client, ns).await;
    println!("\nready in {:.1?}.", started.elapsed());
    println!("kubeconfig: {}", cp.kubeconfig().display());
    println!(
        "  kubectl --kubeconfig {} -n {ns} get operatormeshes",
        cp.kubeconfig().display()
    );
    println!(
        "  kubectl --kubeconfig {} get configmapgenerators -A",
        cp.kubeconfig().display()
    );
    if !ok {
        bail!("some objects were handled by a subset the policy does not name");
    }
    if !exit {
        println!("\nPress Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    println!("stopping...");
    for r in &replicas {
        r.operator.stop(Duration::from_secs(10));
        r.sidecar.stop(Duration::from_secs(10));
    }
    manager.process().stop(Duration::from_secs(10));
    drop(cp);
    println!("stopped.");
    Ok(())
}

/// What `kubectl get operatormeshes` shows, read from the mesh's status.
async fn print_mesh_status(client: &kube::Client, ns: &str) {
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &opmesh_tests::mesh::mesh_resource());
    let status = eventually(
        "the mesh status to count every key",
        Duration::from_secs(30),
        || async {
            let m = api.get("configmap-generator").await?;
            let st = m.data["status"].clone();
            let keys: u64 = st["subsets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["ownedKeys"].as_u64())
                .sum();
            Ok((keys as usize == TEAMS.len() * OBJECTS.len()).then_some(st))
        },
    )
    .await;
    match status {
        Ok(st) => {
            let ready = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["status"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            println!(
                "
OperatorMesh {ns}/configmap-generator: subsets {} | weights {} | observed {} | ready {ready}",
                st["summary"].as_str().unwrap_or_default(),
                st["weights"].as_str().unwrap_or_default(),
                st["observed"].as_str().unwrap_or_default()
            );
            for s in st["subsets"].as_array().into_iter().flatten() {
                println!(
                    "  {}: {} replicas, {} ready, {} keys owned, {} of keys routed here ({} of the weights)",
                    s["name"].as_str().unwrap_or_default(),
                    s["replicas"],
                    s["readyReplicas"],
                    s["ownedKeys"],
                    s["observedShare"].as_str().unwrap_or_default(),
                    s["configuredShare"].as_str().unwrap_or_default()
                );
            }
        }
        Err(e) => println!(
            "
(mesh status not complete yet: {e})"
        ),
    }
}

/// What the policy says: pinned namespaces go to v2, the rest by the
/// published weight hash over `namespace/name` (`docs/routing.md`).
fn expected_subset(key: &str) -> &'static str {
    let ns = key.split('/').next().unwrap_or_default();
    if CANARY.iter().any(|c| format!("team-{c}") == ns) {
        return "v2";
    }
    oracle(weight_hash(key), &WEIGHTS)
}

fn print_table(handled: &BTreeMap<String, Option<String>>, replicas: &[Replica]) -> bool {
    #[derive(Default)]
    struct Row {
        namespaces: BTreeSet<String>,
        objects: usize,
        unpinned: usize,
        pods: BTreeSet<String>,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut unpinned_total = 0usize;
    for (key, by) in handled {
        let by = by.clone().unwrap_or_default();
        let (subset, pod) = by.split_once('/').unwrap_or((&by, ""));
        let ns = key.split('/').next().unwrap_or_default().to_string();
        let pinned = CANARY.iter().any(|c| format!("team-{c}") == ns);
        let row = rows.entry(subset.to_string()).or_default();
        row.namespaces.insert(ns);
        row.objects += 1;
        row.pods.insert(pod.to_string());
        if !pinned {
            row.unpinned += 1;
            unpinned_total += 1;
        }
        if subset != expected_subset(key) {
            mismatches.push(format!(
                "{key}: handled by {subset}, policy says {}",
                expected_subset(key)
            ));
        }
    }
    println!(
        "\npolicy: namespaces labelled canary=true -> v2 (pin); everything else split v1=80 v2=20\n"
    );
    println!(
        "{:<7} {:>8} {:>11} {:>8} {:>19} {:>18}",
        "subset", "replicas", "namespaces", "objects", "configured share", "observed share"
    );
    for (subset, configured) in WEIGHTS {
        let row = rows.remove(subset).unwrap_or_default();
        let replicas_n = replicas.iter().filter(|r| r.version == subset).count();
        let observed = 100.0 * row.unpinned as f64 / unpinned_total.max(1) as f64;
        println!(
            "{subset:<7} {replicas_n:>8} {:>11} {:>8} {:>18}% {:>17.1}%",
            row.namespaces.len(),
            row.objects,
            configured,
            observed
        );
        println!(
            "        handled by: {}",
            row.pods.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    println!(
        "\n(shares count the {unpinned_total} objects no pin matches; the {} pinned ones all go to v2)",
        handled.len() - unpinned_total
    );
    if mismatches.is_empty() {
        println!(
            "check: all {} objects were handled by the subset the policy names: OK",
            handled.len()
        );
        true
    } else {
        println!(
            "check: {} objects were handled by the wrong subset:",
            mismatches.len()
        );
        for m in &mismatches {
            println!("  {m}");
        }
        false
    }
}
