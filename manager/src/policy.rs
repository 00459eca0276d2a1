//! Compiles an `OperatorMeshSpec` into a [`Policy`] that routes keys: the
//! pure routing function, with its [`selector`] matching and [`routing`]
//! arithmetic (weight ranges, replica ring).
//!
//! Compilation checks everything the CRD's CEL rules check, plus what CEL
//! cannot (regexes, selector operators), so a policy that reaches the router
//! is always valid. An invalid spec yields a [`PolicyError`] whose message
//! names the field to fix; the caller keeps the last valid policy in force.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use regex::Regex;

mod routing;
pub(crate) mod selector;

pub(crate) use routing::ReplicaRing;
pub(crate) use selector::Labels;

use crate::crd::{Granularity, OperatorMeshSpec, Split, TypeRef};
use routing::{WeightRanges, weight_hash};

/// Result type of this module.
pub(crate) type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// Why a spec is not a valid policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PolicyError {
    /// `spec.subsets` is empty.
    #[error("spec.subsets is empty; declare at least one subset")]
    NoSubsets,
    /// `spec.controllers` is empty.
    #[error(
        "spec.controllers is empty; name the operator's primary type and the types it owns \
         (the manager routes only those)"
    )]
    NoControllers,
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
    /// The exact split was asked for with object granularity.
    #[error(
        "spec.routing.split Exact apportions the namespaces that exist, so it needs \
         spec.routing.granularity Namespace; with Object granularity use split Hash"
    )]
    ExactNeedsNamespaces,
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
    split: Split,
    pins: Vec<Pin>,
    /// Subsets of single objects (`namespace/name`), checked first: the
    /// pin's index and its subset.
    object_pins: HashMap<String, (usize, usize)>,
    ranges: WeightRanges,
    weights: Vec<u64>,
    total: u64,
    cluster_scoped: Option<usize>,
    exclude: HashSet<String>,
    namespace_selector: Option<LabelSelector>,
    pod_selector: LabelSelector,
    paused: bool,
    controllers: Declared,
    runtime_namespaces: Vec<String>,
}

/// The types a mesh routes, as `spec.controllers` declares them: primary
/// type key -> owned type keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Declared(BTreeMap<String, BTreeSet<String>>);

/// Which subset each namespace gets under the exact split.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Apportionment(HashMap<String, usize>);

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

/// The rule that places a key, as [`Policy::explain`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// A cluster-scoped object: `spec.routing.clusterScoped`'s subset, if
    /// set.
    ClusterScoped(Option<usize>),
    /// Its namespace is in `spec.routing.exclude`.
    Excluded,
    /// Its namespace does not match `spec.namespaceSelector`.
    NotSelected,
    /// `spec.routing.objectPins[index]` names the object.
    ObjectPinned {
        /// The pin's index.
        index: usize,
        /// Its subset.
        subset: usize,
    },
    /// `spec.routing.pins[index]` matches its namespace.
    Pinned {
        /// The pin's index.
        index: usize,
        /// Its subset.
        subset: usize,
    },
    /// The exact split gave its namespace to `subset`.
    Apportioned {
        /// The subset.
        subset: usize,
    },
    /// The exact split has not seen its namespace yet.
    NotApportioned,
    /// The weight hash of `hashed` (the namespace, or the object's
    /// `namespace/name`) falls in `subset`'s range.
    Hashed {
        /// What was hashed.
        hashed: String,
        /// Its weight hash.
        hash: u64,
        /// The subset whose range holds it.
        subset: usize,
    },
}

// === impl Apportionment ===

impl Apportionment {
    /// The namespaces the split divides.
    pub(crate) fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

// === impl Placement ===

impl Placement {
    /// The subset the key goes to, if any.
    pub(crate) fn subset(&self) -> Option<usize> {
        match self {
            Self::ClusterScoped(s) => *s,
            Self::Excluded | Self::NotSelected | Self::NotApportioned => None,
            Self::Pinned { subset, .. }
            | Self::ObjectPinned { subset, .. }
            | Self::Apportioned { subset }
            | Self::Hashed { subset, .. } => Some(*subset),
        }
    }
}

// === impl Declared ===

impl Declared {
    /// Each declared controller: its primary type key and its owned type
    /// keys.
    pub(crate) fn controllers(&self) -> impl Iterator<Item = (&String, &BTreeSet<String>)> {
        self.0.iter()
    }

    /// Every declared type key, primary or owned, once.
    pub(crate) fn types(&self) -> BTreeSet<&String> {
        self.0
            .iter()
            .flat_map(|(primary, owns)| std::iter::once(primary).chain(owns))
            .collect()
    }

    /// Why a runtime whose operator runs `controllers` (primary type key,
    /// owned type keys) may not join, if it may not. The mesh declares the
    /// types it routes: each controller must be one of spec.controllers,
    /// owning no type spec.controllers does not list for it, and every
    /// declared controller must run behind the runtime, since any of its
    /// keys may be routed there.
    pub(crate) fn undeclared(&self, controllers: &[(String, Vec<String>)]) -> Option<String> {
        let list = |keys: &mut dyn Iterator<Item = &String>| {
            keys.map(String::as_str).collect::<Vec<_>>().join(", ")
        };
        for (primary, owns) in controllers {
            let Some(owned) = self.0.get(primary) else {
                return Some(format!(
                    "its primary type {primary} is not one of spec.controllers' primaries ({})",
                    list(&mut self.0.keys())
                ));
            };
            let extra: Vec<&str> = owns
                .iter()
                .filter(|o| !owned.contains(*o))
                .map(String::as_str)
                .collect();
            if !extra.is_empty() {
                return Some(format!(
                    "it declares owned types the mesh does not route for {primary}: {} \
                     (spec.controllers lists: {})",
                    extra.join(", "),
                    list(&mut owned.iter())
                ));
            }
        }
        let missing: Vec<&str> = self
            .0
            .keys()
            .filter(|p| !controllers.iter().any(|(c, _)| c == *p))
            .map(String::as_str)
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "its operator does not run the controller of {}, which spec.controllers declares; \
                 every runtime of a mesh runs all of its controllers",
                missing.join(", ")
            )
        })
    }
}

// === impl Policy ===

impl Policy {
    /// The types this policy routes.
    pub(crate) fn declared(&self) -> &Declared {
        &self.controllers
    }

    /// Namespaces besides the mesh's own whose pods may join.
    pub(crate) fn runtime_namespaces(&self) -> &[String] {
        &self.runtime_namespaces
    }

    /// Compiles and validates `spec`.
    pub(crate) fn compile(spec: &OperatorMeshSpec) -> Result<Self> {
        if spec.subsets.is_empty() {
            return Err(PolicyError::NoSubsets);
        }
        if spec.controllers.is_empty() {
            return Err(PolicyError::NoControllers);
        }
        let mut controllers = Declared::default();
        for c in &spec.controllers {
            controllers
                .0
                .entry(c.primary.key())
                .or_default()
                .extend(c.owns.iter().map(TypeRef::key));
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

        let mut object_pins = HashMap::new();
        for (i, pin) in routing.object_pins.iter().enumerate() {
            let subset = lookup(format!("spec.routing.objectPins[{i}].subset"), &pin.subset)?;
            // The last pin of an object wins, as a later edit would.
            object_pins.insert(pin.object.clone(), (i, subset));
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
        let split = match (routing.split, routing.granularity) {
            (Some(Split::Exact), Granularity::Object) => {
                return Err(PolicyError::ExactNeedsNamespaces);
            }
            (Some(split), _) => split,
            (None, Granularity::Namespace) => Split::Exact,
            (None, Granularity::Object) => Split::Hash,
        };
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
            split,
            pins,
            object_pins,
            ranges,
            weights,
            total,
            cluster_scoped,
            exclude: routing.exclude.iter().cloned().collect(),
            namespace_selector: spec.namespace_selector.clone(),
            pod_selector: spec.selector.clone(),
            paused: spec.paused,
            runtime_namespaces: spec.runtime_namespaces.clone(),
            controllers,
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

    /// The subset a pin sends namespace `ns` to, if any.
    fn pinned(&self, ns: &str, ns_labels: &Labels) -> Option<usize> {
        self.pin_index(ns, ns_labels).map(|i| self.pins[i].subset)
    }

    /// The first pin that matches namespace `ns`, by its index in
    /// `spec.routing.pins`.
    fn pin_index(&self, ns: &str, ns_labels: &Labels) -> Option<usize> {
        self.pins.iter().position(|pin| {
            pin.namespaces.contains(ns)
                || pin
                    .selector
                    .as_ref()
                    .is_some_and(|sel| selector::matches(sel, ns_labels))
                || pin.regex.as_ref().is_some_and(|re| re.is_match(ns))
        })
    }

    /// Subset `i`'s share of the weight hash space, as `(start, end)` in
    /// units of 2⁶⁴ (end exclusive), for explaining a hashed key.
    pub(crate) fn hash_range(&self, i: usize) -> (u128, u128) {
        self.ranges.range(i)
    }

    /// The exact split of `namespaces` (the namespaces that hold the mesh's
    /// keys, with their labels), for this policy: those the weights divide
    /// (covered, not pinned), sorted by [`weight_hash`] (then name), in
    /// blocks per subset in declared order. Empty unless the policy uses
    /// [`Split::Exact`].
    pub(crate) fn apportion<'a>(
        &self,
        namespaces: impl IntoIterator<Item = (&'a String, &'a Labels)>,
    ) -> Apportionment {
        if self.split != Split::Exact {
            return Apportionment::default();
        }
        let mut split: Vec<(u64, &str)> = namespaces
            .into_iter()
            .filter(|(ns, labels)| {
                self.covers_namespace(ns, labels) && self.pinned(ns, labels).is_none()
            })
            .map(|(ns, _)| (weight_hash(ns), ns.as_str()))
            .collect();
        split.sort_unstable();
        let mut subset_of = HashMap::with_capacity(split.len());
        let mut start = 0;
        for (subset, end) in self.ranges.boundaries(split.len()).into_iter().enumerate() {
            for (_, ns) in &split[start..end.max(start)] {
                subset_of.insert((*ns).to_string(), subset);
            }
            start = start.max(end);
        }
        Apportionment(subset_of)
    }

    /// Routes a primary key (`namespace/name`, or `name` for a cluster-scoped
    /// object) to a subset index. `ns_labels` are the namespace's labels and
    /// `exact` the current [`Policy::apportion`]. Returns `None` when no
    /// subset may see the key (yet: with the exact split, a namespace the
    /// manager has not seen is not routed until it has).
    pub(crate) fn route(
        &self,
        key: &str,
        ns_labels: &Labels,
        exact: &Apportionment,
    ) -> Option<usize> {
        self.explain(key, ns_labels, exact).subset()
    }

    /// Why [`Policy::route`] sends `key` where it does: the rule that
    /// decides, and the subset.
    pub(crate) fn explain(
        &self,
        key: &str,
        ns_labels: &Labels,
        exact: &Apportionment,
    ) -> Placement {
        if let Some(&(index, subset)) = self.object_pins.get(opmesh_proto::parse_key(key).0) {
            return Placement::ObjectPinned { index, subset };
        }
        let Some((ns, _)) = key.split_once('/') else {
            return Placement::ClusterScoped(self.cluster_scoped);
        };
        if !ns.is_empty() && self.exclude.contains(ns) {
            return Placement::Excluded;
        }
        if !self.covers_namespace(ns, ns_labels) {
            return Placement::NotSelected;
        }
        if let Some(index) = self.pin_index(ns, ns_labels) {
            return Placement::Pinned {
                index,
                subset: self.pins[index].subset,
            };
        }
        match (self.split, self.granularity) {
            (Split::Exact, _) => match exact.0.get(ns) {
                Some(&subset) => Placement::Apportioned { subset },
                None => Placement::NotApportioned,
            },
            (Split::Hash, granularity) => {
                let hashed = match granularity {
                    Granularity::Namespace => ns,
                    // The object, not its type: an object's controllers agree.
                    Granularity::Object => opmesh_proto::parse_key(key).0,
                };
                let hash = weight_hash(hashed);
                Placement::Hashed {
                    hashed: hashed.to_string(),
                    hash,
                    subset: self.ranges.subset_of(hash),
                }
            }
        }
    }

    /// Each subset's configured share of the weight split, in percent.
    pub(crate) fn shares(&self) -> Vec<f64> {
        self.weights
            .iter()
            .map(|w| *w as f64 * 100.0 / self.total as f64)
            .collect()
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
mod tests;
