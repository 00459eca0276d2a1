//! The runtime sidecar's environment variables: one definition for the
//! runtime's flags, the SDK, the manifests in `deploy/` and the tests.

/// The manager's gRPC address(es), comma-separated.
pub const MANAGER_ADDR: &str = "OPMESH_MANAGER_ADDR";
/// The OperatorMesh the runtime belongs to, as `namespace/name`.
pub const MESH: &str = "OPMESH_MESH";
/// The namespace of the runtime's Pod (downward API).
pub const POD_NAMESPACE: &str = "OPMESH_POD_NAMESPACE";
/// The name of the runtime's Pod (downward API).
pub const POD_NAME: &str = "OPMESH_POD_NAME";
/// The Unix socket the runtime serves its operator on; the SDK dials it.
pub const RUNTIME_SOCKET: &str = "OPMESH_RUNTIME_SOCKET";
/// The address of the runtime's `/healthz`, `/readyz` and `/metrics`.
pub const HEALTH_ADDR: &str = "OPMESH_HEALTH_ADDR";
/// How many reconciles the runtime runs at once.
pub const MAX_CONCURRENT_RECONCILES: &str = "OPMESH_MAX_CONCURRENT_RECONCILES";

/// Where the runtime reads its projected ServiceAccount token, re-read for
/// every hello as the kubelet refreshes it.
pub const TOKEN_FILE: &str = "OPMESH_TOKEN_FILE";
/// The token file when [`TOKEN_FILE`] is unset.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/opmesh.io/token";
/// The audience a runtime's token must be issued for.
pub const TOKEN_AUDIENCE: &str = "opmesh";
/// How long, in milliseconds, a runtime waits for its operator to come
/// back before it releases its keys.
pub const OPERATOR_GRACE_MS: &str = "OPMESH_OPERATOR_GRACE_MS";
/// The socket path the runtime and the SDK use when [`RUNTIME_SOCKET`] is unset.
pub const DEFAULT_RUNTIME_SOCKET: &str = "/var/run/opmesh/runtime.sock";

/// The PEM bundle of CAs the runtime trusts for the manager's certificate
/// (`ca.crt` of the manager's TLS Secret); re-read at every connection, so
/// a rotated bundle needs no restart.
pub const CA_FILE: &str = "OPMESH_CA_FILE";
/// The CA bundle when [`CA_FILE`] is unset.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/opmesh.io/ca/ca.crt";
/// The name the manager's certificate must carry, when it is not the host
/// of the manager address.
pub const TLS_SERVER_NAME: &str = "OPMESH_TLS_SERVER_NAME";
/// Set to `true` to let the runtime dial a plaintext (`http://`) manager.
/// For development only.
pub const INSECURE_PLAINTEXT: &str = "OPMESH_INSECURE_PLAINTEXT";

/// The variables a runtime container must set: it has no default for them.
pub const REQUIRED: [&str; 3] = [MESH, POD_NAMESPACE, POD_NAME];
