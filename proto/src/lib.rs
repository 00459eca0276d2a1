//! The opmesh gRPC API, generated from `proto/opmesh/v1/*.proto`, and the
//! contracts every opmesh process must agree on.
//!
//! - [`v1::mesh_service_server`] / [`v1::mesh_service_client`]: the session
//!   between the manager and a runtime sidecar.
//! - [`v1::runtime_service_server`] / [`v1::runtime_service_client`]: the API a
//!   sidecar serves to its operator on a Unix socket.
//! - [`gvk_key`]: how a resource type is named in caches, by the manager,
//!   the runtime and the SDK alike; [`mesh_key`] and [`parse_key`]: how a
//!   key names a primary object and its type.
//! - [`batch`]: how messages travel several to one, without waiting.
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

pub mod batch;
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

/// The most keys a hello may report as held. A runtime holding more reports
/// only this many; the others it lets go, and they wait out its lease.
pub const MAX_HELD_KEYS: usize = 100_000;

/// The key of a primary object of type `kind` (`group`, `version`):
/// `namespace/name@Kind.version.group`, `name@...` for a cluster-scoped
/// object, and `Kind.version` for the core group. The part before `@` is the
/// object, which routing hashes; the type tells an operator's controllers
/// apart.
pub fn mesh_key(
    group: &str,
    version: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> String {
    let object = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    if group.is_empty() {
        format!("{object}@{kind}.{version}")
    } else {
        format!("{object}@{kind}.{version}.{group}")
    }
}

/// A key's object part (`namespace/name` or `name`) and its type's
/// [`gvk_key`], if the key names one.
pub fn parse_key(key: &str) -> (&str, Option<String>) {
    let Some((object, ty)) = key.split_once('@') else {
        return (key, None);
    };
    let mut parts = ty.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(kind), Some(version), group) if !kind.is_empty() && !version.is_empty() => {
            (object, Some(gvk_key(group.unwrap_or(""), version, kind)))
        }
        _ => (object, None),
    }
}

// === impl ControllerTypes ===

impl v1::ControllerTypes {
    /// The controllers a hello or registration declares: `controllers`, or
    /// else the one of `primary` and `owns`.
    pub fn declared(
        controllers: &[v1::ControllerTypes],
        primary: Option<&v1::GroupVersionKind>,
        owns: &[v1::GroupVersionKind],
    ) -> Vec<v1::ControllerTypes> {
        if !controllers.is_empty() {
            return controllers.to_vec();
        }
        primary
            .map(|p| v1::ControllerTypes {
                primary: Some(p.clone()),
                owns: owns.to_vec(),
            })
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_its_object_and_its_type() {
        let k = mesh_key("example.com", "v1", "Widget", Some("ns"), "w");
        assert_eq!(k, "ns/w@Widget.v1.example.com");
        assert_eq!(
            parse_key(&k),
            ("ns/w", Some("example.com/v1/Widget".into()))
        );
        let core = mesh_key("", "v1", "ConfigMap", None, "c");
        assert_eq!(core, "c@ConfigMap.v1");
        assert_eq!(parse_key(&core), ("c", Some("/v1/ConfigMap".into())));
        assert_eq!(parse_key("ns/plain"), ("ns/plain", None));
        assert_eq!(parse_key("ns/x@"), ("ns/x", None));
    }

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
