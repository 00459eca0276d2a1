//! Why the manager refuses a runtime, and the one place that becomes a gRPC status.

use tonic::Status;

/// A runtime session the manager will not accept. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The first message was not a valid hello.
    #[error("malformed session: {0}")]
    Malformed(String),
    /// The named OperatorMesh does not exist (or is not watched by this manager).
    #[error("no OperatorMesh {0}: create it, or point the runtime at an existing mesh with --mesh")]
    UnknownMesh(String),
    /// The mesh has never had a valid spec.
    #[error("OperatorMesh {mesh} has no valid spec yet: {reason}")]
    NoValidPolicy {
        /// The mesh.
        mesh: String,
        /// Why its spec is invalid.
        reason: String,
    },
    /// The Pod cannot be found.
    #[error(
        "pod {pod} not found: a runtime must run in a Pod, and --pod-namespace/--pod-name must name it"
    )]
    UnknownPod {
        /// The pod.
        pod: String,
    },
    /// The Pod is not part of the mesh.
    #[error("pod {pod} cannot join OperatorMesh {mesh}: {reason}")]
    NotAMember {
        /// The pod.
        pod: String,
        /// The mesh.
        mesh: String,
        /// Why.
        reason: String,
    },
    /// The hello's token is missing or not accepted.
    #[error("the runtime is not authenticated: {0}")]
    Unauthenticated(String),
    /// The token does not entitle the runtime to what it claims.
    #[error("the runtime may not join as it claims: {0}")]
    PermissionDenied(String),
    /// The runtime declares types its mesh does not route.
    #[error("OperatorMesh {mesh} does not route what this runtime declares: {reason}")]
    UndeclaredTypes {
        /// The mesh.
        mesh: String,
        /// The difference.
        reason: String,
    },
    /// The manager could not check the runtime's identity.
    #[error("cannot check the runtime's pod: {0}")]
    Lookup(String),
    /// The manager is shutting down.
    #[error("the manager is shutting down")]
    ShuttingDown,
    /// This manager is a standby.
    #[error("this manager is not the leader; try another manager address")]
    NotLeader,
    /// A limit on sessions or hellos is reached; retry with backoff.
    #[error("{0}")]
    Busy(String),
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        let msg = r.to_string();
        match r {
            Refusal::Malformed(_) => Status::invalid_argument(msg),
            Refusal::Unauthenticated(_) => Status::unauthenticated(msg),
            Refusal::PermissionDenied(_) | Refusal::UndeclaredTypes { .. } => {
                Status::permission_denied(msg)
            }
            Refusal::UnknownMesh(_) | Refusal::UnknownPod { .. } => Status::not_found(msg),
            Refusal::NoValidPolicy { .. } | Refusal::NotAMember { .. } => {
                Status::failed_precondition(msg)
            }
            Refusal::Lookup(_) | Refusal::ShuttingDown | Refusal::NotLeader => {
                Status::unavailable(msg)
            }
            Refusal::Busy(_) => Status::resource_exhausted(msg),
        }
    }
}
