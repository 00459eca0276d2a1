//! Typed identities: meshes, runtime pods, sessions and the holders of keys.
//!
//! They are compared and hashed as values and formatted only for logs and
//! status, never parsed back.

use std::fmt;

/// An `OperatorMesh`, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct MeshId {
    /// The mesh's namespace.
    pub(crate) namespace: String,
    /// The mesh's name.
    pub(crate) name: String,
}

/// The Pod a runtime sidecar runs in. A pod is a member of a subset's ring;
/// it keeps its place across reconnects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PodId {
    /// The pod's namespace.
    pub(crate) namespace: String,
    /// The pod's name.
    pub(crate) name: String,
}

/// One accepted session of a runtime; every connect gets a new one, from a
/// counter that never repeats within a manager's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SessionId(pub(crate) u64);

/// Who holds keys: one session of one pod. A reconnected pod is a new holder,
/// so it never inherits keys its earlier session may still be acting on
/// without going through adoption.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Holder {
    /// The runtime's pod.
    pub(crate) pod: PodId,
    /// The session.
    pub(crate) session: SessionId,
}

// === impl MeshId ===

impl MeshId {
    /// The mesh `namespace/name`.
    pub(crate) fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl PodId ===

impl PodId {
    /// The pod `namespace/name`.
    pub(crate) fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl Holder ===

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.pod, self.session.0)
    }
}
