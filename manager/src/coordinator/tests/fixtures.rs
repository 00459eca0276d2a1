//! The inputs of the simulated cluster: the mesh's spec, its objects and
//! pods, named as users name them.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{DynamicObject, ObjectMeta};

use crate::object::RawObject;
use opmesh_proto::v1::GroupVersionKind;

use super::PODS;
use crate::{
    crd::{Granularity, OperatorMeshSpec, PinSpec, RoutingSpec, SubsetSpec, WeightSpec},
    policy::Labels,
};

pub(super) fn spec(v2: u8, pin: bool, paused: bool, by_namespace: bool) -> OperatorMeshSpec {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    OperatorMeshSpec {
        rollout: None,
        selector: LabelSelector {
            match_labels: Some(labels(&[("app", "op")])),
            match_expressions: None,
        },
        controllers: vec![crate::crd::ControllerSpec {
            primary: crate::crd::TypeRef {
                api_version: "example.com/v1".into(),
                kind: "Widget".into(),
            },
            owns: Vec::new(),
        }],
        subsets: ["v1", "v2"]
            .iter()
            .map(|v| SubsetSpec {
                name: v.to_string(),
                labels: labels(&[("version", v)]),
            })
            .collect(),
        routing: RoutingSpec {
            granularity: if by_namespace {
                Granularity::Namespace
            } else {
                Granularity::Object
            },
            split: None,
            object_pins: Vec::new(),
            pins: pin
                .then(|| PinSpec {
                    subset: "v2".into(),
                    namespaces: vec![],
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(labels(&[("canary", "true")])),
                        match_expressions: None,
                    }),
                    namespace_regex: None,
                })
                .into_iter()
                .collect(),
            weights: vec![
                WeightSpec {
                    subset: "v1".into(),
                    weight: u32::from(100 - v2),
                },
                WeightSpec {
                    subset: "v2".into(),
                    weight: u32::from(v2),
                },
            ],
            weight_total: None,
            cluster_scoped: None,
            exclude: vec![],
        },
        paused,
        namespace_selector: None,
        runtime_namespaces: vec![],
    }
}

pub(super) fn gvk() -> GroupVersionKind {
    GroupVersionKind {
        group: "example.com".into(),
        version: "v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
        namespaced: true,
    }
}

pub(super) fn namespace(n: usize) -> String {
    format!("team-{n}")
}

pub(super) fn key(n: usize, o: usize) -> String {
    let g = gvk();
    opmesh_proto::mesh_key(
        &g.group,
        &g.version,
        &g.kind,
        Some(&namespace(n)),
        &format!("app-{o}"),
    )
}

pub(super) fn object(n: usize, o: usize) -> Arc<RawObject> {
    Arc::new(RawObject::from(&DynamicObject {
        types: None,
        metadata: ObjectMeta {
            namespace: Some(namespace(n)),
            name: Some(format!("app-{o}")),
            ..Default::default()
        },
        data: serde_json::json!({}),
    }))
}

pub(super) fn pod_labels(i: usize) -> Labels {
    [("app", "op"), ("version", PODS[i].1)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
