//! Runs an injected pod's runtime and operator as real processes, doing the
//! kubelet's part by hand: the downward API, the volumes as local
//! directories (the token a kubelet would project, the CA bundle, the
//! socket), and the in-cluster manager address as the test's.

use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, PostParams},
};
use opmesh_proto::env;

use crate::{
    ControlPlane, cluster, control_plane::Process, eventually, mesh::Binaries, tls::MeshTls,
    world::TIMEOUT,
};

/// The name of the container the webhook injects.
pub const RUNTIME_CONTAINER: &str = "opmesh-runtime";

/// The injected runtime container of `pod`, if it has one.
pub fn runtime_of(pod: &Pod) -> Option<Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == RUNTIME_CONTAINER)
        .cloned()
}

/// Creates `pod` in `namespace` until the apiserver hands it back with the
/// runtime injected (a new webhook configuration takes it a moment to use).
pub async fn create_injected(client: &Client, namespace: &str, pod: &Pod) -> anyhow::Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let name = pod.name_any();
    eventually(&format!("pod {name} to be injected"), TIMEOUT, || async {
        let created = pods.create(&PostParams::default(), pod).await?;
        if runtime_of(&created).is_some() {
            return Ok(Some(created));
        }
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await?;
        eventually("the uninjected pod to be gone", TIMEOUT, || async {
            Ok(pods.get_opt(&name).await?.is_none().then_some(()))
        })
        .await?;
        Ok(None)
    })
    .await
}

/// The injected pod's runtime and operator, running.
pub struct Injected {
    /// The runtime.
    pub runtime: Process,
    /// The operator (the pod's first container).
    pub operator: Process,
}

/// Starts `pod`'s injected runtime and its first container as the example
/// operator, with exactly their injected environment, files under `dir`,
/// dialing `manager`. `operator_env` is added to the operator's (a
/// `KUBECONFIG` of its own, a records file).
pub async fn run_injected(
    cp: &ControlPlane,
    bins: &Binaries,
    dir: &Path,
    pod: &Pod,
    manager: &str,
    operator_env: &[(&str, &str)],
) -> anyhow::Result<Injected> {
    let client = cp.client().await?;
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let runtime = runtime_of(pod).ok_or_else(|| anyhow::anyhow!("{name} has no runtime"))?;
    let operator = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first().cloned())
        .ok_or_else(|| anyhow::anyhow!("{name} has no container"))?;
    let volumes = dir.join(format!("{name}-volumes"));
    let (socket_dir, identity_dir) = (volumes.join("opmesh"), volumes.join("identity"));
    std::fs::create_dir_all(identity_dir.join("ca"))?;
    let token = cluster::pod_token(&client, pod, &[env::TOKEN_AUDIENCE]).await?;
    std::fs::write(identity_dir.join("token"), token)?;
    std::fs::write(
        identity_dir.join("ca/ca.crt"),
        &MeshTls::shared(cp.dir()).ca_pem,
    )?;
    let local = |c: &Container| -> Vec<(String, String)> {
        let mut vars = vec![(
            "KUBECONFIG".to_string(),
            cp.kubeconfig().display().to_string(),
        )];
        for e in c.env.iter().flatten() {
            let value = match e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                Some(f) if f.field_path == "metadata.name" => name.clone(),
                Some(f) if f.field_path == "metadata.namespace" => namespace.clone(),
                _ => e.value.clone().unwrap_or_default(),
            };
            let value = match e.name.as_str() {
                env::MANAGER_ADDR => manager.to_string(),
                env::HEALTH_ADDR => "127.0.0.1:0".into(),
                _ => value
                    .replace(
                        "/var/run/secrets/opmesh.io",
                        &identity_dir.display().to_string(),
                    )
                    .replace("/var/run/opmesh", &socket_dir.display().to_string()),
            };
            vars.push((e.name.clone(), value));
        }
        vars
    };
    let runtime = Process::spawn_with_env(
        &format!("{name}-runtime"),
        &bins.runtime,
        &[],
        &local(&runtime),
        dir,
        None,
    )?;
    let mut vars = local(&operator);
    vars.extend(
        operator_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let operator = Process::spawn_with_env(
        &format!("{name}-operator"),
        &bins.operator,
        &["run".into()],
        &vars,
        dir,
        None,
    )?;
    Ok(Injected { runtime, operator })
}
