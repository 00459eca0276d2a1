//! Policy compilation, pins, membership and the exact split.

use std::collections::BTreeMap;

use super::*;
use crate::crd::{PinSpec, RoutingSpec, SubsetSpec, WeightSpec};

fn spec(weights: &[(&str, u32)], pins: Vec<PinSpec>) -> OperatorMeshSpec {
    OperatorMeshSpec {
        rollout: None,
        selector: LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "op".into())])),
            match_expressions: None,
        },
        controllers: vec![crate::crd::ControllerSpec {
            primary: crate::crd::TypeRef {
                api_version: "example.com/v1".into(),
                kind: "Widget".into(),
            },
            owns: vec![crate::crd::TypeRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
            }],
        }],
        subsets: ["v1", "v2"]
            .iter()
            .map(|v| SubsetSpec {
                name: v.to_string(),
                labels: BTreeMap::from([("version".into(), v.to_string())]),
            })
            .collect(),
        routing: RoutingSpec {
            granularity: Granularity::Object,
            object_pins: Vec::new(),
            pins,
            weights: weights
                .iter()
                .map(|(s, w)| WeightSpec {
                    subset: s.to_string(),
                    weight: *w,
                })
                .collect(),
            split: None,
            weight_total: None,
            cluster_scoped: Some("v1".into()),
            exclude: vec!["kube-system".into()],
        },
        paused: false,
        namespace_selector: None,
        runtime_namespaces: vec![],
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
    assert_eq!(
        p.route("canary/a", &none, &Apportionment::default()),
        Some(1)
    );
    assert_eq!(
        p.route("team-x/a", &none, &Apportionment::default()),
        Some(1)
    );
    // The regex matches whole names only.
    assert_eq!(
        p.route("my-team-x/a", &none, &Apportionment::default()),
        Some(0)
    );
    // The label pin comes before the regex pin.
    assert_eq!(
        p.route(
            "team-x/a",
            &labels(&[("tier", "gold")]),
            &Apportionment::default()
        ),
        Some(0)
    );
    assert_eq!(
        p.route("kube-system/a", &none, &Apportionment::default()),
        None
    );
    assert_eq!(
        p.route("cluster-thing", &none, &Apportionment::default()),
        Some(0)
    );
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

fn by_namespace(weights: &[(&str, u32)], split: Option<Split>) -> OperatorMeshSpec {
    let mut s = spec(weights, vec![]);
    s.routing.granularity = Granularity::Namespace;
    s.routing.split = split;
    s
}

fn fleet(names: impl IntoIterator<Item = String>) -> Vec<(String, Labels)> {
    names.into_iter().map(|n| (n, Labels::new())).collect()
}

fn canary(p: &Policy, fleet: &[(String, Labels)]) -> Vec<String> {
    let exact = p.apportion(fleet.iter().map(|(n, l)| (n, l)));
    let mut got: Vec<String> = fleet
        .iter()
        .filter(|(n, l)| p.route(&format!("{n}/obj"), l, &exact) == Some(1))
        .map(|(n, _)| n.clone())
        .collect();
    got.sort();
    got
}

#[test]
fn the_exact_split_gives_five_percent_of_forty_namespaces_exactly_two() {
    // Exact is the default with namespace granularity.
    let p = Policy::compile(&by_namespace(&[("v1", 95), ("v2", 5)], None)).unwrap();
    let mut namespaces = fleet((0..40).map(|i| format!("team-{i}")));
    let before = canary(&p, &namespaces);
    assert_eq!(before.len(), 2, "{before:?}");

    // A 41st namespace moves at most one namespace across the boundary.
    namespaces.push(("team-40".into(), Labels::new()));
    let after = canary(&p, &namespaces);
    let moved = before
        .iter()
        .filter(|n| !after.contains(n))
        .chain(
            after
                .iter()
                .filter(|n| !before.contains(n) && *n != "team-40"),
        )
        .count();
    assert!(moved <= 1, "{before:?} -> {after:?}");
    assert_eq!(after.len(), 2, "{after:?}");
}

#[test]
fn the_exact_split_leaves_out_pinned_excluded_and_unseen_namespaces() {
    let mut s = by_namespace(&[("v1", 50), ("v2", 50)], Some(Split::Exact));
    let mut pinned = pin("v1");
    pinned.namespaces = vec!["team-0".into()];
    s.routing.pins = vec![pinned];
    let p = Policy::compile(&s).unwrap();
    // kube-system is excluded by `spec`; team-0 is pinned.
    let mut namespaces = fleet((0..4).map(|i| format!("team-{i}")));
    namespaces.push(("kube-system".into(), Labels::new()));
    let exact = p.apportion(namespaces.iter().map(|(n, l)| (n, l)));
    let none = Labels::new();
    assert_eq!(p.route("team-0/a", &none, &exact), Some(0));
    assert_eq!(p.route("kube-system/a", &none, &exact), None);
    // Three apportioned namespaces at 50/50: one or two each.
    let v2 = (1..4)
        .filter(|i| p.route(&format!("team-{i}/a"), &none, &exact) == Some(1))
        .count();
    assert!(v2 == 1 || v2 == 2, "{v2}");
    // A namespace the apportionment has not seen is not routed yet.
    assert_eq!(p.route("team-9/a", &none, &exact), None);
}

#[test]
fn the_exact_split_needs_namespace_granularity() {
    let mut s = spec(&[("v1", 100)], vec![]);
    s.routing.split = Some(Split::Exact);
    assert_eq!(
        Policy::compile(&s).unwrap_err(),
        PolicyError::ExactNeedsNamespaces
    );
    // The hash split is still there for namespaces when asked for.
    let p = Policy::compile(&by_namespace(&[("v1", 95), ("v2", 5)], Some(Split::Hash))).unwrap();
    let namespaces = fleet((0..2000).map(|i| format!("team-{i}")));
    let got = canary(&p, &namespaces).len();
    assert!((60..=140).contains(&got), "{got} of 2000 at 5%");
}

#[test]
fn the_mesh_decides_which_types_a_runtime_may_declare() {
    let p = Policy::compile(&spec(&[("v1", 100)], vec![])).unwrap();
    let widget = opmesh_proto::gvk_key("example.com", "v1", "Widget");
    let cm = opmesh_proto::gvk_key("", "v1", "ConfigMap");
    let secret = opmesh_proto::gvk_key("", "v1", "Secret");
    let one = |primary: &str, owns: &[&String]| {
        vec![(
            primary.to_string(),
            owns.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )]
    };
    let d = p.declared();
    assert_eq!(d.undeclared(&one(&widget, &[&cm])), None);
    assert_eq!(d.undeclared(&one(&widget, &[])), None);
    let why = d.undeclared(&one(&widget, &[&cm, &secret])).unwrap();
    assert!(
        why.contains(&secret) && !why.contains(&format!("{secret},")),
        "{why}"
    );
    let why = d.undeclared(&one(&secret, &[])).unwrap();
    assert!(why.contains("primary"), "{why}");
    // A mesh of two controllers: a runtime must run both.
    let mut two = spec(&[("v1", 100)], vec![]);
    two.controllers.push(crate::crd::ControllerSpec {
        primary: crate::crd::TypeRef {
            api_version: "example.com/v1".into(),
            kind: "Gadget".into(),
        },
        owns: vec![],
    });
    let p2 = Policy::compile(&two).unwrap();
    let gadget = opmesh_proto::gvk_key("example.com", "v1", "Gadget");
    let why = p2.declared().undeclared(&one(&widget, &[&cm])).unwrap();
    assert!(
        why.contains(&gadget) && why.contains("does not run"),
        "{why}"
    );
    let mut both = one(&widget, &[&cm]);
    both.extend(one(&gadget, &[]));
    assert_eq!(p2.declared().undeclared(&both), None);
    let mut none = spec(&[("v1", 100)], vec![]);
    none.controllers.clear();
    assert!(matches!(
        Policy::compile(&none),
        Err(PolicyError::NoControllers)
    ));
}

#[test]
fn an_object_pin_wins_over_every_other_rule_for_that_object_only() {
    let mut by_name = pin("v1");
    by_name.namespaces = vec!["team-a".into()];
    let mut s = spec(&[("v1", 100)], vec![by_name]);
    s.routing.object_pins = vec![
        crate::crd::ObjectPinSpec {
            object: "team-a/web".into(),
            subset: "v2".into(),
        },
        crate::crd::ObjectPinSpec {
            object: "kube-system/dns".into(),
            subset: "v2".into(),
        },
    ];
    let p = Policy::compile(&s).unwrap();
    let none = Labels::new();
    let exact = Apportionment::default();
    // Every controller's key of the object, whatever its type.
    for key in [
        "team-a/web",
        "team-a/web@Widget.v1.example.com",
        "team-a/web@ConfigMap.v1",
    ] {
        assert_eq!(
            p.explain(key, &none, &exact),
            Placement::ObjectPinned {
                index: 0,
                subset: 1
            },
            "{key}"
        );
    }
    // Its neighbours follow the namespace pin; an excluded namespace's
    // object can be pinned back in.
    assert_eq!(
        p.explain("team-a/api", &none, &exact),
        Placement::Pinned {
            index: 0,
            subset: 0
        }
    );
    assert_eq!(p.route("kube-system/dns", &none, &exact), Some(1));
    assert_eq!(
        p.explain("kube-system/other", &none, &exact),
        Placement::Excluded
    );

    s.routing.object_pins[1].subset = "v9".into();
    assert_eq!(
        Policy::compile(&s).unwrap_err().to_string(),
        "spec.routing.objectPins[1].subset names subset \"v9\", which is not in spec.subsets"
    );
}
