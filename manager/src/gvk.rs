//! A resource type a mesh routes, as its runtimes declare it.

use kube::api::{ApiResource, GroupVersionKind};

/// A resource type the manager watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Gvk {
    /// API group; empty for core.
    pub(crate) group: String,
    /// API version.
    pub(crate) version: String,
    /// Kind.
    pub(crate) kind: String,
    /// Plural resource name.
    pub(crate) plural: String,
    /// Namespaced or cluster-scoped.
    pub(crate) namespaced: bool,
}

// === impl Gvk ===

impl Gvk {
    /// The key watches and stores are indexed by, shared with the runtime.
    pub(crate) fn key(&self) -> String {
        opmesh_proto::gvk_key(&self.group, &self.version, &self.kind)
    }

    /// `apiVersion` as written in objects.
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The type as kube's dynamic API needs it.
    pub(crate) fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&self.group, &self.version, &self.kind),
            &self.plural,
        )
    }
}

impl From<&opmesh_proto::v1::GroupVersionKind> for Gvk {
    fn from(g: &opmesh_proto::v1::GroupVersionKind) -> Self {
        Self {
            group: g.group.clone(),
            version: g.version.clone(),
            kind: g.kind.clone(),
            plural: g.plural.clone(),
            namespaced: g.namespaced,
        }
    }
}

impl From<&Gvk> for opmesh_proto::v1::GroupVersionKind {
    fn from(g: &Gvk) -> Self {
        Self {
            group: g.group.clone(),
            version: g.version.clone(),
            kind: g.kind.clone(),
            plural: g.plural.clone(),
            namespaced: g.namespaced,
        }
    }
}

/// Each controller's primary type key and owned type keys.
pub(crate) fn controller_keys(
    controllers: &[opmesh_proto::v1::ControllerTypes],
) -> Vec<(String, Vec<String>)> {
    controllers
        .iter()
        .map(|c| {
            (
                c.primary
                    .as_ref()
                    .map(|p| Gvk::from(p).key())
                    .unwrap_or_default(),
                c.owns.iter().map(|g| Gvk::from(g).key()).collect(),
            )
        })
        .collect()
}
