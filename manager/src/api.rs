//! The admin API's wire types: JSON over HTTPS on the manager's
//! `--admin-listen` address, under [`PREFIX`]. `kubectl opmesh` speaks it;
//! so can `curl` with a bearer token.
//!
//! | method and path (under [`PREFIX`]) | verb checked | answer |
//! |---|---|---|
//! | `GET /meshes` | `list` (all namespaces) | [`MeshList`] |
//! | `GET /namespaces/{ns}/meshes` | `list` | [`MeshList`] |
//! | `GET /namespaces/{ns}/meshes/{name}` | `get` | [`MeshStatus`] |
//! | `GET …/{name}/keys?subset=&replica=&limit=&continue=` | `get` | [`KeyList`] |
//! | `GET …/{name}/explain?key=ns/name` | `get` | [`Explanation`] |
//! | `POST …/{name}/plan` ([`PlanRequest`]) | `get` | [`Plan`] |
//! | `POST …/{name}/weights` ([`WeightsRequest`]) | `patch` | [`ActionResult`] |
//! | `POST …/{name}/pause`, `POST …/{name}/resume` | `patch` | [`ActionResult`] |
//! | `POST …/{name}/pin` ([`PinRequest`]), `POST …/{name}/unpin` ([`UnpinRequest`]) | `patch` | [`ActionResult`] |
//! | `POST …/{name}/drain` ([`DrainRequest`]) | `patch` on `operatormeshes/drain` | [`ActionResult`] |
//! | `GET …/{name}/analysis?canary=&stable=&windowSeconds=&minSamples=` | `get` | [`Analysis`] |
//! | `GET …/{name}/rollout` | `get` | [`Rollout`] |
//! | `POST …/{name}/rollout/promote`, `…/abort`, `…/retry` | `patch` | [`ActionResult`] |
//!
//! Every call needs `Authorization: Bearer <token>`; the verb is checked
//! against the caller's RBAC on `operatormeshes.opmesh.io`. Errors are a
//! [`Status`]: 401 without a valid token, 403 without the grant, 404 for an
//! unknown mesh, 422 for a change the mesh's policy would refuse, and 503
//! from a standby manager, naming the leader.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crd::OperatorMeshSpec;

/// The path every admin call starts with.
pub const PREFIX: &str = "/apis/admin.opmesh.io/v1alpha1";

/// Meshes, in namespace and name order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshList {
    /// The meshes.
    pub items: Vec<MeshStatus>,
}

/// One mesh as the leading manager sees it now.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The mesh's namespace.
    pub namespace: String,
    /// The mesh's name.
    pub name: String,
    /// The spec generation the manager processed last.
    pub generation: Option<i64>,
    /// Why the latest spec is refused, if it is (the last valid one stays
    /// in force).
    pub invalid: Option<String>,
    /// True while ownership changes are frozen.
    pub paused: bool,
    /// The weights in force, e.g. `v1=90 v2=10`.
    pub weights: String,
    /// The subsets in declared order.
    pub subsets: Vec<SubsetStatus>,
    /// Keys held by a runtime.
    pub held_keys: usize,
    /// Keys the policy routes that no runtime holds.
    pub unowned_keys: usize,
    /// Keys being moved: revoked from their holder, not yet released.
    pub moving: usize,
    /// The first moving keys, at most [`MOVING_SHOWN`].
    pub moving_keys: Vec<String>,
}

/// How many moving keys a [`MeshStatus`] lists.
pub const MOVING_SHOWN: usize = 100;

/// One subset.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubsetStatus {
    /// The subset's name.
    pub name: String,
    /// Its share of the weights, in percent.
    pub configured_share: f64,
    /// The share of routed keys the policy sends it, in percent.
    pub observed_share: f64,
    /// Keys the policy routes to it.
    pub routed_keys: u64,
    /// Its connected runtimes.
    pub replicas: Vec<ReplicaStatus>,
}

/// One connected runtime.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Its pod, `namespace/name`.
    pub pod: String,
    /// Its session number (a reconnect is a new session).
    pub session: u64,
    /// True when everything queued for it has been sent.
    pub ready: bool,
    /// Keys it holds, not counting those being revoked.
    pub owned_keys: u64,
    /// True while it is drained: it gets no keys, and its keys move off.
    #[serde(default)]
    pub draining: bool,
    /// Keys waiting in its queue, at its last heartbeat.
    #[serde(default)]
    pub queue_depth: u32,
    /// Reconciles running, at its last heartbeat.
    #[serde(default)]
    pub in_flight: u32,
    /// Reconciles it runs at once.
    #[serde(default)]
    pub capacity: u32,
    /// Messages queued for it in the manager and not yet sent.
    #[serde(default)]
    pub pending_messages: u64,
    /// Milliseconds since it was last heard from.
    pub last_contact_ms: u64,
    /// Milliseconds until its lease runs out unless renewed.
    pub lease_remaining_ms: u64,
}

/// A page of a mesh's held keys, in key order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyList {
    /// The keys.
    pub items: Vec<KeyStatus>,
    /// Pass as `continue` for the next page; absent on the last.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub continue_: Option<String>,
}

/// One held key.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// The key: `namespace/name@Kind.version.group`.
    pub key: String,
    /// The holder's subset.
    pub subset: Option<String>,
    /// The holder's pod.
    pub replica: String,
    /// True while it is being revoked from that holder.
    pub moving: bool,
}

/// Why an object's keys are where they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The object asked about: `namespace/name`, or `name` if
    /// cluster-scoped.
    pub object: String,
    /// The rule that decides: `Pinned`, `Apportioned`, `Hashed`,
    /// `NotApportioned`, `Excluded`, `NotSelected` or `ClusterScoped`.
    pub rule: String,
    /// The rule in words, e.g. which pin or which weight range.
    pub detail: String,
    /// The subset the policy sends it to, if any.
    pub subset: Option<String>,
    /// The replica of that subset the ring picks, if it has any.
    pub replica: Option<String>,
    /// The object's keys (one per controller type) that a runtime holds.
    pub keys: Vec<KeyStatus>,
    /// Its last reconciles as runtimes reported them, newest first (at most
    /// five per key).
    #[serde(default)]
    pub outcomes: Vec<Outcome>,
}

/// How one reconcile ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// The key reconciled.
    pub key: String,
    /// When it finished, in Unix milliseconds.
    pub finished_unix_ms: i64,
    /// `success` or `error`.
    pub result: String,
    /// The error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it ran, in milliseconds.
    pub duration_ms: f64,
    /// How long the key waited in the queue first, in milliseconds.
    pub queue_wait_ms: f64,
    /// The operator version that ran it.
    pub operator_version: String,
    /// The primary object's generation it reconciled.
    pub generation: i64,
    /// The subset of the runtime that ran it.
    pub subset: String,
    /// That runtime's pod.
    pub replica: String,
}

/// A change to plan: new weights, or a whole new spec.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRequest {
    /// New weights by subset (subsets left out get 0).
    pub weights: Option<BTreeMap<String, u32>>,
    /// A new spec.
    pub spec: Option<OperatorMeshSpec>,
}

/// What a change would do. Nothing is changed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The held keys whose subset would change, in key order.
    pub moves: Vec<KeyMove>,
    /// Keys per subset now.
    pub before: Vec<Share>,
    /// Keys per subset after the change.
    pub after: Vec<Share>,
}

/// One key a change would move.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyMove {
    /// The key.
    pub key: String,
    /// Its subset now, if any.
    pub from: Option<String>,
    /// Its subset after the change, if any.
    pub to: Option<String>,
}

/// A subset's keys and share.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Share {
    /// The subset.
    pub subset: String,
    /// Held keys routed to it.
    pub keys: u64,
    /// Their share of all held keys, in percent.
    pub percent: f64,
}

/// New weights, by subset; subsets left out get 0.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WeightsRequest {
    /// Weight by subset name.
    pub weights: BTreeMap<String, u32>,
}

/// Pin one object to a subset (`spec.routing.objectPins`), ahead of every
/// other rule.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PinRequest {
    /// The object: `namespace/name`, or `name` if cluster-scoped.
    pub object: String,
    /// The subset.
    pub subset: String,
}

/// Remove an object's pin.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnpinRequest {
    /// The object.
    pub object: String,
}

/// Drain a replica: move all of its keys to its subset's other replicas
/// before its pod is deleted. Recorded on the mesh (annotation
/// `opmesh.io/drain`, with the pod's UID), so a new leader keeps it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainRequest {
    /// The replica's pod: `name` in the mesh's namespace, or
    /// `namespace/name`.
    pub pod: String,
    /// Stop draining it instead.
    #[serde(default)]
    pub undo: bool,
}

/// What an action changed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActionResult {
    /// What was done.
    pub message: String,
    /// The mesh's generation after the change.
    pub generation: Option<i64>,
}

/// A canary subset's reconciles compared with stable's over one window.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// `Pass`, `Fail`, or `Wait` (too few reconciles to say).
    pub verdict: String,
    /// Why it failed, or what it waits for.
    pub reasons: Vec<String>,
    /// The window, in seconds.
    pub window_seconds: u64,
    /// Reconciles each side needs.
    pub min_samples: u64,
    /// The canary's numbers.
    pub canary: SubsetAnalysis,
    /// Stable's numbers.
    pub stable: SubsetAnalysis,
}

/// One side of an [`Analysis`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubsetAnalysis {
    /// The subset.
    pub subset: String,
    /// Reconciles reported in the window.
    pub reconciles: u64,
    /// Of which failed.
    pub errors: u64,
    /// Failed per reconcile, in percent.
    pub error_rate_percent: f64,
    /// 99th percentile duration, in milliseconds.
    pub p99_ms: f64,
    /// Reconciles per distinct (key, generation).
    pub reconciles_per_generation: f64,
}

/// A mesh's rollout: what is declared and where it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// `spec.rollout`.
    pub spec: Option<crate::crd::RolloutSpec>,
    /// `status.rollout`.
    pub status: Option<crate::crd::RolloutStatus>,
}

/// An error, shaped like a Kubernetes `Status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Always `Status`.
    pub kind: String,
    /// The HTTP status code.
    pub code: u16,
    /// A CamelCase reason, e.g. `Forbidden`.
    pub reason: String,
    /// What went wrong and what to do.
    pub message: String,
    /// From a standby manager: the leader's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}
