//! The runtime's settings, as plain data.

use std::{net::SocketAddr, path::PathBuf};

/// A mesh reference, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshRef {
    /// The mesh's namespace.
    pub namespace: String,
    /// The mesh's name.
    pub name: String,
}

/// Settings for [`crate::run`]. Tests build it directly.
#[derive(Clone, Debug, clap::Parser)]
#[command(version, about = "The opmesh runtime sidecar")]
pub struct Config {
    /// The manager's gRPC address(es), comma-separated; tried in order.
    #[arg(
        long,
        env = "OPMESH_MANAGER_ADDR",
        value_delimiter = ',',
        default_value = "http://opmesh-manager.opmesh-system.svc:9440"
    )]
    pub manager: Vec<String>,
    /// The OperatorMesh this runtime belongs to, as `namespace/name`.
    #[arg(long, env = "OPMESH_MESH", value_parser = parse_mesh)]
    pub mesh: MeshRef,
    /// The namespace of the Pod this runtime runs in (use the downward API).
    #[arg(long, env = "OPMESH_POD_NAMESPACE")]
    pub pod_namespace: String,
    /// The name of the Pod this runtime runs in (use the downward API).
    #[arg(long, env = "OPMESH_POD_NAME")]
    pub pod_name: String,
    /// The Unix socket the operator connects to.
    #[arg(
        long,
        env = "OPMESH_RUNTIME_SOCKET",
        default_value = "/var/run/opmesh/runtime.sock"
    )]
    pub socket: PathBuf,
    /// The address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "OPMESH_HEALTH_ADDR", default_value = "0.0.0.0:9441")]
    pub health: SocketAddr,
    /// How many reconciles run at once.
    #[arg(long, env = "OPMESH_MAX_CONCURRENT_RECONCILES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_concurrent_reconciles: u32,
}

fn parse_mesh(s: &str) -> Result<MeshRef, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(MeshRef {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(format!(
            "expected NAMESPACE/NAME of an OperatorMesh, got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn a_bad_mesh_names_the_flag() {
        let err = Config::try_parse_from([
            "opmesh-runtime",
            "--mesh",
            "nope",
            "--pod-namespace",
            "a",
            "--pod-name",
            "b",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--mesh"), "{err}");
        assert!(err.contains("NAMESPACE/NAME"), "{err}");
    }
}
