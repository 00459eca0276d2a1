//! What the webhook injects into an opted-in operator pod: the runtime as a
//! native sidecar (an init container with `restartPolicy: Always`), its
//! settings from the shared definition (`opmesh_proto::env`), the projected
//! token for audience `opmesh` and the manager's CA bundle, and the socket
//! volume mounted into every operator container. Pure: the webhook calls it
//! with the pod it was sent.
//!
//! Injection is idempotent: a pod that already carries the runtime gets the
//! current one in its place, and a pod injected twice is unchanged the
//! second time.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
        EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod, PodSpec, Probe,
        ProjectedVolumeSource, ResourceRequirements, SecurityContext,
        ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use opmesh_proto::env;

/// The pod label that opts a pod in; its value names the OperatorMesh in
/// the pod's namespace.
pub(crate) const MESH_LABEL: &str = "opmesh.io/mesh";
/// An annotation that opts a labelled pod out when `"false"`.
pub(crate) const INJECT_ANNOTATION: &str = "opmesh.io/inject";
/// The annotation recording which runtime image was injected.
pub(crate) const INJECTED_ANNOTATION: &str = "opmesh.io/injected";
/// The injected container's name.
pub(crate) const RUNTIME_CONTAINER: &str = "opmesh-runtime";
/// The volume holding the operator socket.
const SOCKET_VOLUME: &str = "opmesh-socket";
/// The volume holding the runtime's token and CA bundle.
const IDENTITY_VOLUME: &str = "opmesh-identity";
/// Where the socket volume is mounted, in every container.
const SOCKET_DIR: &str = "/var/run/opmesh";
/// Where the identity volume is mounted in the runtime.
const IDENTITY_DIR: &str = "/var/run/secrets/opmesh.io";
/// The runtime's health port.
const HEALTH_PORT: i32 = 9441;
/// The ConfigMap (in the pod's namespace) holding the manager's CA bundle.
pub(crate) const CA_CONFIGMAP: &str = "opmesh-ca";

/// What an injection needs besides the pod.
#[derive(Clone, Debug)]
pub(crate) struct Injection {
    /// The runtime image.
    pub(crate) image: String,
    /// The manager address the runtime dials.
    pub(crate) manager_addr: String,
}

/// Why a pod is not injected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Not labelled, or opted out.
    NotOptedIn,
}

/// The pod's spec and annotations with the runtime injected, or why not.
/// The mesh is `namespace/<label value>`.
pub(crate) fn inject(
    pod: &Pod,
    namespace: &str,
    settings: &Injection,
) -> Result<(PodSpec, BTreeMap<String, String>), Skip> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(mesh) = labels.get(MESH_LABEL).filter(|m| !m.is_empty()) else {
        return Err(Skip::NotOptedIn);
    };
    if annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return Err(Skip::NotOptedIn);
    }
    let mut spec = pod.spec.clone().unwrap_or_default();

    // The operator containers find the socket where the SDK looks.
    let socket = format!("{SOCKET_DIR}/runtime.sock");
    for c in &mut spec.containers {
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        mounts.retain(|m| m.name != SOCKET_VOLUME);
        mounts.push(VolumeMount {
            name: SOCKET_VOLUME.into(),
            mount_path: SOCKET_DIR.into(),
            ..Default::default()
        });
        let envs = c.env.get_or_insert_with(Vec::new);
        envs.retain(|e| e.name != env::RUNTIME_SOCKET);
        envs.push(value(env::RUNTIME_SOCKET, &socket));
    }

    let init = spec.init_containers.get_or_insert_with(Vec::new);
    init.retain(|c| c.name != RUNTIME_CONTAINER);
    // First, so it serves before any other init container or the operator
    // starts.
    init.insert(
        0,
        runtime(&format!("{namespace}/{mesh}"), &socket, settings),
    );

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| v.name != SOCKET_VOLUME && v.name != IDENTITY_VOLUME);
    volumes.push(Volume {
        name: SOCKET_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("1Mi".into())),
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: IDENTITY_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(env::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: CA_CONFIGMAP.into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca/ca.crt".into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    });
    annotations.insert(INJECTED_ANNOTATION.into(), settings.image.clone());
    Ok((spec, annotations))
}

fn value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The runtime container for `mesh`.
fn runtime(mesh: &str, socket: &str, settings: &Injection) -> Container {
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("opmesh-health".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let quantities = |cpu: &str, memory: &str| {
        Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ]))
    };
    Container {
        name: RUNTIME_CONTAINER.into(),
        image: Some(settings.image.clone()),
        // A native sidecar: started before the operator, stopped after it.
        restart_policy: Some("Always".into()),
        env: Some(vec![
            value(env::MESH, mesh),
            value(env::MANAGER_ADDR, &settings.manager_addr),
            field(env::POD_NAMESPACE, "metadata.namespace"),
            field(env::POD_NAME, "metadata.name"),
            value(env::RUNTIME_SOCKET, socket),
            value(env::HEALTH_ADDR, &format!("0.0.0.0:{HEALTH_PORT}")),
            value(env::TOKEN_FILE, &format!("{IDENTITY_DIR}/token")),
            value(env::CA_FILE, &format!("{IDENTITY_DIR}/ca/ca.crt")),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("opmesh-health".into()),
            container_port: HEALTH_PORT,
            ..Default::default()
        }]),
        // The kubelet starts the operator once the socket serves.
        startup_probe: Some(probe("/healthz", 1, 30)),
        readiness_probe: Some(probe("/readyz", 10, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: quantities("50m", "32Mi"),
            limits: quantities("500m", "128Mi"),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: SOCKET_VOLUME.into(),
                mount_path: SOCKET_DIR.into(),
                ..Default::default()
            },
            VolumeMount {
                name: IDENTITY_VOLUME.into(),
                mount_path: IDENTITY_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn settings() -> Injection {
        Injection {
            image: "opmesh-runtime:1".into(),
            manager_addr: "https://m:9440".into(),
        }
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("op-0".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "operator".into(),
                    image: Some("op:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn injected(p: &Pod) -> Pod {
        let (spec, annotations) = inject(p, "ops", &settings()).unwrap();
        let mut out = p.clone();
        out.spec = Some(spec);
        out.metadata.annotations = Some(annotations);
        out
    }

    #[test]
    fn a_labelled_pod_gets_the_runtime_and_the_operator_its_socket() {
        let p = injected(&pod(&[(MESH_LABEL, "mesh")]));
        let spec = p.spec.unwrap();
        let init = spec.init_containers.unwrap();
        assert_eq!(init[0].name, RUNTIME_CONTAINER);
        assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        let envs = init[0].env.clone().unwrap();
        let get = |n: &str| {
            envs.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(get(env::MESH).as_deref(), Some("ops/mesh"));
        let sc = init[0].security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let op = &spec.containers[0];
        assert!(
            op.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == SOCKET_DIR)
        );
        assert!(
            op.env
                .iter()
                .flatten()
                .any(|e| e.name == env::RUNTIME_SOCKET)
        );
        let token = spec
            .volumes
            .unwrap()
            .into_iter()
            .find_map(|v| v.projected)
            .and_then(|p| p.sources)
            .unwrap()
            .into_iter()
            .find_map(|s| s.service_account_token)
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some(env::TOKEN_AUDIENCE));
    }

    #[test]
    fn injecting_twice_changes_nothing_and_an_older_runtime_is_replaced() {
        let once = injected(&pod(&[(MESH_LABEL, "mesh")]));
        assert_eq!(injected(&once), once);
        let mut older = once.clone();
        older
            .spec
            .as_mut()
            .unwrap()
            .init_containers
            .as_mut()
            .unwrap()[0]
            .image = Some("opmesh-runtime:0".into());
        assert_eq!(injected(&older), once);
    }

    #[test]
    fn unlabelled_and_opted_out_pods_are_left_alone() {
        assert_eq!(
            inject(&pod(&[("app", "x")]), "ops", &settings()).unwrap_err(),
            Skip::NotOptedIn
        );
        let mut out = pod(&[(MESH_LABEL, "mesh")]);
        out.metadata.annotations = Some(BTreeMap::from([(
            INJECT_ANNOTATION.to_string(),
            "false".to_string(),
        )]));
        assert_eq!(
            inject(&out, "ops", &settings()).unwrap_err(),
            Skip::NotOptedIn
        );
    }
}
