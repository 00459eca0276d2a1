//! Errors of the SDK.

use std::path::PathBuf;

/// Result type of the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to the runtime sidecar.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No sidecar answers on the socket.
    #[error(
        "no opmesh runtime sidecar at {path}: {reason}. Is the opmesh-runtime sidecar running in this pod, \
         and does OPMESH_RUNTIME_SOCKET point at its --socket?"
    )]
    NoSidecar {
        /// The socket path tried.
        path: PathBuf,
        /// Why the connection failed.
        reason: String,
    },
    /// The sidecar refused or failed a call.
    #[error("the runtime sidecar answered {0}")]
    Sidecar(#[from] tonic::Status),
    /// The controllers given to `run_all` cannot run together.
    #[error("cannot register these controllers: {0}")]
    Register(String),
    /// The sidecar closed the task stream.
    #[error("the runtime sidecar closed the task stream")]
    SidecarGone,
    /// An object from the sidecar did not decode as the expected type.
    #[error("cannot decode {kind} from the sidecar: {source}")]
    Decode {
        /// The kind expected.
        kind: String,
        /// The decoder's error.
        source: serde_json::Error,
    },
}
