//! The manager's admin API through `kubectl opmesh`, as users call it: with
//! their own ServiceAccount tokens and RBAC, against a real manager,
//! runtimes and example operator on the real apiserver.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use anyhow::Context as _;
use kube::{Api, api::DynamicObject};
use opmesh_manager::api::{Explanation, MeshList, Plan};
use opmesh_tests::{
    cluster,
    control_plane::free_port,
    eventually,
    mesh::{Manager, create_generator, mesh_resource},
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

fn plugin(
    w: &World,
    port: u16,
    token: &str,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let tls = MeshTls::shared(w.cp.dir());
    let out = Command::new(plugin_path(w)?)
        .args(args)
        .args(["-n", &w.ns])
        .arg(format!("--server=https://127.0.0.1:{port}"))
        .arg(format!("--certificate-authority={}", tls.ca_file.display()))
        .arg("--tls-server-name=localhost")
        .arg(format!("--token={token}"))
        .env("KUBECONFIG", w.cp.kubeconfig())
        .output()?;
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

    // Golden table, and JSON that parses.
    let table = a.ok(&admin, &["status", "mesh"])?;
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
    assert_eq!(table, expected);
    let list: MeshList = serde_json::from_str(&a.ok(&admin, &["status", "-o", "json"])?)?;
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].weights, "v1=50 v2=50");
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
