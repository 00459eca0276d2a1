//! The opmesh gRPC API, generated from `proto/opmesh/v1/*.proto`, and the
//! contracts every opmesh process must agree on.
//!
//! - [`v1::mesh_service_server`] / [`v1::mesh_service_client`]: the session
//!   between the manager and a runtime sidecar.
//! - [`v1::runtime_service_server`] / [`v1::runtime_service_client`]: the API a
//!   sidecar serves to its operator on a Unix socket.
//! - [`gvk_key`]: how a resource type is named in keys and caches, by the
//!   manager, the runtime and the SDK alike.
//! - [`env`]: the runtime sidecar's environment variables, used by the
//!   runtime's flags, the SDK, `deploy/` and the tests.
//!
//! Code is generated at build time with `tonic-prost-build` and `protox`, so no
//! system `protoc` is needed. Other languages can build clients from the same
//! `.proto` files.

/// Package `opmesh.v1`.
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("opmesh.v1");
}

pub mod env;

/// The key a resource type is indexed by everywhere: `group/version/Kind`,
/// with an empty group for the core API group (`/v1/ConfigMap`).
pub fn gvk_key(group: &str, version: &str, kind: &str) -> String {
    format!("{group}/{version}/{kind}")
}

// === impl GroupVersionKind ===

impl v1::GroupVersionKind {
    /// This type's [`gvk_key`].
    pub fn key(&self) -> String {
        gvk_key(&self.group, &self.version, &self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_core_group_with_an_empty_segment() {
        let g = v1::GroupVersionKind {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
            namespaced: true,
        };
        assert_eq!(g.key(), "/v1/ConfigMap");
        assert_eq!(gvk_key("apps", "v1", "Deployment"), "apps/v1/Deployment");
    }
}
