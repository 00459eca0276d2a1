//! The opmesh manager: watches the API server once per resource, routes each
//! key to one runtime sidecar, and serves the sidecars over gRPC.
