//! Compiles an `OperatorMeshSpec` into a [`Policy`] that routes keys: the
//! pure routing function, with its [`selector`] matching and [`routing`]
//! arithmetic (weight ranges, replica ring).
//!
//! Compilation checks everything the CRD's CEL rules check, plus what CEL
//! cannot (regexes, selector operators), so a policy that reaches the router
//! is always valid. An invalid spec yields a [`PolicyError`] whose message
//! names the field to fix; the caller keeps the last valid policy in force.

use std::collections::{HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use regex::Regex;

mod routing;
mod selector;

pub(crate) use routing::ReplicaRing;
pub(crate) use selector::Labels;

use crate::crd::{Granularity, OperatorMeshSpec};
use routing::{WeightRanges, fnv1a64};

/// Result type of this module.
pub(crate) type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// Why a spec is not a valid policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PolicyError {
    /// `spec.subsets` is empty.
    #[error("spec.subsets is empty; declare at least one subset")]
    NoSubsets,
    /// Two subsets share a name.
    #[error("spec.subsets has two subsets named {0:?}; subset names must be unique")]
    DuplicateSubset(String),
    /// A field names a subset that is not declared.
    #[error("{field} names subset {name:?}, which is not in spec.subsets")]
    UnknownSubset {
        /// The field, e.g. `spec.routing.pins[0].subset`.
        field: String,
        /// The unknown name.
        name: String,
    },
    /// The weights do not add up to the total.
    #[error("spec.routing.weights sum to {sum}, but must sum to {total}")]
    WeightSum {
        /// The sum found.
        sum: u64,
        /// The required total.
        total: u64,
    },
    /// A pin's regex does not compile.
    #[error("spec.routing.pins[{index}].namespaceRegex {regex:?} is not a valid regex: {reason}")]
    BadRegex {
        /// The pin's index.
        index: usize,
        /// The regex.
        regex: String,
        /// The compiler's message.
        reason: String,
    },
    /// A label selector is malformed.
    #[error("{field}: {reason}")]
    BadSelector {
        /// The field holding the selector.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// A compiled, valid routing policy.
#[derive(Debug)]
pub(crate) struct Policy {
    subsets: Vec<Subset>,
    granularity: Granularity,
    pins: Vec<Pin>,
    ranges: WeightRanges,
    weights: Vec<u64>,
    total: u64,
    cluster_scoped: Option<usize>,
    exclude: HashSet<String>,
    namespace_selector: Option<LabelSelector>,
    pod_selector: LabelSelector,
    paused: bool,
}

/// One subset: a name and the pod labels that select it.
#[derive(Debug)]
pub(crate) struct Subset {
    /// The subset's name.
    pub(crate) name: String,
    /// The pod labels that put a pod in this subset.
    pub(crate) labels: Labels,
}

#[derive(Debug)]
struct Pin {
    subset: usize,
    namespaces: HashSet<String>,
    selector: Option<LabelSelector>,
    regex: Option<Regex>,
}

/// Why a runtime's Pod cannot join the mesh.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum MembershipError {
    /// The Pod's labels do not match `spec.selector`.
    #[error("pod labels {0:?} do not match the mesh's spec.selector")]
    SelectorMismatch(Labels),
    /// No subset's labels match the Pod.
    #[error("pod labels {0:?} match no subset in spec.subsets")]
    NoSubset(Labels),
}

// === impl Policy ===

impl Policy {
    /// Compiles and validates `spec`.
    pub(crate) fn compile(spec: &OperatorMeshSpec) -> Result<Self> {
        if spec.subsets.is_empty() {
            return Err(PolicyError::NoSubsets);
        }
        let mut index = HashMap::new();
        for (i, s) in spec.subsets.iter().enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(PolicyError::DuplicateSubset(s.name.clone()));
            }
        }
        let lookup = |field: String, name: &str| {
            index
                .get(name)
                .copied()
                .ok_or_else(|| PolicyError::UnknownSubset {
                    field,
                    name: name.to_string(),
                })
        };
        let check_selector = |field: String, sel: &LabelSelector| {
            selector::validate(sel).map_err(|reason| PolicyError::BadSelector { field, reason })
        };
        check_selector("spec.selector".into(), &spec.selector)?;
        if let Some(sel) = &spec.namespace_selector {
            check_selector("spec.namespaceSelector".into(), sel)?;
        }

        let routing = &spec.routing;
        let mut pins = Vec::with_capacity(routing.pins.len());
        for (i, pin) in routing.pins.iter().enumerate() {
            let subset = lookup(format!("spec.routing.pins[{i}].subset"), &pin.subset)?;
            if let Some(sel) = &pin.namespace_selector {
                check_selector(format!("spec.routing.pins[{i}].namespaceSelector"), sel)?;
            }
            let regex = pin
                .namespace_regex
                .as_ref()
                .map(|re| {
                    // Anchor so the pattern must match the whole name, as users
                    // expect from "namespaces matching team-.*".
                    Regex::new(&format!("^(?:{re})$")).map_err(|e| PolicyError::BadRegex {
                        index: i,
                        regex: re.clone(),
                        reason: e.to_string(),
                    })
                })
                .transpose()?;
            pins.push(Pin {
                subset,
                namespaces: pin.namespaces.iter().cloned().collect(),
                selector: pin.namespace_selector.clone(),
                regex,
            });
        }

        let mut weights = vec![0u64; spec.subsets.len()];
        for (i, w) in routing.weights.iter().enumerate() {
            let s = lookup(format!("spec.routing.weights[{i}].subset"), &w.subset)?;
            weights[s] += u64::from(w.weight);
        }
        let total = u64::from(routing.weight_total.unwrap_or(100));
        let sum: u64 = weights.iter().sum();
        let ranges =
            WeightRanges::new(&weights, total).ok_or(PolicyError::WeightSum { sum, total })?;
        let cluster_scoped = routing
            .cluster_scoped
            .as_ref()
            .map(|name| lookup("spec.routing.clusterScoped".into(), name))
            .transpose()?;

        Ok(Self {
            subsets: spec
                .subsets
                .iter()
                .map(|s| Subset {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                })
                .collect(),
            granularity: routing.granularity,
            pins,
            ranges,
            weights,
            total,
            cluster_scoped,
            exclude: routing.exclude.iter().cloned().collect(),
            namespace_selector: spec.namespace_selector.clone(),
            pod_selector: spec.selector.clone(),
            paused: spec.paused,
        })
    }

    /// The subsets in declared order.
    pub(crate) fn subsets(&self) -> &[Subset] {
        &self.subsets
    }

    /// True when ownership changes are frozen.
    pub(crate) fn paused(&self) -> bool {
        self.paused
    }

    /// The subset a Pod with `labels` belongs to: the first whose labels it
    /// carries, after checking the mesh's pod selector.
    pub(crate) fn subset_for_pod(&self, labels: &Labels) -> Result<usize, MembershipError> {
        if !selector::matches(&self.pod_selector, labels) {
            return Err(MembershipError::SelectorMismatch(labels.clone()));
        }
        self.subsets
            .iter()
            .position(|s| s.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .ok_or_else(|| MembershipError::NoSubset(labels.clone()))
    }

    /// True when objects in namespace `ns` (with `ns_labels`) belong to the mesh.
    pub(crate) fn covers_namespace(&self, ns: &str, ns_labels: &Labels) -> bool {
        if ns.is_empty() {
            return true;
        }
        !self.exclude.contains(ns)
            && self
                .namespace_selector
                .as_ref()
                .is_none_or(|sel| selector::matches(sel, ns_labels))
    }

    /// Routes a primary key (`namespace/name`, or `name` for a cluster-scoped
    /// object) to a subset index. `ns_labels` are the namespace's labels.
    /// Returns `None` when no subset may see the key.
    pub(crate) fn route(&self, key: &str, ns_labels: &Labels) -> Option<usize> {
        let Some((ns, _)) = key.split_once('/') else {
            return self.cluster_scoped;
        };
        if !self.covers_namespace(ns, ns_labels) {
            return None;
        }
        for pin in &self.pins {
            let hit = pin.namespaces.contains(ns)
                || pin
                    .selector
                    .as_ref()
                    .is_some_and(|sel| selector::matches(sel, ns_labels))
                || pin.regex.as_ref().is_some_and(|re| re.is_match(ns));
            if hit {
                return Some(pin.subset);
            }
        }
        let routed = match self.granularity {
            Granularity::Namespace => ns,
            Granularity::Object => key,
        };
        Some(self.ranges.subset_of(fnv1a64(routed)))
    }

    /// The weights in force, e.g. `v1=80 v2=20`.
    pub(crate) fn weights_summary(&self) -> String {
        let unit = if self.total == 100 {
            String::new()
        } else {
            format!("/{}", self.total)
        };
        self.subsets
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| format!("{}={w}{unit}", s.name))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::crd::{PinSpec, RoutingSpec, SubsetSpec, WeightSpec};

    fn spec(weights: &[(&str, u32)], pins: Vec<PinSpec>) -> OperatorMeshSpec {
        OperatorMeshSpec {
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), "op".into())])),
                match_expressions: None,
            },
            subsets: ["v1", "v2"]
                .iter()
                .map(|v| SubsetSpec {
                    name: v.to_string(),
                    labels: BTreeMap::from([("version".into(), v.to_string())]),
                })
                .collect(),
            routing: RoutingSpec {
                granularity: Granularity::Object,
                pins,
                weights: weights
                    .iter()
                    .map(|(s, w)| WeightSpec {
                        subset: s.to_string(),
                        weight: *w,
                    })
                    .collect(),
                weight_total: None,
                cluster_scoped: Some("v1".into()),
                exclude: vec!["kube-system".into()],
            },
            paused: false,
            namespace_selector: None,
        }
    }

    fn pin(subset: &str) -> PinSpec {
        PinSpec {
            subset: subset.into(),
            namespaces: vec![],
            namespace_selector: None,
            namespace_regex: None,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pins_win_over_weights_in_order() {
        let mut by_name = pin("v2");
        by_name.namespaces = vec!["canary".into()];
        let mut by_regex = pin("v2");
        by_regex.namespace_regex = Some("team-.*".into());
        let mut by_label = pin("v1");
        by_label.namespace_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("tier".into(), "gold".into())])),
            match_expressions: None,
        });
        let p = Policy::compile(&spec(&[("v1", 100)], vec![by_name, by_label, by_regex])).unwrap();
        let none = Labels::new();
        assert_eq!(p.route("canary/a", &none), Some(1));
        assert_eq!(p.route("team-x/a", &none), Some(1));
        // The regex matches whole names only.
        assert_eq!(p.route("my-team-x/a", &none), Some(0));
        // The label pin comes before the regex pin.
        assert_eq!(p.route("team-x/a", &labels(&[("tier", "gold")])), Some(0));
        assert_eq!(p.route("kube-system/a", &none), None);
        assert_eq!(p.route("cluster-thing", &none), Some(0));
    }

    #[test]
    fn invalid_specs_say_what_to_fix() {
        let err = Policy::compile(&spec(&[("v1", 80), ("v2", 10)], vec![])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.routing.weights sum to 90, but must sum to 100"
        );

        let err = Policy::compile(&spec(&[("v1", 50), ("v3", 50)], vec![])).unwrap_err();
        assert!(
            err.to_string()
                .contains("weights[1].subset names subset \"v3\"")
        );

        let mut bad = pin("v2");
        bad.namespace_regex = Some("team-(".into());
        let err = Policy::compile(&spec(&[("v1", 100)], vec![bad])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spec.routing.pins[0].namespaceRegex \"team-(\"")
        );

        let mut dup = spec(&[("v1", 100)], vec![]);
        dup.subsets[1].name = "v1".into();
        assert_eq!(
            Policy::compile(&dup).unwrap_err(),
            PolicyError::DuplicateSubset("v1".into())
        );
    }

    #[test]
    fn pods_join_the_first_matching_subset() {
        let p = Policy::compile(&spec(&[("v1", 100)], vec![])).unwrap();
        assert_eq!(
            p.subset_for_pod(&labels(&[("app", "op"), ("version", "v2")])),
            Ok(1)
        );
        assert!(matches!(
            p.subset_for_pod(&labels(&[("app", "other"), ("version", "v2")])),
            Err(MembershipError::SelectorMismatch(_))
        ));
        assert!(matches!(
            p.subset_for_pod(&labels(&[("app", "op"), ("version", "v9")])),
            Err(MembershipError::NoSubset(_))
        ));
    }

    #[test]
    fn weights_summary_is_readable() {
        let p = Policy::compile(&spec(&[("v1", 80), ("v2", 20)], vec![])).unwrap();
        assert_eq!(p.weights_summary(), "v1=80 v2=20");
    }
}
