//! The opmesh gRPC API, generated from `proto/opmesh/v1/*.proto`.
//!
//! - [`v1::mesh_service_server`] / [`v1::mesh_service_client`]: the session
//!   between the manager and a runtime sidecar.
//! - [`v1::runtime_service_server`] / [`v1::runtime_service_client`]: the API a
//!   sidecar serves to its operator on a Unix socket.
//!
//! Code is generated at build time with `tonic-prost-build` and `protox`, so no
//! system `protoc` is needed. Other languages can build clients from the same
//! `.proto` files.

/// Package `opmesh.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("opmesh.v1");
}
