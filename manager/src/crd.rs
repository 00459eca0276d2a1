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
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".status.rollout.stepText"}"#,
    printcolumn = r#"{"name":"Canary","type":"string","jsonPath":".status.rollout.canaryShare"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.subsets.all(a, self.subsets.exists_one(b, b.name == a.name))").message("subset names must be unique"),
    validation = Rule::new("self.routing.pins.all(p, self.subsets.exists(s, s.name == p.subset))").message("every pin must name a subset listed in spec.subsets"),
    validation = Rule::new("self.routing.weights.all(w, self.subsets.exists(s, s.name == w.subset))").message("every weight must name a subset listed in spec.subsets"),
    validation = Rule::new("!has(self.routing.clusterScoped) || self.subsets.exists(s, s.name == self.routing.clusterScoped)").message("routing.clusterScoped must name a subset listed in spec.subsets"),
    validation = Rule::new("self.routing.objectPins.all(p, self.subsets.exists(s, s.name == p.subset))").message("every object pin must name a subset listed in spec.subsets"),
    validation = Rule::new("!has(self.rollout) || (self.subsets.exists(s, s.name == self.rollout.stable) && self.subsets.exists(s, s.name == self.rollout.canary) && self.rollout.stable != self.rollout.canary)").message("rollout.stable and rollout.canary must name two different subsets listed in spec.subsets"),
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
    /// Moves the keys from a stable subset to a canary subset through
    /// steps, analysing each step's reconciles and rolling back on its
    /// own (docs/rollout.md). While it runs, its weights replace
    /// `routing.weights`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
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

/// A canary rollout from `stable` to `canary`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The subset the keys come from.
    #[schemars(length(min = 1, max = 63))]
    pub stable: String,
    /// The subset the keys go to.
    #[schemars(length(min = 1, max = 63))]
    pub canary: String,
    /// The canary's revision (e.g. its image tag). A new revision starts
    /// the rollout over, also after a rollback.
    #[schemars(length(min = 1, max = 128))]
    pub revision: String,
    /// The steps, in order.
    #[schemars(length(min = 1, max = 32))]
    pub steps: Vec<RolloutStep>,
    /// Limits every analysis step applies unless it sets its own.
    #[serde(default)]
    pub analysis: AnalysisSpec,
    /// Lets every pause without a duration pass (for GitOps). `kubectl
    /// opmesh rollout promote` promotes only the current pause, with the
    /// annotation `opmesh.io/rollout-promote`, so it never carries over
    /// to a later revision.
    #[serde(default)]
    pub promote: bool,
    /// Stops the rollout and returns every key to stable (for GitOps).
    /// `kubectl opmesh rollout abort` aborts only the current run, with
    /// the annotation `opmesh.io/rollout-abort`.
    #[serde(default)]
    pub abort: bool,
    /// Raise to start a rolled-back or aborted rollout of the same revision
    /// again.
    #[serde(default)]
    pub retry: u32,
}

/// One rollout step: exactly one of its fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.setWeight) ? 1 : 0) + (has(self.pause) ? 1 : 0) + (has(self.analysis) ? 1 : 0) == 1").message("a rollout step sets exactly one of setWeight, pause and analysis"))]
pub struct RolloutStep {
    /// Give the canary this share of the keys, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub set_weight: Option<u32>,
    /// Wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
    /// Compare the canary's reconciles with stable's since the step began;
    /// roll back if it is worse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,
}

/// A pause: for `seconds`, or until promoted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    /// How long; unset waits until `rollout.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub seconds: Option<u32>,
}

/// An analysis's limits; unset fields take the rollout's, then the
/// defaults (docs/rollout.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// How long the step bakes: it passes only after this, with its minimum
    /// sample; it fails as soon as the numbers say so (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 900))]
    pub seconds: Option<u32>,
    /// Reconciles each side needs before any verdict (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub min_samples: Option<u32>,
    /// Fail when the canary's error rate exceeds stable's times this, and
    /// significantly (default 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_ratio: Option<f64>,
    /// Fail when the canary's error rate exceeds this, in percent, whatever
    /// stable's (default: no such limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_percent: Option<f64>,
    /// Fail when the canary's p99 exceeds stable's times this, plus 50 ms
    /// (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Fail above this many reconciles per generation when also three
    /// times stable's (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_reconciles_per_generation: Option<f64>,
    /// A key lags when its latest generation has not been reconciled
    /// successfully this many seconds after it appeared (counted from the
    /// analysis's start at the earliest). Fail when the canary has lagging
    /// keys, and a larger share of its keys lag than stable's times
    /// `maxErrorRatio` (default 60). Needs no minimum sample: a canary
    /// that stalls reports no reconciles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub max_generation_lag_seconds: Option<u32>,
    /// Fail when more than this percentage of the canary's reconciles had
    /// a write refused (by the fence, or with 409 Conflict), whatever
    /// stable's. Without it, the canary fails when its share is
    /// significantly above stable's times `maxErrorRatio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_refused_write_percent: Option<f64>,
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
    /// Where the rollout is; the manager resumes from it after a failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// A rollout's progress.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision this is about.
    pub revision: String,
    /// The `retry` it started under.
    #[serde(default)]
    pub retry: u32,
    /// `Progressing`, `Paused`, `Analyzing`, `Promoted` or `RolledBack`.
    pub phase: String,
    /// The current step's index.
    pub step: u32,
    /// `2/7` for `kubectl get`.
    #[serde(default)]
    pub step_text: String,
    /// When the current step began (RFC 3339).
    pub step_started_at: String,
    /// The canary's share of the keys now, in percent.
    pub weight: u32,
    /// The same, as `kubectl get` shows it (`25%`).
    #[serde(default)]
    pub canary_share: String,
    /// What happens next, or why it waits.
    #[serde(default)]
    pub message: String,
    /// Every analysis run so far, with its numbers.
    #[serde(default)]
    pub analyses: Vec<AnalysisRun>,
}

/// One analysis's result.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRun {
    /// The step.
    pub step: u32,
    /// `Pass` or `Fail`.
    pub verdict: String,
    /// Why it failed.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// When it ended (RFC 3339).
    pub at: String,
    /// Canary: reconciles, errors, error rate (%), p99 (ms), reconciles per
    /// generation.
    pub canary: String,
    /// Stable, the same.
    pub stable: String,
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
