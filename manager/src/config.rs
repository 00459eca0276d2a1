//! The manager's settings, as plain data.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

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
    /// Elect a leader through a Lease, so several managers can run; only the
    /// leader accepts runtimes. Off means this manager is the only one.
    #[arg(long, env = "OPMESH_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "OPMESH_LEASE_NAME", default_value = "opmesh-manager")]
    pub lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "OPMESH_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This manager's identity in the Lease (use the pod name).
    #[arg(long, env = "OPMESH_IDENTITY", default_value = "")]
    pub identity: String,
    /// How long the leader's Lease lasts without renewal, in seconds.
    #[arg(long, env = "OPMESH_LEADER_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub leader_lease_seconds: u64,
    /// Let runtimes without a token in, as whatever pod they claim to be.
    /// For development only: any process that reaches the port can then
    /// impersonate any operator pod.
    #[arg(long, env = "OPMESH_INSECURE_ALLOW_UNAUTHENTICATED_RUNTIMES")]
    pub insecure_allow_unauthenticated_runtimes: bool,
    /// The session port's TLS certificate chain (PEM), e.g. `tls.crt` of a
    /// mounted `kubernetes.io/tls` Secret. Re-read when it changes.
    #[arg(long, env = "OPMESH_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert-file`, e.g. `tls.key`.
    #[arg(long, env = "OPMESH_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// The most runtime sessions this manager serves at once; more are
    /// refused with RESOURCE_EXHAUSTED. (A pod has one session: a newer one
    /// replaces it.)
    #[arg(long, env = "OPMESH_MAX_SESSIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_sessions: u64,
    /// How many hellos per second are admitted, on average (bursts of a
    /// second's worth pass); more are refused with RESOURCE_EXHAUSTED so
    /// a flood of connections costs the apiserver and the sessions in
    /// place nothing. Runtimes retry with backoff.
    #[arg(long, env = "OPMESH_MAX_HELLOS_PER_SECOND", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_hellos_per_second: u64,
    /// Make and renew the session port's certificate in this Secret
    /// (`NAMESPACE/NAME`, type kubernetes.io/tls, with its own CA), instead
    /// of reading files; the CA bundle is published as ConfigMap
    /// `opmesh-ca` in every mesh's namespace.
    #[arg(long, env = "OPMESH_TLS_SECRET", conflicts_with = "tls_cert_file", value_parser = parse_secret)]
    pub tls_secret: Option<(String, String)>,
    /// The names (DNS names or IP addresses) a made certificate is for.
    #[arg(
        long,
        env = "OPMESH_TLS_DNS_NAMES",
        value_delimiter = ',',
        default_value = "opmesh-manager.opmesh-system.svc,opmesh-manager.opmesh-system.svc.cluster.local"
    )]
    pub tls_dns_names: Vec<String>,
    /// How long a made serving certificate is valid, in seconds; it is
    /// renewed once two thirds have passed.
    #[arg(long, env = "OPMESH_TLS_CERT_VALIDITY_SECONDS", default_value_t = 90 * 24 * 3600, value_parser = clap::value_parser!(u64).range(30..))]
    pub tls_cert_validity_seconds: u64,
    /// Serve the sidecar-injection webhook (`POST /mutate-pods`, TLS with
    /// the session port's certificate) on this address. Unset: no webhook.
    #[arg(long, env = "OPMESH_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<SocketAddr>,
    /// With `--tls-secret`: the MutatingWebhookConfiguration whose
    /// `caBundle`s the manager keeps set to its CA.
    #[arg(long, env = "OPMESH_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: Option<String>,
    /// The runtime image the webhook injects.
    #[arg(long, env = "OPMESH_RUNTIME_IMAGE", default_value = concat!("opmesh-runtime:", env!("CARGO_PKG_VERSION")))]
    pub runtime_image: String,
    /// The manager address injected runtimes dial.
    #[arg(
        long,
        env = "OPMESH_INJECTED_MANAGER_ADDR",
        default_value = "https://opmesh-manager.opmesh-system.svc:9440"
    )]
    pub injected_manager_addr: String,
    /// Serve the admin API (HTTPS with the session port's certificate;
    /// callers authenticate with their Kubernetes token and are authorized
    /// by their RBAC on operatormeshes) on this address. Unset: none.
    #[arg(long, env = "OPMESH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Serve /healthz, /readyz and /metrics (plain HTTP) on this address.
    /// Unset: none.
    #[arg(long, env = "OPMESH_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Serve sessions without TLS. For development only: anyone on the
    /// network path can then read the objects and forge the manager.
    #[arg(
        long,
        env = "OPMESH_INSECURE_PLAINTEXT",
        conflicts_with = "tls_cert_file"
    )]
    pub insecure_plaintext: bool,
}

fn parse_secret(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("expected NAMESPACE/NAME of a Secret, got {s:?}")),
    }
}

// === impl Config ===

impl Config {
    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}
