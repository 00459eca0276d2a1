//! One end-to-end test's world: its namespace and manager, scoped to the
//! test's own namespaces, on the shared control plane.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    ControlPlane, cluster,
    control_plane::free_port,
    eventually,
    mesh::{
        Binaries, Manager, Record, Replica, ReplicaOptions, apply_mesh, generator_resource,
        handled_by,
    },
};
use kube::Client;
use serde_json::json;
use tokio::sync::OnceCell;

/// Generous: the suite runs on 2 cores with many processes.
pub const TIMEOUT: Duration = Duration::from_secs(90);

static CRD: OnceCell<()> = OnceCell::const_new();

/// One test's world: its namespace, manager and replicas.
pub struct World {
    /// The shared control plane.
    pub cp: &'static ControlPlane,
    /// An admin client.
    pub client: Client,
    /// The binaries under test.
    pub bins: Binaries,
    /// Sockets, records and logs.
    pub dir: tempfile::TempDir,
    /// The mesh's namespace; pods live here too.
    pub ns: String,
    /// The label value that puts a namespace into this test's mesh.
    pub tag: String,
    /// This test's manager.
    pub manager: Manager,
    /// The replicas started so far.
    pub replicas: Vec<Replica>,
}

impl World {
    /// Sets up a namespace and a manager for one test.
    pub async fn new(prefix: &str) -> anyhow::Result<Self> {
        Self::with_manager_env(prefix, &[]).await
    }

    /// [`World::new`] with `manager_env` for the manager (for example a
    /// TLS certificate of the test's own).
    pub async fn with_manager_env(
        prefix: &str,
        manager_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let cp = ControlPlane::shared().await?;
        let bins = Binaries::locate()?;
        CRD.get_or_try_init(|| bins.install_example_crd(cp)).await?;
        let client = cp.client().await?;
        let ns = cluster::create_namespace(&client, prefix, &[]).await?;
        let dir = tempfile::Builder::new().prefix("opmesh-e2e-").tempdir()?;
        let manager =
            Manager::start_with(cp, &bins, dir.path(), &ns, free_port()?, None, manager_env)
                .await?;
        Ok(Self {
            cp,
            client,
            bins,
            dir,
            tag: ns.clone(),
            ns,
            manager,
            replicas: Vec::new(),
        })
    }

    /// A namespace for objects, inside this test's mesh.
    pub async fn object_namespace(
        &self,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let mut all = vec![("opmesh.io/test", self.tag.as_str())];
        all.extend_from_slice(labels);
        cluster::create_namespace(&self.client, prefix, &all).await
    }

    /// A mesh named `mesh` with subsets selected by `version` label.
    pub async fn apply_mesh(
        &self,
        routing: serde_json::Value,
        subsets: &[&str],
    ) -> anyhow::Result<()> {
        apply_mesh(
            &self.client,
            &self.ns,
            "mesh",
            self.mesh_spec(routing, subsets),
        )
        .await
    }

    /// The spec [`World::apply_mesh`] applies.
    pub fn mesh_spec(&self, routing: serde_json::Value, subsets: &[&str]) -> serde_json::Value {
        json!({
            "selector": {"matchLabels": {"app": "cmg"}},
            "controllers": crate::mesh::example_controllers(),
            "namespaceSelector": {"matchLabels": {"opmesh.io/test": self.tag}},
            "subsets": subsets.iter().map(|s| json!({"name": s, "labels": {"version": s}})).collect::<Vec<_>>(),
            "routing": routing,
        })
    }

    /// Starts a replica of subset `version`.
    pub async fn replica(&mut self, pod: &str, version: &str) -> anyhow::Result<()> {
        let manager = self.manager.addr().to_string();
        let r = self.replica_via(pod, version, &manager).await?;
        self.replicas.push(r);
        Ok(())
    }

    /// Creates the Pod of a replica of subset `version` and starts its
    /// processes, dialing the manager at `managers` (comma-separated); the
    /// caller decides when to add it to [`World::replicas`].
    pub async fn replica_via(
        &self,
        pod: &str,
        version: &str,
        managers: &str,
    ) -> anyhow::Result<Replica> {
        let mesh = format!("{}/mesh", self.ns);
        let labels = [("app", "cmg"), ("version", version)];
        Replica::start(
            &self.client,
            &ReplicaOptions {
                manager: managers,
                mesh: &mesh,
                pod,
                labels: &labels,
                ..self.replica_options(version)
            },
        )
        .await
    }

    /// Options for a replica of subset `version` in this world: its
    /// manager and namespace, but no Pod name, mesh or Pod labels yet: set
    /// them with struct update syntax before creating a Pod.
    pub fn replica_options<'a>(&'a self, version: &'a str) -> ReplicaOptions<'a> {
        ReplicaOptions {
            cp: self.cp,
            bins: &self.bins,
            dir: self.dir.path(),
            manager: self.manager.addr(),
            mesh: "",
            namespace: &self.ns,
            pod: "",
            labels: &[],
            version,
            extra_env: &[],
            operator_env: &[],
        }
    }

    /// Waits until every replica's sidecar is ready.
    pub async fn all_ready(&self) -> anyhow::Result<()> {
        eventually("every sidecar to be ready", TIMEOUT, || async {
            for r in &self.replicas {
                r.check_running()?;
            }
            self.manager.process().check_running()?;
            Ok(self.replicas.iter().all(|r| r.ready()).then_some(()))
        })
        .await
    }

    /// Waits until every object in `namespaces` has a `handledBy`, and
    /// returns `key -> subset`.
    pub async fn wait_handled(
        &self,
        namespaces: &[String],
        expected: usize,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        eventually(
            &format!("{expected} objects to be handled"),
            TIMEOUT,
            || async {
                for r in &self.replicas {
                    r.check_running()?;
                }
                let all = handled_by(&self.client, namespaces).await?;
                if all.len() < expected || all.values().any(Option::is_none) {
                    return Ok(None);
                }
                Ok(Some(
                    all.into_iter()
                        .map(|(k, v)| {
                            (
                                k,
                                v.unwrap_or_default()
                                    .split('/')
                                    .next()
                                    .unwrap_or_default()
                                    .to_string(),
                            )
                        })
                        .collect(),
                ))
            },
        )
        .await
    }

    /// The mesh's condition of type `ty`: its status, reason and message.
    pub async fn condition(&self, ty: &str) -> anyhow::Result<Option<(String, String, String)>> {
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
            self.client.clone(),
            &self.ns,
            &crate::mesh::mesh_resource(),
        );
        let mesh = api.get("mesh").await?;
        let cond = mesh.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == ty)
            .map(|c| {
                let s = |f: &str| c[f].as_str().unwrap_or_default().to_string();
                (s("status"), s("reason"), s("message"))
            });
        Ok(cond)
    }

    /// Starts a replica of subset `version` with extra environment for
    /// both of its processes.
    pub async fn replica_with_env(
        &mut self,
        pod: &str,
        version: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mesh = format!("{}/mesh", self.ns);
        let labels = [("app", "cmg"), ("version", version)];
        let manager = self.manager.addr().to_string();
        let r = Replica::start(
            &self.client,
            &ReplicaOptions {
                manager: &manager,
                mesh: &mesh,
                pod,
                labels: &labels,
                extra_env: env,
                ..self.replica_options(version)
            },
        )
        .await?;
        self.replicas.push(r);
        Ok(())
    }

    /// Waits until the mesh's status counts `total` routed keys, and
    /// returns each subset's `(routedKeys, observedShare)`.
    pub async fn observed_shares(
        &self,
        total: u64,
    ) -> anyhow::Result<BTreeMap<String, (u64, String)>> {
        let meshes: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
            self.client.clone(),
            &self.ns,
            &crate::mesh::mesh_resource(),
        );
        eventually(
            &format!("the mesh's status to count {total} routed keys"),
            TIMEOUT,
            || async {
                let mesh = meshes.get("mesh").await?;
                let shares: BTreeMap<String, (u64, String)> = mesh.data["status"]["subsets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        (
                            s["name"].as_str().unwrap_or_default().to_string(),
                            (
                                s["routedKeys"].as_u64().unwrap_or_default(),
                                s["observedShare"].as_str().unwrap_or_default().to_string(),
                            ),
                        )
                    })
                    .collect();
                let counted: u64 = shares.values().map(|(n, _)| n).sum();
                Ok((counted == total).then_some(shares))
            },
        )
        .await
    }

    /// Creates generators `app-0` to `app-{n-1}` in `namespace` and waits
    /// until each has been handled.
    pub async fn apps(&self, namespace: &str, n: usize) -> anyhow::Result<()> {
        for i in 0..n {
            crate::mesh::create_generator(
                &self.client,
                namespace,
                &format!("app-{i}"),
                json!({"data": {"n": "0"}}),
            )
            .await?;
        }
        self.wait_handled(&[namespace.to_string()], n).await?;
        Ok(())
    }

    /// Changes generator `namespace/name`'s data and waits until a replica
    /// reconciled the change; returns its `status.handledBy`.
    pub async fn change_and_wait(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(self.client.clone(), namespace, &generator_resource());
        let changed = api
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    json!({"spec": {"data": {"changed": crate::history::now_us().to_string()}}}),
                ),
            )
            .await?;
        let generation = changed.metadata.generation.unwrap_or_default();
        eventually(
            &format!("{namespace}/{name} generation {generation} to be reconciled"),
            TIMEOUT,
            || async {
                let o = api.get(name).await?;
                let status = &o.data["status"];
                Ok((status["observedGeneration"] == generation)
                    .then(|| status["handledBy"].as_str().map(str::to_string))
                    .flatten())
            },
        )
        .await
    }

    /// Changes every generator in `namespace` once more (with no reconcile
    /// delay), waits until every replica's records show each last
    /// generation reconciled successfully, and fails if any two reconciles
    /// of a key overlapped. Returns each key's last generation and the
    /// records.
    pub async fn settle_and_check(
        &self,
        namespace: &str,
    ) -> anyhow::Result<(Vec<(String, i64)>, Vec<Record>)> {
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(self.client.clone(), namespace, &generator_resource());
        let patch = json!({"spec": {"data": {"n": "final"}, "reconcileMs": 0}});
        let mut finals = Vec::new();
        for o in api.list(&Default::default()).await? {
            let name = o.metadata.name.unwrap_or_default();
            let changed = api
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await?;
            finals.push((
                format!("{namespace}/{name}"),
                changed.metadata.generation.unwrap_or_default(),
            ));
        }
        let paths: Vec<std::path::PathBuf> =
            self.replicas.iter().map(|r| r.records.clone()).collect();
        let read = || {
            let paths: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
            crate::history::read(
                &paths,
                &crate::history::Deaths::default(),
                crate::history::now_us(),
            )
        };
        eventually(
            "every last generation to be reconciled",
            TIMEOUT,
            || async {
                let rs = read();
                Ok(finals
                    .iter()
                    .all(|(k, g)| {
                        rs.iter()
                            .any(|r| &r.key == k && r.generation == *g && r.outcome == "ok")
                    })
                    .then_some(()))
            },
        )
        .await?;
        let records = read();
        let overlaps = crate::history::overlaps(&records);
        anyhow::ensure!(overlaps.is_empty(), "reconciles overlapped: {overlaps:#?}");
        Ok((finals, records))
    }

    /// Every record of every replica.
    pub fn records(&self) -> Vec<Record> {
        self.replicas.iter().flat_map(|r| r.records()).collect()
    }

    /// Prints the tail of every process log; call when a test fails.
    pub fn dump_logs(&self) {
        eprintln!("--- manager ---\n{}", self.manager.process().log_tail(60));
        for r in &self.replicas {
            eprintln!("--- {} sidecar ---\n{}", r.pod, r.sidecar.log_tail(30));
            eprintln!("--- {} operator ---\n{}", r.pod, r.operator.log_tail(30));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}
