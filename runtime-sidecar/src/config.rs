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
        default_value = "https://opmesh-manager.opmesh-system.svc:9440"
    )]
    pub manager: Vec<String>,
    /// The CAs trusted for the manager's certificate (PEM), and no others.
    /// Re-read at every connection, so a rotated bundle needs no restart.
    #[arg(long, env = env::CA_FILE, default_value = env::DEFAULT_CA_FILE)]
    pub ca_file: PathBuf,
    /// The name the manager's certificate must carry; unset, the host of
    /// the manager address.
    #[arg(long, env = env::TLS_SERVER_NAME)]
    pub tls_server_name: Option<String>,
    /// Allow `http://` manager addresses. For development only: the objects
    /// and the manager's orders then travel unauthenticated.
    #[arg(long, env = env::INSECURE_PLAINTEXT)]
    pub insecure_plaintext: bool,
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

// === impl Config ===

impl Config {
    /// Checks what flags alone cannot: every manager address is `https://`
    /// unless plaintext was allowed on purpose.
    pub fn validate(&self) -> Result<(), String> {
        for addr in &self.manager {
            match addr.split_once("://").map(|(scheme, _)| scheme) {
                Some("https") => {}
                Some("http") if self.insecure_plaintext => {}
                Some("http") => {
                    return Err(format!(
                        "refusing the plaintext manager address {addr}: use https:// and mount \
                         the manager's CA bundle at --ca-file, or set {}=true for development only",
                        env::INSECURE_PLAINTEXT
                    ));
                }
                _ => {
                    return Err(format!(
                        "--manager {addr:?} is not an https:// (or http://) address"
                    ));
                }
            }
        }
        Ok(())
    }
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

    #[test]
    fn a_plaintext_manager_is_refused_unless_allowed() {
        let config = |extra: &[&str]| {
            let mut args = vec![
                "opmesh-runtime",
                "--mesh",
                "ops/m",
                "--pod-namespace",
                "ops",
                "--pod-name",
                "p",
            ];
            args.extend_from_slice(extra);
            Config::try_parse_from(args).unwrap()
        };
        assert!(config(&[]).validate().is_ok(), "the default is https");
        let err = config(&["--manager", "http://m:9440"])
            .validate()
            .unwrap_err();
        assert!(
            err.contains("plaintext") && err.contains(env::INSECURE_PLAINTEXT),
            "{err}"
        );
        assert!(
            config(&["--manager", "http://m:9440", "--insecure-plaintext"])
                .validate()
                .is_ok()
        );
        let err = config(&["--manager", "m:9440"]).validate().unwrap_err();
        assert!(err.contains("https://"), "{err}");
    }
}
