//! The opmesh SDK: write operators that reconcile only what their runtime
//! sidecar hands them.
