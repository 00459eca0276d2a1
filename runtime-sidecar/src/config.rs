//! The runtime's settings, as plain data.

use std::{net::SocketAddr, path::PathBuf};

use opmesh_proto::env;

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
        env = env::MANAGER_ADDR,
        value_delimiter = ',',
        default_value = "http://opmesh-manager.opmesh-system.svc:9440"
    )]
    pub manager: Vec<String>,
    /// The OperatorMesh this runtime belongs to, as `namespace/name`.
    #[arg(long, env = env::MESH, value_parser = parse_mesh)]
    pub mesh: MeshRef,
    /// The namespace of the Pod this runtime runs in (use the downward API).
    #[arg(long, env = env::POD_NAMESPACE)]
    pub pod_namespace: String,
    /// The name of the Pod this runtime runs in (use the downward API).
    #[arg(long, env = env::POD_NAME)]
    pub pod_name: String,
    /// The Unix socket the operator connects to.
    #[arg(
        long,
        env = env::RUNTIME_SOCKET,
        default_value = env::DEFAULT_RUNTIME_SOCKET
    )]
    pub socket: PathBuf,
    /// The address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = env::HEALTH_ADDR, default_value = "0.0.0.0:9441")]
    pub health: SocketAddr,
    /// How many reconciles run at once, at most. Unset, the operator's own
    /// choice (`Controller::concurrency`) applies, or 1.
    #[arg(long, env = env::MAX_CONCURRENT_RECONCILES, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_concurrent_reconciles: Option<u32>,
    /// The projected ServiceAccount token (audience `opmesh`) that proves
    /// to the manager which pod this runtime runs in; re-read for every
    /// session, as the kubelet refreshes it.
    #[arg(long, env = env::TOKEN_FILE, default_value = env::DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// How long (ms) the operator may be gone (crashed, restarting) before
    /// this runtime says goodbye so its keys move to other replicas, and
    /// reports not-ready until an operator is back.
    #[arg(long, env = env::OPERATOR_GRACE_MS, default_value_t = 10_000)]
    pub operator_grace_ms: u64,
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
