//! The `OperatorMesh` custom resource (group `opmesh.io`, version `v1alpha1`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt as _, KubeSchema};
use serde::{Deserialize, Serialize};

/// Policy for one operator: which pods form it, how they split into subsets
/// (versions), and how reconcile work is routed between them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "opmesh.io",
    version = "v1alpha1",
    kind = "OperatorMesh",
    plural = "operatormeshes",
    shortname = "om",
    namespaced,
    status = "OperatorMeshStatus",
    printcolumn = r#"{"name":"Subsets","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Weights","type":"string","jsonPath":".status.weights"}"#,
    printcolumn = r#"{"name":"Observed","type":"string","jsonPath":".status.observed"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.subsets.all(a, self.subsets.exists_one(b, b.name == a.name))").message("subset names must be unique"),
    validation = Rule::new("self.routing.pins.all(p, self.subsets.exists(s, s.name == p.subset))").message("every pin must name a subset listed in spec.subsets"),
    validation = Rule::new("self.routing.weights.all(w, self.subsets.exists(s, s.name == w.subset))").message("every weight must name a subset listed in spec.subsets"),
    validation = Rule::new("!has(self.routing.clusterScoped) || self.subsets.exists(s, s.name == self.routing.clusterScoped)").message("routing.clusterScoped must name a subset listed in spec.subsets"),
    validation = Rule::new("self.routing.objectPins.all(p, self.subsets.exists(s, s.name == p.subset))").message("every object pin must name a subset listed in spec.subsets"),
)]
#[serde(rename_all = "camelCase")]
pub struct OperatorMeshSpec {
    /// Selects the operator's pods. A runtime whose Pod does not match is refused.
    pub selector: LabelSelector,
    /// The operator's controllers: for each, its primary type and the types
    /// it owns. The manager watches and routes only these types; a runtime
    /// that declares anything else is refused.
    #[schemars(length(min = 1, max = 16))]
    pub controllers: Vec<ControllerSpec>,
    /// The subsets (typically versions) of the operator, in declared order.
    /// The order fixes the order of the weight ranges.
    #[schemars(length(min = 1, max = 16))]
    pub subsets: Vec<SubsetSpec>,
    /// How keys are routed to subsets.
    pub routing: RoutingSpec,
    /// Freezes ownership changes while true.
    #[serde(default)]
    pub paused: bool,
    /// Only objects in namespaces matching this selector belong to the mesh.
    /// Unset means every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespaces besides the mesh's own whose pods may join as its
    /// runtimes, for an operator installed elsewhere. Empty: only pods of
    /// the mesh's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 63)))]
    pub runtime_namespaces: Vec<String>,
}

/// One controller of the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControllerSpec {
    /// The type the controller reconciles.
    pub primary: TypeRef,
    /// The types it owns (controller ownerReferences to the primary).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub owns: Vec<TypeRef>,
}

/// A resource type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypeRef {
    /// `group/version`, or `version` for the core group, e.g. `v1`.
    #[schemars(length(min = 1, max = 317))]
    pub api_version: String,
    /// The kind, e.g. `ConfigMap`.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
}

impl TypeRef {
    /// The key the manager and runtimes use for this type.
    pub fn key(&self) -> String {
        let (group, version) = self
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", self.api_version.as_str()));
        opmesh_proto::gvk_key(group, version, &self.kind)
    }
}

/// One subset of the operator's pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubsetSpec {
    /// The subset's name, e.g. `v1`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Pod labels that put a pod in this subset, e.g. `version: v2`. The
    /// manager reads them from the real Pod object.
    pub labels: BTreeMap<String, String>,
}

/// How the string that is hashed is formed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Granularity {
    /// Hash `namespace/name`: each object is routed on its own.
    #[default]
    Object,
    /// Hash the namespace: a namespace's objects all go to one subset.
    Namespace,
}

/// How the weights divide the keys no pin matches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Split {
    /// Each key goes to the subset whose range of the hash space holds its
    /// hash. Creating or deleting keys never moves others; shares match the
    /// weights as closely as a random draw would, so well for many keys.
    Hash,
    /// The namespaces that hold the mesh's objects (not excluded, in scope,
    /// not pinned) are sorted by hash and apportioned exactly: 5% of 40
    /// namespaces is 2. A namespace joining or leaving moves at most one
    /// namespace across each boundary between subsets. Needs
    /// `granularity: Namespace`.
    Exact,
}

/// Routing rules: pins first, then the weight split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.weights.map(w, w.weight).sum() == (has(self.weightTotal) ? self.weightTotal : 100)").message("weights must sum to weightTotal (100 unless set)"),
    validation = Rule::new("!has(self.split) || self.split != 'Exact' || (has(self.granularity) && self.granularity == 'Namespace')").message("split Exact apportions namespaces: it needs granularity Namespace"),
)]
pub struct RoutingSpec {
    /// What is hashed for the weight split.
    #[serde(default)]
    pub granularity: Granularity,
    /// How the weights divide keys: `Exact` (the default with `Namespace`
    /// granularity) or `Hash` (the default, and the only choice, with
    /// `Object` granularity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    /// Single objects sent to one subset, before any other rule: an
    /// emergency override for one object (`kubectl opmesh pin`).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub object_pins: Vec<ObjectPinSpec>,
    /// Namespace pins, evaluated in order; the first match wins.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub pins: Vec<PinSpec>,
    /// The share of each subset for keys no pin matches, in units of
    /// `weightTotal`. Subsets without an entry get no share.
    #[schemars(length(min = 1, max = 16))]
    pub weights: Vec<WeightSpec>,
    /// The sum the weights must reach: 100 by default, 10000 for basis points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub weight_total: Option<u32>,
    /// The subset that owns cluster-scoped objects. Unset means none does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub cluster_scoped: Option<String>,
    /// Namespaces that no subset sees.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63)))]
    pub exclude: Vec<String>,
}

/// Sends matching namespaces to one subset. A pin matches a namespace if any
/// of its set fields matches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinSpec {
    /// The subset that gets the matching namespaces.
    #[schemars(length(max = 63))]
    pub subset: String,
    /// Namespaces by name.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    /// Namespaces by label; a label change re-routes the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespaces whose whole name matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub namespace_regex: Option<String>,
}

/// Sends one object (all of its controllers' keys) to one subset.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectPinSpec {
    /// The object: `namespace/name`, or `name` if cluster-scoped.
    #[schemars(length(min = 1, max = 317))]
    pub object: String,
    /// The subset that gets it.
    #[schemars(length(max = 63))]
    pub subset: String,
}

/// One subset's share of the weight split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightSpec {
    /// The subset.
    #[schemars(length(max = 63))]
    pub subset: String,
    /// Its share, in units of `weightTotal`.
    #[schemars(range(max = 1000000))]
    pub weight: u32,
}

/// Observed state of an `OperatorMesh`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperatorMeshStatus {
    /// The generation of the spec the manager last processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Per-subset counts.
    #[serde(default)]
    pub subsets: Vec<SubsetStatus>,
    /// One-line summary for `kubectl get`, e.g. `v1:2/2 v2:1/1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The weights in force, e.g. `v1=80 v2=20`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// The observed share of keys per subset, e.g. `v1=95.2% v2=4.8%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
}

/// Counts for one subset.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubsetStatus {
    /// The subset's name.
    pub name: String,
    /// Connected runtimes in this subset.
    pub replicas: u32,
    /// Connected runtimes whose assignment is fully sent.
    pub ready_replicas: u32,
    /// Keys currently owned by the subset's runtimes.
    pub owned_keys: u64,
    /// The subset's share of the weights, e.g. `5%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_share: Option<String>,
    /// Keys the policy routes to this subset, pins included.
    #[serde(default)]
    pub routed_keys: u64,
    /// The share of all routed keys the policy sends to this subset, e.g.
    /// `4.8%`: what the configured share amounts to for the keys that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_share: Option<String>,
}

/// The CRD manifest as YAML, as committed under `deploy/crds/` and in the
/// Helm chart's `crds/`. It carries the label every installed object of
/// opmesh has, since Helm does not template CRDs.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    let mut crd = OperatorMesh::crd();
    crd.metadata.labels = Some(BTreeMap::from([(
        "app.kubernetes.io/part-of".to_string(),
        "opmesh".to_string(),
    )]));
    serde_norway::to_string(&crd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_the_rust_types() {
        let generated = crd_yaml().unwrap();
        for (path, committed) in [
            (
                "deploy/crds/opmesh.io_operatormeshes.yaml",
                include_str!("../../deploy/crds/opmesh.io_operatormeshes.yaml"),
            ),
            (
                "deploy/helm/opmesh/crds/opmesh.io_operatormeshes.yaml",
                include_str!("../../deploy/helm/opmesh/crds/opmesh.io_operatormeshes.yaml"),
            ),
        ] {
            assert!(
                committed == generated,
                "{path} is stale; regenerate both copies with `cargo run -p opmesh-manager -- crd \
                 | tee deploy/crds/opmesh.io_operatormeshes.yaml \
                 > deploy/helm/opmesh/crds/opmesh.io_operatormeshes.yaml`"
            );
        }
    }
}
