//! The manager's settings, as plain data.

use std::{net::SocketAddr, time::Duration};

/// Settings for [`crate::run`]. Tests build it directly.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address the gRPC server for runtime sidecars listens on.
    #[arg(long, env = "OPMESH_LISTEN", default_value = "0.0.0.0:9440")]
    pub listen: SocketAddr,
    /// Lease TTL granted to runtimes, in milliseconds.
    #[arg(long, env = "OPMESH_LEASE_TTL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub lease_ttl_ms: u64,
    /// Only handle OperatorMeshes in this namespace (default: all namespaces).
    #[arg(long, env = "OPMESH_MESH_NAMESPACE")]
    pub mesh_namespace: Option<String>,
}

// === impl Config ===

impl Config {
    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}
