//! The manager's admin API through `kubectl opmesh`, as users call it: with
//! their own ServiceAccount tokens and RBAC, against a real manager,
//! runtimes and example operator on the real apiserver.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use kube::{Api, api::DynamicObject};
use opmesh_manager::api::{Explanation, MeshList, Plan};
use opmesh_tests::{
    cluster,
    control_plane::free_port,
    eventually,
    mesh::{Manager, apply_mesh, create_generator, mesh_resource},
    oracle::exact,
    tls::MeshTls,
    world::{TIMEOUT, World},
};
use serde_json::json;

/// One test's mesh with the admin API and health endpoint on loopback.
struct Admin {
    w: World,
    admin_port: u16,
    health_port: u16,
}

impl Admin {
    async fn new(prefix: &str) -> anyhow::Result<Self> {
        let (admin_port, health_port) = (free_port()?, free_port()?);
        let w = World::with_manager_env(
            prefix,
            &[
                ("OPMESH_ADMIN_LISTEN", &format!("127.0.0.1:{admin_port}")),
                ("OPMESH_HEALTH_LISTEN", &format!("127.0.0.1:{health_port}")),
            ],
        )
        .await?;
        Ok(Self {
            w,
            admin_port,
            health_port,
        })
    }

    /// A token of a new ServiceAccount that may `verbs` OperatorMeshes in
    /// the mesh's namespace.
    async fn user(&self, name: &str, verbs: &[&str]) -> anyhow::Result<String> {
        cluster::grant_namespace(
            &self.w.client,
            &self.w.ns,
            &format!("meshes-{name}"),
            &[("opmesh.io", "operatormeshes")],
            verbs,
            name,
        )
        .await?;
        cluster::service_account_token(&self.w.client, &self.w.ns, name).await
    }

    /// Runs `kubectl opmesh` as `token`; returns whether it succeeded, its
    /// standard output and its standard error.
    fn plugin(&self, token: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        plugin(&self.w, self.admin_port, token, args)
    }

    /// Like [`Admin::plugin`], failing unless it succeeds.
    fn ok(&self, token: &str, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out, err) = self.plugin(token, args)?;
        anyhow::ensure!(ok, "kubectl opmesh {args:?} failed: {err}");
        Ok(out)
    }

    fn health(&self, path: &str) -> anyhow::Result<(u16, String)> {
        get(self.health_port, path)
    }
}

fn plugin_path(w: &World) -> anyhow::Result<PathBuf> {
    let path = w
        .bins
        .manager
        .parent()
        .context("binary dir")?
        .join("kubectl-opmesh");
    anyhow::ensure!(
        path.exists(),
        "{} is missing; run `cargo build --workspace --bins --examples` first",
        path.display()
    );
    Ok(path)
}

/// `kubectl opmesh args` as `token`, against the admin API on `port`.
fn plugin_command(w: &World, port: u16, token: &str, args: &[&str]) -> anyhow::Result<Command> {
    let tls = MeshTls::shared(w.cp.dir());
    let mut command = Command::new(plugin_path(w)?);
    command
        .args(args)
        .args(["-n", &w.ns])
        .arg(format!("--server=https://127.0.0.1:{port}"))
        .arg(format!("--certificate-authority={}", tls.ca_file.display()))
        .arg("--tls-server-name=localhost")
        .arg(format!("--token={token}"))
        .env("KUBECONFIG", w.cp.kubeconfig());
    Ok(command)
}

fn plugin(
    w: &World,
    port: u16,
    token: &str,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let out = plugin_command(w, port, token, args)?.output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// A plain HTTP GET on loopback: (status, body).
fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the un-labelled series `name` in a metrics exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `count` namespaces of this test's mesh, with `apps` generators each.
async fn namespaces(w: &World, count: usize, apps: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..count {
        let ns = format!("{}-team-{i}", w.ns);
        cluster::create_named_namespace(&w.client, &ns, &[("opmesh.io/test", &w.tag)]).await?;
        for j in 0..apps {
            create_generator(&w.client, &ns, &format!("app-{j}"), json!({})).await?;
        }
        out.push(ns);
    }
    Ok(out)
}

#[tokio::test]
async fn callers_get_what_their_rbac_on_operatormeshes_allows() -> anyhow::Result<()> {
    let mut a = Admin::new("admin-rbac").await?;
    a.w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 100}, {"subset": "v2", "weight": 0}]}),
        &["v1", "v2"],
    )
    .await?;
    a.w.replica("v1-0", "v1").await?;
    a.w.replica("v2-0", "v2").await?;
    a.w.all_ready().await?;
    let spaces = namespaces(&a.w, 2, 2).await?;
    a.w.wait_handled(&spaces, 4).await?;

    // No token, or one the apiserver does not know: 401.
    for token in ["", "not-a-token"] {
        let (ok, _, err) = a.plugin(token, &["status", "mesh"])?;
        assert!(
            !ok && err.contains("401 Unauthorized"),
            "token {token:?}: {err}"
        );
    }
    let reader = a.user("reader", &["get", "list"]).await?;
    let operator = a.user("operator", &["get", "list", "patch"]).await?;
    let stranger = a.user("stranger", &["list"]).await?;

    // A reader reads, plans, and may change nothing.
    a.ok(&reader, &["status", "mesh"])?;
    a.ok(&reader, &["keys", "mesh"])?;
    a.ok(
        &reader,
        &["explain", "mesh", &format!("{}/app-0", spaces[0])],
    )?;
    a.ok(&reader, &["plan", "mesh", "--weights", "v1=50,v2=50"])?;
    for action in [
        vec!["weights", "mesh", "v1=50,v2=50"],
        vec!["pause", "mesh"],
        vec!["resume", "mesh"],
    ] {
        let (ok, _, err) = a.plugin(&reader, &action)?;
        assert!(
            !ok && err.contains("403 Forbidden") && err.contains("may not patch"),
            "{action:?}: {err}"
        );
    }
    // Without get, not even the mesh's status.
    let (ok, _, err) = a.plugin(&stranger, &["status", "mesh"])?;
    assert!(!ok && err.contains("403 Forbidden"), "{err}");

    // With patch, the weights change in the OperatorMesh's spec.
    let out = a.ok(&operator, &["weights", "mesh", "v1=50,v2=50"])?;
    assert!(out.contains("weights set to v1=50 v2=50"), "{out}");
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(a.w.client.clone(), &a.w.ns, &mesh_resource());
    let mesh = meshes.get("mesh").await?;
    assert_eq!(
        mesh.data["spec"]["routing"]["weights"],
        json!([{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}])
    );
    assert!(
        mesh.metadata.annotations.unwrap_or_default()["opmesh.io/last-admin-action"]
            .contains("system:serviceaccount:")
    );
    // A change the mesh would refuse is refused before it is written.
    let (ok, _, err) = a.plugin(&operator, &["weights", "mesh", "v1=50,v3=50"])?;
    assert!(!ok && err.contains("422") && err.contains("v3"), "{err}");
    // One written around the API is refused by the manager, which says so
    // in an Event.
    meshes
        .patch(
            "mesh",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"routing": {"pins": [
                {"subset": "v2", "namespaceRegex": "team-(["}
            ]}}})),
        )
        .await?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(a.w.client.clone(), &a.w.ns);
    let note = eventually("an InvalidSpec Event", TIMEOUT, || async {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidSpec"))
            .and_then(|e| e.note))
    })
    .await?;
    assert!(note.contains("namespaceRegex"), "{note}");
    Ok(())
}

#[tokio::test]
async fn explain_plan_and_metrics_agree_with_what_the_mesh_does() -> anyhow::Result<()> {
    let mut a = Admin::new("admin-plan").await?;
    a.w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 100}, {"subset": "v2", "weight": 0}]}),
        &["v1", "v2"],
    )
    .await?;
    a.w.replica("v1-0", "v1").await?;
    a.w.replica("v2-0", "v2").await?;
    a.w.all_ready().await?;
    let spaces = namespaces(&a.w, 10, 2).await?;
    let before = a.w.wait_handled(&spaces, 20).await?;
    let admin = a.user("admin", &["get", "list", "patch"]).await?;

    // Probes: this manager leads and routes.
    assert_eq!(a.health("/readyz")?.0, 200);
    assert_eq!(a.health("/healthz")?.0, 200);

    // explain agrees with an independent oracle of the exact split, for
    // every object.
    let want = exact(&spaces, &[("v1", 100), ("v2", 0)]);
    for key in before.keys() {
        let out = a.ok(&admin, &["explain", "mesh", key, "-o", "json"])?;
        let e: Explanation = serde_json::from_str(&out)?;
        let ns = key.split('/').next().unwrap_or_default();
        assert_eq!(e.rule, "Apportioned", "{key}: {}", e.detail);
        assert_eq!(e.subset.as_deref(), Some(want[ns]), "{key}");
        assert_eq!(e.keys.len(), 1, "{key}: {:?}", e.keys);
        assert_eq!(e.replica.as_deref(), Some(e.keys[0].replica.as_str()));
    }

    // The plan for 50/50 lists exactly the keys that then move.
    let out = a.ok(
        &admin,
        &["plan", "mesh", "--weights", "v1=50,v2=50", "-o", "json"],
    )?;
    let plan: Plan = serde_json::from_str(&out)?;
    let planned: BTreeSet<String> = plan
        .moves
        .iter()
        .map(|m| opmesh_proto::parse_key(&m.key).0.to_string())
        .collect();
    let after_want = exact(&spaces, &[("v1", 50), ("v2", 50)]);
    let handoffs_before = metric(&a.health("/metrics")?.1, "opmesh_manager_handoffs_total")
        .context("no handoffs counter")?;
    a.ok(&admin, &["weights", "mesh", "v1=50,v2=50"])?;
    let after = eventually(
        "every object reconciled where 50/50 sends it",
        TIMEOUT,
        || async {
            let handled = a.w.wait_handled(&spaces, 20).await?;
            let settled = handled.iter().all(|(k, s)| {
                let ns = k.split('/').next().unwrap_or_default();
                *s == after_want[ns]
            });
            Ok(settled.then_some(handled))
        },
    )
    .await?;
    let moved: BTreeSet<String> = after
        .iter()
        .filter(|(k, s)| before.get(*k) != Some(s))
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!moved.is_empty());
    assert_eq!(planned, moved, "the plan and the moves");
    let v2: u64 = plan
        .after
        .iter()
        .find(|s| s.subset == "v2")
        .map(|s| s.keys)
        .unwrap_or_default();
    assert_eq!(v2, moved.len() as u64);

    // Metrics after the known scenario: one handoff per moved key, one
    // session per subset, events routed.
    let text = eventually("the handoffs to be counted", TIMEOUT, || async {
        let text = a.health("/metrics")?.1;
        let done = metric(&text, "opmesh_manager_handoffs_total")
            .is_some_and(|h| h - handoffs_before == moved.len() as f64);
        Ok(done.then_some(text))
    })
    .await?;
    assert!(metric(&text, "opmesh_manager_routed_events_total").is_some_and(|n| n >= 20.0));
    assert_eq!(metric(&text, "opmesh_manager_leading"), Some(1.0));
    let mesh = format!("mesh=\"{}/mesh\"", a.w.ns);
    for subset in ["v1", "v2"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("opmesh_manager_sessions{")
                    && l.contains(&mesh)
                    && l.contains(&format!("subset=\"{subset}\""))
                    && l.ends_with(" 1")),
            "no session gauge for {subset}:\n{text}"
        );
    }
    assert!(text.contains("opmesh_manager_handoff_duration_seconds_count"));
    // Reconcile outcomes per subset, from the runtimes' reports (sent once
    // a second).
    let reconciles = |text: &str, subset: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("opmesh_manager_reconciles_total{")
                    && l.contains(&mesh)
                    && l.contains(&format!("subset=\"{subset}\""))
                    && l.contains("result=\"success\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let text = eventually(
        "the reconciles of both subsets to be reported",
        TIMEOUT,
        || async {
            let text = a.health("/metrics")?.1;
            let done =
                reconciles(&text, "v1") >= 20.0 && reconciles(&text, "v2") >= moved.len() as f64;
            Ok(done.then_some(text))
        },
    )
    .await?;
    assert!(text.contains("opmesh_manager_reconcile_duration_seconds_count{"));

    // explain shows a moved object's last reconciles, by the canary.
    let object = moved.iter().next().context("a moved object")?;
    let e = eventually(
        "the moved object's outcomes to be reported",
        TIMEOUT,
        || async {
            let e: Explanation =
                serde_json::from_str(&a.ok(&admin, &["explain", "mesh", object, "-o", "json"])?)?;
            Ok(e.outcomes.iter().any(|o| o.subset == "v2").then_some(e))
        },
    )
    .await?;
    let newest = &e.outcomes[0];
    assert_eq!(
        (
            newest.result.as_str(),
            newest.operator_version.as_str(),
            newest.subset.as_str()
        ),
        ("success", "v2", "v2")
    );
    assert!(newest.generation >= 1 && newest.duration_ms >= 0.0);
    assert!(newest.replica.ends_with("/v2-0"), "{}", newest.replica);
    assert!(
        e.outcomes
            .iter()
            .any(|o| o.subset == "v1" && o.operator_version == "v1")
    );

    // Events on the mesh tell the story.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(a.w.client.clone(), &a.w.ns);
    eventually(
        "Events for the weight change and the move",
        TIMEOUT,
        || async {
            let reasons: BTreeSet<String> = events
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("mesh"))
                .filter_map(|e| e.reason)
                .collect();
            let want = ["WeightsChanged", "Moving", "Moved"];
            Ok(want.iter().all(|w| reasons.contains(*w)).then_some(()))
        },
    )
    .await?;

    // Golden table, and JSON that parses.
    let v1_keys = 20 - moved.len();
    let expected = format!(
        "MESH   SUBSET   WEIGHT   OBSERVED   KEYS   REPLICAS   MOVING\n\
         mesh   v1       50.0%    {:<9}  {:<5}  1/1        0\n\
         mesh   v2       50.0%    {:<9}  {:<5}  1/1        0\n",
        format!("{:.1}%", v1_keys as f64 * 5.0),
        v1_keys,
        format!("{:.1}%", moved.len() as f64 * 5.0),
        moved.len(),
    );
    // The API reads the snapshot the coordinator publishes every 0.5 s.
    let table = eventually("the status to show the new weights", TIMEOUT, || async {
        let table = a.ok(&admin, &["status", "mesh"])?;
        Ok(table.contains("50.0%").then_some(table))
    })
    .await?;
    assert_eq!(table, expected);
    let list: MeshList = serde_json::from_str(&a.ok(&admin, &["status", "-o", "json"])?)?;
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].weights, "v1=50 v2=50");
    // Each session's load, from its heartbeats: idle, with the example's
    // four reconciles at once.
    // (Heartbeats come a third of a lease apart, so the last one may still
    // show the settle's work.)
    eventually("every session to report itself idle", TIMEOUT, || async {
        let list: MeshList = serde_json::from_str(&a.ok(&admin, &["status", "-o", "json"])?)?;
        let replicas: Vec<_> = list.items[0]
            .subsets
            .iter()
            .flat_map(|s| &s.replicas)
            .collect();
        Ok(replicas
            .iter()
            .all(|r| (r.capacity, r.in_flight, r.queue_depth) == (4, 0, 0))
            .then_some(()))
    })
    .await?;
    let keys: serde_json::Value =
        serde_json::from_str(&a.ok(&admin, &["keys", "mesh", "--subset", "v2", "-o", "json"])?)?;
    assert_eq!(
        keys["items"].as_array().map(Vec::len),
        Some(moved.len()),
        "{keys}"
    );
    Ok(())
}

#[tokio::test]
async fn a_standby_is_not_ready_and_names_the_leader() -> anyhow::Result<()> {
    let a = Admin::new("admin-standby").await?;
    let token = a.user("viewer", &["get", "list"]).await?;
    // Two more managers of their own Lease: one leads, one stands by.
    let mut managers = Vec::new();
    for _ in 0..2 {
        let (port, admin, health) = (free_port()?, free_port()?, free_port()?);
        let m = Manager::start_with(
            a.w.cp,
            &a.w.bins,
            a.w.dir.path(),
            &a.w.ns,
            port,
            Some("admin-lease"),
            &[
                ("OPMESH_ADMIN_LISTEN", &format!("127.0.0.1:{admin}")),
                ("OPMESH_HEALTH_LISTEN", &format!("127.0.0.1:{health}")),
            ],
        )
        .await?;
        managers.push((m, port, admin, health));
    }
    let (leader, standby) = eventually("one manager to lead", TIMEOUT, || async {
        let ready: Vec<bool> = managers
            .iter()
            .map(|(_, _, _, h)| get(*h, "/readyz").map(|(s, _)| s == 200).unwrap_or(false))
            .collect();
        Ok(match ready.as_slice() {
            [true, false] => Some((0, 1)),
            [false, true] => Some((1, 0)),
            _ => None,
        })
    })
    .await?;
    let (_, leader_port, _, _) = managers[leader];
    let (_, _, standby_admin, standby_health) = managers[standby];
    let (status, body) = get(standby_health, "/readyz")?;
    assert_eq!(status, 503);
    assert!(body.contains("standby"), "{body}");
    // A standby is still healthy, so the PodDisruptionBudget counts it.
    assert_eq!(get(standby_health, "/healthz")?.0, 200);
    assert_eq!(
        metric(
            &get(standby_health, "/metrics")?.1,
            "opmesh_manager_leading"
        ),
        Some(0.0)
    );

    let (ok, _, err) = plugin(&a.w, standby_admin, &token, &["status"])?;
    assert!(
        !ok && err.contains("503") && err.contains(&format!("manager-{leader_port}")),
        "{err}"
    );
    Ok(())
}

/// Who handles each object: `subset/pod`, from its `status.handledBy`.
async fn handlers(w: &World, spaces: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(opmesh_tests::mesh::handled_by(&w.client, spaces)
        .await?
        .into_iter()
        .map(|(k, v)| {
            let by: Vec<String> = v
                .unwrap_or_default()
                .split('/')
                .take(2)
                .map(str::to_string)
                .collect();
            (k, by.join("/"))
        })
        .collect())
}

#[tokio::test]
async fn pinning_one_object_moves_only_it_and_unpinning_returns_it() -> anyhow::Result<()> {
    let mut a = Admin::new("admin-pin").await?;
    a.w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}]}),
        &["v1", "v2"],
    )
    .await?;
    a.w.replica("v1-0", "v1").await?;
    a.w.replica("v2-0", "v2").await?;
    a.w.all_ready().await?;
    let spaces = namespaces(&a.w, 6, 2).await?;
    let before = a.w.wait_handled(&spaces, 12).await?;
    let admin = a.user("admin", &["get", "list", "patch"]).await?;
    let (object, from) = before
        .iter()
        .find(|(_, s)| *s == "v1")
        .map(|(k, s)| (k.clone(), s.clone()))
        .context("no object on v1")?;
    let handoffs = || async {
        anyhow::Ok(
            metric(&a.health("/metrics")?.1, "opmesh_manager_handoffs_total").unwrap_or_default(),
        )
    };
    let start = handoffs().await?;

    let out = a.ok(&admin, &["pin", "mesh", &object, "v2"])?;
    assert!(out.contains(&format!("pinned {object} to v2")), "{out}");
    let (ns, name) = object.split_once('/').context("key")?;
    eventually(
        "the pinned object to be reconciled by v2",
        TIMEOUT,
        || async {
            let by = a.w.change_and_wait(ns, name).await?;
            Ok(by.starts_with("v2/").then_some(()))
        },
    )
    .await?;
    // The API reads the snapshot the coordinator publishes every 0.5 s.
    let e = eventually("explain to name the object pin", TIMEOUT, || async {
        let e: Explanation =
            serde_json::from_str(&a.ok(&admin, &["explain", "mesh", &object, "-o", "json"])?)?;
        Ok((e.rule == "ObjectPinned").then_some(e))
    })
    .await?;
    assert_eq!(e.subset.as_deref(), Some("v2"));
    // Only that key moved: one handoff, and every other object is where it
    // was, as a fresh reconcile of each shows.
    let others: Vec<&String> = before.keys().filter(|k| **k != object).collect();
    for key in &others {
        let (ns, name) = key.split_once('/').context("key")?;
        let by = a.w.change_and_wait(ns, name).await?;
        assert!(
            by.starts_with(&format!("{}/", before[*key])),
            "{key} moved to {by}"
        );
    }
    assert_eq!(handoffs().await? - start, 1.0);

    // Unpinning returns it, again with one handoff.
    a.ok(&admin, &["unpin", "mesh", &object])?;
    eventually("the object to return", TIMEOUT, || async {
        let by = a.w.change_and_wait(ns, name).await?;
        Ok(by.starts_with(&format!("{from}/")).then_some(()))
    })
    .await?;
    assert_eq!(handoffs().await? - start, 2.0);
    let (ok, _, err) = a.plugin(&admin, &["unpin", "mesh", &object])?;
    assert!(!ok && err.contains("is not pinned"), "{err}");
    let (ok, _, err) = a.plugin(&admin, &["pin", "mesh", &object, "v9"])?;
    assert!(!ok && err.contains("422") && err.contains("v9"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_drained_replica_hands_every_key_over_and_leaves_nothing_to_wait_for()
-> anyhow::Result<()> {
    let mut a = Admin::new("admin-drain").await?;
    a.w.apply_mesh(
        json!({"granularity": "Object", "weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    a.w.replica("v1-0", "v1").await?;
    a.w.replica("v1-1", "v1").await?;
    a.w.all_ready().await?;
    let spaces = namespaces(&a.w, 3, 6).await?;
    a.w.wait_handled(&spaces, 18).await?;
    let before = handlers(&a.w, &spaces).await?;
    let drained = a.w.replicas[0].pod.clone();
    assert!(
        before
            .values()
            .any(|by| by.ends_with(&format!("/{drained}"))),
        "{drained} handles nothing to drain: {before:?}"
    );
    let admin = a.user("admin", &["get", "list", "patch"]).await?;
    // Draining needs patch on the drain subresource itself.
    let patcher = a.user("patcher", &["get", "patch"]).await?;
    let (ok, _, err) = a.plugin(&patcher, &["drain", "mesh", &drained])?;
    assert!(
        !ok && err.contains("403") && err.contains("operatormeshes/drain"),
        "{err}"
    );
    cluster::grant_namespace(
        &a.w.client,
        &a.w.ns,
        "meshes-drain",
        &[("opmesh.io", "operatormeshes/drain")],
        &["patch"],
        "admin",
    )
    .await?;
    // The last replica of a subset cannot be drained while keys go there.
    let out = a.ok(&admin, &["drain", "mesh", &drained, "--wait"])?;
    assert!(out.contains("holds no keys"), "{out}");
    let (ok, _, err) = a.plugin(&admin, &["drain", "mesh", &a.w.replicas[1].pod])?;
    assert!(
        !ok && err.contains("409") && err.contains("last replica"),
        "{err}"
    );

    // Every key is now on the other replica, and the recorded history has
    // no two reconciles of a key at once.
    let status: MeshList = serde_json::from_str(&a.ok(&admin, &["status", "mesh", "-o", "json"])?)?;
    let replica = status.items[0].subsets[0]
        .replicas
        .iter()
        .find(|r| r.pod.ends_with(&format!("/{drained}")))
        .context("the drained replica is still connected")?;
    assert!(replica.draining);
    assert_eq!(replica.owned_keys, 0);
    for ns in &spaces {
        a.w.settle_and_check(ns).await?;
    }
    let after = handlers(&a.w, &spaces).await?;
    assert!(
        after
            .values()
            .all(|by| !by.ends_with(&format!("/{drained}"))),
        "{after:?}"
    );

    // Its pod can go now: nothing waits for its lease.
    let health_port = a.health_port;
    let expiries = move || {
        anyhow::Ok(
            metric(
                &get(health_port, "/metrics")?.1,
                "opmesh_manager_lease_expiries_total",
            )
            .unwrap_or_default(),
        )
    };
    let before_kill = expiries()?;
    let gone = a.w.replicas.remove(0);
    gone.operator.stop(Duration::from_secs(5));
    gone.sidecar.stop(Duration::from_secs(5));
    eventually("the drained replica's session to end", TIMEOUT, || async {
        let text = a.health("/metrics")?.1;
        let sessions = text
            .lines()
            .find(|l| l.starts_with("opmesh_manager_sessions{") && l.contains("subset=\"v1\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        Ok((sessions == Some(1.0)).then_some(()))
    })
    .await?;
    for ns in &spaces {
        a.w.settle_and_check(ns).await?;
    }
    assert_eq!(expiries()?, before_kill, "a lease ran out with keys in it");
    Ok(())
}

#[tokio::test]
async fn analyze_tells_a_failing_canary_from_stable_and_waits_for_enough_reconciles()
-> anyhow::Result<()> {
    let mut a = Admin::new("admin-analyze").await?;
    a.w.apply_mesh(
        json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}]}),
        &["v1", "v2"],
    )
    .await?;
    a.w.replica("v1-0", "v1").await?;
    // A v2 that fails every reconcile.
    a.w.replica_with_env("v2-0", "v2", &[("OPMESH_EXAMPLE_FAIL_RATE", "1")])
        .await?;
    a.w.all_ready().await?;
    let spaces = namespaces(&a.w, 6, 3).await?;
    let viewer = a.user("viewer", &["get", "list"]).await?;
    let analyze = |min: &str| {
        let out = a.ok(
            &viewer,
            &[
                "analyze",
                "mesh",
                "--canary",
                "v2",
                "--stable",
                "v1",
                "--min-samples",
                min,
                "-o",
                "json",
            ],
        )?;
        anyhow::Ok(serde_json::from_str::<opmesh_manager::api::Analysis>(&out)?)
    };
    // v1's objects are reconciled; v2's fail and are retried with backoff.
    let v1 = eventually("v1's objects to be handled", TIMEOUT, || async {
        let all = handlers(&a.w, &spaces).await?;
        Ok(all.values().any(|h| h.starts_with("v1/")).then_some(()))
    });
    v1.await?;
    let result = eventually("an analysis with 9 reconciles each", TIMEOUT, || async {
        let r = analyze("9")?;
        Ok((r.verdict != "Wait").then_some(r))
    })
    .await?;
    assert_eq!(result.verdict, "Fail", "{result:?}");
    assert!(
        result.reasons[0].starts_with("error rate 100.00%"),
        "{:?}",
        result.reasons
    );
    assert_eq!(result.canary.errors, result.canary.reconciles);
    assert_eq!(result.stable.errors, 0);
    // Nothing is decided on too few reconciles: it waits, and says so.
    let waiting = analyze("100000")?;
    assert_eq!(waiting.verdict, "Wait");
    assert!(
        waiting.reasons[0].contains("waiting for 100000 reconciles"),
        "{:?}",
        waiting.reasons
    );
    // The table, as a user sees it.
    let table = a.ok(
        &viewer,
        &[
            "analyze",
            "mesh",
            "--canary",
            "v2",
            "--stable",
            "v1",
            "--min-samples",
            "9",
        ],
    )?;
    assert!(table.starts_with("SUBSET   RECONCILES   ERRORS"), "{table}");
    assert!(
        table.contains("\nFail (last 300s, at least 9 reconciles each)\n"),
        "{table}"
    );
    Ok(())
}

/// A running `kubectl opmesh rollout status --watch`: what it has printed
/// so far, and the process.
struct Watch {
    child: std::process::Child,
    printed: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Watch {
    fn start(a: &Admin, token: &str, mesh: &str) -> anyhow::Result<Self> {
        let mut child = plugin_command(
            &a.w,
            a.admin_port,
            token,
            &["rollout", "status", mesh, "--watch"],
        )?
        .stdout(std::process::Stdio::piped())
        .spawn()?;
        let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = child.stdout.take().context("stdout")?;
        let sink = printed.clone();
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Self { child, printed })
    }

    fn printed(&self) -> String {
        self.printed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn rollout_commands_promote_abort_and_retry_and_watch_follows_them() -> anyhow::Result<()> {
    let mut a = Admin::new("admin-rollout").await?;
    let routing = json!({"granularity": "Namespace", "weights": [{"subset": "v1", "weight": 100}]});
    a.w.apply_mesh(routing.clone(), &["v1", "v2"]).await?;
    a.w.replica("v1-0", "v1").await?;
    a.w.replica("v2-0", "v2").await?;
    a.w.all_ready().await?;
    let spaces = namespaces(&a.w, 10, 1).await?;
    a.w.wait_handled(&spaces, 10).await?;
    let reader = a.user("reader", &["get", "list"]).await?;
    let releaser = a.user("releaser", &["get", "list", "patch"]).await?;
    let on = |subset: &'static str, count: usize| {
        let (w, spaces) = (&a.w, &spaces);
        async move {
            eventually(&format!("{count} objects on {subset}"), TIMEOUT, || async {
                let handled = opmesh_tests::mesh::handled_by(&w.client, spaces).await?;
                let prefix = format!("{subset}/");
                let n = handled
                    .values()
                    .filter(|by| by.as_deref().is_some_and(|b| b.starts_with(&prefix)))
                    .count();
                Ok((n == count).then_some(()))
            })
            .await
        }
    };
    let declare = |revision: &str| {
        let mut spec = a.w.mesh_spec(routing.clone(), &["v1", "v2"]);
        spec["rollout"] = json!({
            "stable": "v1", "canary": "v2", "revision": revision,
            "steps": [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}],
        });
        apply_mesh(&a.w.client, &a.w.ns, "mesh", spec)
    };
    let phase = |token: &str| -> anyhow::Result<String> {
        let out = a.ok(token, &["rollout", "status", "mesh"])?;
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix("Phase:"))
            .unwrap_or_default()
            .trim()
            .to_string())
    };

    // Before anything is declared, status says so, and there is nothing
    // to promote.
    let out = a.ok(&reader, &["rollout", "status", "mesh"])?;
    assert!(out.contains("no rollout is declared"), "{out}");
    let (ok, _, err) = a.plugin(&releaser, &["rollout", "promote", "mesh"])?;
    assert!(!ok && err.contains("declares no rollout"), "{err}");

    declare("v2-build-1").await?;
    let watch = Watch::start(&a, &reader, "mesh")?;
    eventually("the rollout to pause", TIMEOUT, || async {
        Ok((phase(&reader)? == "Paused").then_some(()))
    })
    .await?;
    on("v2", 5).await?;
    // A reader may not promote; promoting twice would not skip a step.
    let (ok, _, err) = a.plugin(&reader, &["rollout", "promote", "mesh"])?;
    assert!(!ok && err.contains("403 Forbidden"), "{err}");
    let out = a.ok(&releaser, &["rollout", "promote", "mesh"])?;
    assert!(out.contains("rollout promoted"), "{out}");
    on("v2", 10).await?;
    // The watch saw the pause and the promotion, and ended by itself.
    let watch = std::cell::RefCell::new(watch);
    let exit = eventually("the watch to end", TIMEOUT, || async {
        Ok(watch.borrow_mut().child.try_wait()?)
    })
    .await?;
    let watch = watch.into_inner();
    assert!(exit.success(), "{exit}");
    let printed = eventually("the watch's last screen", TIMEOUT, || async {
        let p = watch.printed();
        Ok(p.contains("Phase:    Promoted").then_some(p))
    })
    .await?;
    assert!(printed.contains("Phase:    Paused"), "{printed}");
    assert!(printed.contains("paused until promoted"), "{printed}");
    drop(watch);

    // A new revision starts from stable again: the earlier promote does
    // not carry over, so it pauses at 50%.
    declare("v2-build-2").await?;
    eventually("the new revision to pause", TIMEOUT, || async {
        Ok((phase(&reader)? == "Paused").then_some(()))
    })
    .await?;
    on("v2", 5).await?;
    // Abort returns every key to stable, and it stays aborted.
    let out = a.ok(&releaser, &["rollout", "abort", "mesh"])?;
    assert!(out.contains("rollout aborted"), "{out}");
    on("v1", 10).await?;
    let out = a.ok(&reader, &["rollout", "status", "mesh"])?;
    assert!(out.contains("Phase:    RolledBack"), "{out}");
    assert!(out.contains("kubectl opmesh rollout retry"), "{out}");
    // Retry starts the same revision over, and the abort does not stop it.
    let out = a.ok(&releaser, &["rollout", "retry", "mesh"])?;
    assert!(out.contains("rollout retried"), "{out}");
    eventually("the retried rollout to pause", TIMEOUT, || async {
        Ok((phase(&reader)? == "Paused").then_some(()))
    })
    .await?;
    on("v2", 5).await?;
    a.ok(&releaser, &["rollout", "promote", "mesh"])?;
    eventually("the retried rollout to be promoted", TIMEOUT, || async {
        Ok((phase(&reader)? == "Promoted").then_some(()))
    })
    .await?;
    on("v2", 10).await?;
    Ok(())
}
