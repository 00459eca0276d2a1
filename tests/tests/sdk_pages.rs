//! The SDK lists a slice larger than gRPC's 4 MiB message limit: the
//! sidecar pages its answers and the SDK follows the pages.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use opmesh_proto::env;
use opmesh_sdk::{Action, Controller, Mesh};
use opmesh_tests::{
    control_plane::{Process, free_port},
    eventually,
    mesh::{apply_mesh, create_operator_pod, write_pod_token},
    tls::MeshTls,
    world::{TIMEOUT, World},
};
use serde_json::json;
use tokio::sync::mpsc;

/// What one reconcile of the probe saw: how many ConfigMaps the cache
/// listed in its namespace, and their total size in bytes.
type Listed = (usize, usize);

async fn reconcile(
    cm: Arc<ConfigMap>,
    seen: Arc<(Mesh, mpsc::UnboundedSender<Listed>)>,
) -> Result<Action, opmesh_sdk::Error> {
    if cm.metadata.name.as_deref() == Some("probe") {
        let (mesh, tx) = &*seen;
        let all = mesh
            .cache()
            .list::<ConfigMap>(cm.metadata.namespace.as_deref())
            .await?;
        let bytes = all
            .iter()
            .map(|c| serde_json::to_vec(c).map(|v| v.len()).unwrap_or(0))
            .sum();
        let _ = tx.send((all.len(), bytes));
    }
    Ok(Action::await_change())
}

#[tokio::test]
async fn a_slice_larger_than_4_mib_lists_through_the_sdk() -> anyhow::Result<()> {
    const N: usize = 30;
    const SIZE: usize = 200 * 1024;
    let w = World::new("sdk-pages").await?;
    // A mesh of ConfigMaps, one replica.
    let mut spec = w.mesh_spec(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    );
    spec["controllers"] = json!([{"primary": {"apiVersion": "v1", "kind": "ConfigMap"}}]);
    apply_mesh(&w.client, &w.ns, "mesh", spec).await?;
    let labels = [("app", "cmg"), ("version", "v1")];
    create_operator_pod(&w.client, &w.ns, "lister-0", &labels).await?;

    // 30 ConfigMaps of 200 KiB: 6 MiB in one namespace, and a probe.
    let ns = w.object_namespace("sdk-pages-data", &[]).await?;
    let api: Api<ConfigMap> = Api::namespaced(w.client.clone(), &ns);
    let filler = "x".repeat(SIZE);
    for i in 0..=N {
        let name = if i == N {
            "probe".to_string()
        } else {
            format!("big-{i}")
        };
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("filler".to_string(), filler.clone())])),
            ..Default::default()
        };
        api.create(&PostParams::default(), &cm).await?;
    }

    // The real sidecar, and this test's SDK controller as its operator.
    let socket = w.dir.path().join("lister.sock");
    let token = w.dir.path().join("lister-0.token");
    write_pod_token(w.cp, &w.ns, "lister-0", &token).await?;
    let mut vars = MeshTls::shared(w.cp.dir()).env();
    let mesh = format!("{}/mesh", w.ns);
    let health = format!("127.0.0.1:{}", free_port()?);
    for (k, v) in [
        (env::MANAGER_ADDR, w.manager.addr()),
        (env::MESH, &mesh),
        (env::POD_NAMESPACE, &w.ns),
        (env::POD_NAME, "lister-0"),
        (env::RUNTIME_SOCKET, &socket.display().to_string()),
        (env::HEALTH_ADDR, &health),
        (env::TOKEN_FILE, &token.display().to_string()),
    ] {
        vars.push((k.to_string(), v.to_string()));
    }
    let sidecar = Process::spawn_with_env(
        "lister-sidecar",
        &w.bins.runtime,
        &[],
        &vars,
        w.dir.path(),
        None,
    )?;
    eventually("the sidecar's socket", TIMEOUT, || async {
        sidecar.check_running()?;
        Ok(socket.exists().then_some(()))
    })
    .await?;
    let mesh = Mesh::connect_to(&socket).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let controller = Controller::<ConfigMap>::new(&mesh);
    let ctx = Arc::new((mesh, tx));
    let run = tokio::spawn(controller.run(reconcile, opmesh_sdk::default_error_policy, ctx));

    let (count, bytes) = tokio::time::timeout(TIMEOUT, rx.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the controller stopped: {:?}", sidecar.log_tail(50)))?;
    assert_eq!(
        count,
        N + 1,
        "the cache listed {count} of {} ConfigMaps",
        N + 1
    );
    assert!(
        bytes > 4 << 20,
        "only {bytes} bytes listed: not past the limit"
    );
    run.abort();
    Ok(())
}
