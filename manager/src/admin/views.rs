//! The admin API's answers, computed from one published snapshot: pure
//! functions of the snapshot and the request.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Instant,
};

use http::StatusCode;

use crate::{
    analysis::{Stats, Verdict},
    api::{
        Analysis as ApiAnalysis, Explanation, KeyList, KeyMove, KeyStatus, MOVING_SHOWN,
        MeshStatus, Outcome as ApiOutcome, Plan, ReplicaStatus, Share, SubsetAnalysis,
        SubsetStatus,
    },
    crd::OperatorMeshSpec,
    id::{MeshId, PodId},
    policy::{Apportionment, Labels, Placement, Policy, ReplicaRing},
    snapshot::{MeshView, RoutingView},
};

/// An error answer: status and message.
type Failed = (StatusCode, String);

/// The most keys one page lists, and the default.
const MAX_PAGE: usize = 5000;
const DEFAULT_PAGE: usize = 500;

/// One mesh's status.
pub(super) fn mesh_status(id: &MeshId, view: &MeshView, now: Instant) -> MeshStatus {
    let routed: u64 = view.subsets.iter().map(|s| s.routed_keys).sum();
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    MeshStatus {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        generation: view.generation,
        invalid: view.invalid.clone(),
        paused: view.routing.as_ref().is_some_and(|r| r.policy.paused()),
        weights: view.weights.clone(),
        subsets: view
            .subsets
            .iter()
            .map(|s| SubsetStatus {
                name: s.name.clone(),
                configured_share: s.configured_share,
                observed_share: if routed == 0 {
                    0.0
                } else {
                    s.routed_keys as f64 * 100.0 / routed as f64
                },
                routed_keys: s.routed_keys,
                replicas: s
                    .replicas
                    .iter()
                    .map(|r| ReplicaStatus {
                        pod: r.holder.pod.to_string(),
                        session: r.holder.session.0,
                        ready: r.ready,
                        owned_keys: r.owned_keys,
                        draining: r.draining,
                        queue_depth: r.load.queue_depth,
                        in_flight: r.load.in_flight,
                        capacity: r.load.capacity,
                        pending_messages: r.pending as u64,
                        last_contact_ms: ms(now.saturating_duration_since(r.last_contact)),
                        lease_remaining_ms: ms(r.lease_until.saturating_duration_since(now)),
                    })
                    .collect(),
            })
            .collect(),
        held_keys: view.keys.len(),
        unowned_keys: view.unowned,
        moving: view.moving(),
        moving_keys: view
            .keys
            .iter()
            .filter(|(_, k)| k.moving)
            .map(|(k, _)| k.clone())
            .take(MOVING_SHOWN)
            .collect(),
    }
}

/// The subset each live replica pod is in.
fn subset_of_pods(view: &MeshView) -> HashMap<&PodId, &str> {
    view.subsets
        .iter()
        .flat_map(|s| {
            s.replicas
                .iter()
                .map(move |r| (&r.holder.pod, s.name.as_str()))
        })
        .collect()
}

/// A page of held keys, filtered by `subset` and `replica` (a pod
/// `namespace/name`, or just its name), after `continue`.
pub(super) fn keys(view: &MeshView, query: &BTreeMap<String, String>) -> Result<KeyList, Failed> {
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or((
                StatusCode::BAD_REQUEST,
                format!("limit must be a number from 1 to {MAX_PAGE}, not {l:?}"),
            ))?,
    };
    let subsets = subset_of_pods(view);
    let after = query.get("continue").cloned().unwrap_or_default();
    let subset = query.get("subset").filter(|s| !s.is_empty());
    let replica = query.get("replica").filter(|s| !s.is_empty());
    let mut items = Vec::new();
    let mut more = false;
    let range = view.keys.range::<String, _>((
        if after.is_empty() {
            std::ops::Bound::Unbounded
        } else {
            std::ops::Bound::Excluded(&after)
        },
        std::ops::Bound::Unbounded,
    ));
    for (key, k) in range {
        let in_subset = subsets.get(&k.holder.pod).copied();
        if subset.is_some_and(|s| Some(s.as_str()) != in_subset) {
            continue;
        }
        if replica.is_some_and(|r| *r != k.holder.pod.to_string() && *r != k.holder.pod.name) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(KeyStatus {
            key: key.clone(),
            subset: in_subset.map(str::to_string),
            replica: k.holder.pod.to_string(),
            moving: k.moving,
        });
    }
    let continue_ = more
        .then(|| items.last().map(|k: &KeyStatus| k.key.clone()))
        .flatten();
    Ok(KeyList { items, continue_ })
}

/// Why `object` (`namespace/name`, or `name`) is where it is.
pub(super) fn explain(view: &MeshView, object: &str) -> Result<Explanation, Failed> {
    let routing = view.routing.as_ref().ok_or((
        StatusCode::SERVICE_UNAVAILABLE,
        "the mesh has no valid policy in force yet".to_string(),
    ))?;
    let policy = &routing.policy;
    let placement = policy.explain(object, routing.labels_of(object), &routing.apportionment);
    let subset_name = |i: usize| policy.subsets().get(i).map(|s| s.name.clone());
    let subsets = subset_of_pods(view);
    let keys: Vec<KeyStatus> = view
        .keys
        .iter()
        .filter(|(k, _)| opmesh_proto::parse_key(k).0 == object)
        .map(|(k, v)| KeyStatus {
            key: k.clone(),
            subset: subsets.get(&v.holder.pod).map(|s| (*s).to_string()),
            replica: v.holder.pod.to_string(),
            moving: v.moving,
        })
        .collect();
    let subset = placement.subset();
    // The replica the ring picks among the subset's live replicas, for the
    // object's first held key (each key is placed on its own).
    let replica = subset.and_then(|i| {
        let key = keys.first()?;
        let pods: Vec<&PodId> = view
            .subsets
            .get(i)?
            .replicas
            .iter()
            .map(|r| &r.holder.pod)
            .collect();
        ReplicaRing::new(pods)
            .owner(&key.key)
            .map(|p| p.to_string())
    });
    let (rule, detail) = describe(&placement, policy);
    Ok(Explanation {
        object: object.to_string(),
        rule,
        detail,
        subset: subset.and_then(subset_name),
        replica,
        keys,
        outcomes: Vec::new(),
    })
}

/// Compares the `canary` and `stable` subsets' reconciles over the last
/// `windowSeconds` (default 300) as of `now_ms`, needing `minSamples`
/// (default 2000) on each side.
pub(super) fn analysis(
    id: &MeshId,
    view: &MeshView,
    query: &BTreeMap<String, String>,
    outcomes: &crate::outcomes::Outcomes,
    now_ms: i64,
) -> Result<ApiAnalysis, Failed> {
    let number = |name: &str, default: u64, max: u64| -> Result<u64, Failed> {
        match query.get(name) {
            None => Ok(default),
            Some(v) => v.parse().ok().filter(|n| (1..=max).contains(n)).ok_or((
                StatusCode::BAD_REQUEST,
                format!("{name} must be a number from 1 to {max}, not {v:?}"),
            )),
        }
    };
    let window = number("windowSeconds", 300, 900)?;
    let mut thresholds = crate::analysis::Thresholds {
        min_samples: number("minSamples", 2000, 100_000)?,
        ..Default::default()
    };
    thresholds.min_samples = thresholds.min_samples.max(1);
    let subset = |name: &str| -> Result<String, Failed> {
        let s = query.get(name).filter(|s| !s.is_empty()).ok_or((
            StatusCode::BAD_REQUEST,
            format!("analysis needs ?{name}=<subset>"),
        ))?;
        if !view.subsets.iter().any(|v| &v.name == s) {
            return Err((StatusCode::NOT_FOUND, format!("{id} has no subset {s:?}")));
        }
        Ok(s.clone())
    };
    let (canary, stable) = (subset("canary")?, subset("stable")?);
    let since = now_ms - i64::try_from(window * 1000).unwrap_or(i64::MAX);
    let stats = |s: &str| Stats::of(&outcomes.window(id, s, since));
    let (c, st) = (stats(&canary), stats(&stable));
    let (verdict, reasons) = match crate::analysis::analyse(&c, &st, &thresholds) {
        Verdict::Pass => ("Pass", Vec::new()),
        Verdict::Fail(why) => ("Fail", why),
        Verdict::Wait(why) => ("Wait", vec![why]),
    };
    let side = |subset: String, s: &Stats| SubsetAnalysis {
        subset,
        reconciles: s.reconciles,
        errors: s.errors,
        error_rate_percent: s.error_rate() * 100.0,
        p99_ms: s.p99_ms,
        reconciles_per_generation: s.per_generation,
    };
    Ok(ApiAnalysis {
        verdict: verdict.into(),
        reasons,
        window_seconds: window,
        min_samples: thresholds.min_samples,
        canary: side(canary, &c),
        stable: side(stable, &st),
    })
}

/// Reported outcomes as the API shows them.
pub(super) fn outcomes(reported: Vec<(String, crate::outcomes::Outcome)>) -> Vec<ApiOutcome> {
    reported
        .into_iter()
        .map(|(key, o)| ApiOutcome {
            key,
            finished_unix_ms: o.finished_unix_ms,
            result: if o.ok { "success" } else { "error" }.into(),
            error: (!o.error.is_empty()).then_some(o.error),
            duration_ms: o.duration_us as f64 / 1000.0,
            queue_wait_ms: o.queue_wait_us as f64 / 1000.0,
            operator_version: o.operator_version,
            generation: o.generation,
            subset: o.subset,
            replica: o.pod,
        })
        .collect()
}

/// The rule's name and what it means here.
fn describe(placement: &Placement, policy: &Policy) -> (String, String) {
    let name = |i: &usize| {
        policy
            .subsets()
            .get(*i)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    };
    match placement {
        Placement::ClusterScoped(Some(s)) => (
            "ClusterScoped".into(),
            format!(
                "cluster-scoped: spec.routing.clusterScoped sends it to {}",
                name(s)
            ),
        ),
        Placement::ClusterScoped(None) => (
            "ClusterScoped".into(),
            "cluster-scoped, and spec.routing.clusterScoped is unset: no subset sees it".into(),
        ),
        Placement::Excluded => (
            "Excluded".into(),
            "its namespace is in spec.routing.exclude: no subset sees it".into(),
        ),
        Placement::NotSelected => (
            "NotSelected".into(),
            "its namespace does not match spec.namespaceSelector: no subset sees it".into(),
        ),
        Placement::ObjectPinned { index, subset } => (
            "ObjectPinned".into(),
            format!(
                "spec.routing.objectPins[{index}] sends this object to {}",
                name(subset)
            ),
        ),
        Placement::Pinned { index, subset } => (
            "Pinned".into(),
            format!(
                "spec.routing.pins[{index}] matches its namespace: {}",
                name(subset)
            ),
        ),
        Placement::Apportioned { subset } => (
            "Apportioned".into(),
            format!(
                "the exact split over namespaces (sorted by weight hash) gives its namespace to {}",
                name(subset)
            ),
        ),
        Placement::NotApportioned => (
            "NotApportioned".into(),
            "the exact split has not seen its namespace yet".into(),
        ),
        Placement::Hashed {
            hashed,
            hash,
            subset,
        } => {
            let (start, end) = policy.hash_range(*subset);
            let pct = |x: u128| x as f64 * 100.0 / 18_446_744_073_709_551_616.0;
            (
                "Hashed".into(),
                format!(
                    "weight hash of {hashed:?} is {hash:#018x}, in {}'s range [{:.2}%, {:.2}%)",
                    name(subset),
                    pct(start),
                    pct(end)
                ),
            )
        }
    }
}

/// Compiles `spec` as the manager would, or says why it would refuse it.
pub(super) fn compile(spec: &OperatorMeshSpec) -> Result<Policy, Failed> {
    Policy::compile(spec).map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the mesh would refuse this spec: {e}"),
        )
    })
}

/// Which held keys would change subset under `spec`, and the shares
/// before and after.
pub(super) fn plan(view: &MeshView, spec: &OperatorMeshSpec) -> Result<Plan, Failed> {
    let routing = view.routing.as_ref().ok_or((
        StatusCode::SERVICE_UNAVAILABLE,
        "the mesh has no valid policy in force yet".to_string(),
    ))?;
    let next = compile(spec)?;
    let exact = apportion(&next, routing, view);
    let name =
        |p: &Policy, i: Option<usize>| i.and_then(|i| p.subsets().get(i).map(|s| s.name.clone()));
    let mut moves = Vec::new();
    let mut before = vec![0u64; routing.policy.subsets().len()];
    let mut after = vec![0u64; next.subsets().len()];
    for key in view.keys.keys() {
        let labels = routing.labels_of(key);
        let from = routing.policy.route(key, labels, &routing.apportionment);
        let to = next.route(key, labels, &exact);
        if let Some(i) = from {
            before[i] += 1;
        }
        if let Some(i) = to {
            after[i] += 1;
        }
        let (from, to) = (name(&routing.policy, from), name(&next, to));
        if from != to {
            moves.push(KeyMove {
                key: key.clone(),
                from,
                to,
            });
        }
    }
    let shares = |p: &Policy, counts: Vec<u64>| {
        let total: u64 = counts.iter().sum();
        p.subsets()
            .iter()
            .zip(counts)
            .map(|(s, keys)| Share {
                subset: s.name.clone(),
                keys,
                percent: if total == 0 {
                    0.0
                } else {
                    keys as f64 * 100.0 / total as f64
                },
            })
            .collect()
    };
    Ok(Plan {
        moves,
        before: shares(&routing.policy, before),
        after: shares(&next, after),
    })
}

/// `next`'s exact split of the namespaces the mesh's objects are in: those
/// the split in force divides, and those of held keys.
fn apportion(next: &Policy, routing: &RoutingView, view: &MeshView) -> Apportionment {
    static EMPTY: Labels = Labels::new();
    let namespaces: BTreeSet<&str> = view
        .keys
        .keys()
        .filter_map(|k| k.split_once('/').map(|(ns, _)| ns))
        .chain(routing.apportionment.namespaces())
        .collect();
    let with_labels: Vec<(String, Labels)> = namespaces
        .into_iter()
        .map(|ns| {
            (
                ns.to_string(),
                routing.namespaces.get(ns).unwrap_or(&EMPTY).clone(),
            )
        })
        .collect();
    next.apportion(with_labels.iter().map(|(n, l)| (n, l)))
}
