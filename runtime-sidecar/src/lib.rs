//! The opmesh runtime sidecar: keeps the session with the manager, a slice
//! cache and a work queue, and serves its operator on a Unix socket.
