//! The coordinator's routing path, driven without a cluster, for the
//! `routing` criterion benchmark (`cargo bench -p opmesh-manager`): object
//! events in, routed messages out of the replicas' outboxes. Not part of
//! the manager's API.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{DynamicObject, ObjectMeta};
use opmesh_proto::v1::{GroupVersionKind, Hello};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::{
    coordinator::{Connected, Coordinator, Effect, Input},
    crd::{
        ControllerSpec, Granularity, OperatorMesh, OperatorMeshSpec, RoutingSpec, SubsetSpec,
        TypeRef, WeightSpec,
    },
    object::RawObject,
    policy::Labels,
    watch::WatchEvent,
};

/// A coordinator holding one mesh whose keys are split over connected
/// replicas of two subsets.
pub struct Routing {
    coordinator: Coordinator,
    now: Instant,
    gvk: String,
    objects: Vec<Arc<RawObject>>,
    /// A later version of each object, built ahead so the benchmark times
    /// routing, not building objects.
    changed: Vec<Arc<RawObject>>,
    sessions: Vec<Connected>,
    next: usize,
}

const MESH_NS: &str = "operators";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn widget() -> GroupVersionKind {
    GroupVersionKind {
        group: "example.com".into(),
        version: "v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
        namespaced: true,
    }
}

/// An object as a watch delivers it: with its type, and a spec the size of
/// a small real one (a Deployment-like template), since what the manager
/// does per byte is part of what is measured.
fn object(i: usize, namespaces: usize, version: usize) -> Arc<RawObject> {
    Arc::new(RawObject::from(&DynamicObject {
        types: Some(kube::api::TypeMeta {
            api_version: "example.com/v1".into(),
            kind: "Widget".into(),
        }),
        metadata: ObjectMeta {
            namespace: Some(format!("team-{}", i % namespaces)),
            name: Some(format!("app-{i}")),
            resource_version: Some(version.to_string()),
            generation: Some(i64::try_from(version).unwrap_or(i64::MAX)),
            ..Default::default()
        },
        data: serde_json::json!({"spec": {
            "replicas": 1,
            "template": {
                "metadata": {"labels": {"app": format!("app-{i}"), "tier": "backend"}},
                "spec": {"containers": [{
                    "name": "main",
                    "image": "registry.example.com/team/app:v1.2.3",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "MODE", "value": "production"}, {"name": "LEVEL", "value": "info"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                }]},
            },
        }}),
    }))
}

// === impl Routing ===

impl Routing {
    /// `objects` objects in `namespaces` namespaces, split 50/50 by object
    /// between subsets v1 and v2 of `replicas` replicas in all, every key
    /// assigned.
    pub fn new(objects: usize, namespaces: usize, replicas: usize) -> Self {
        let ttl = Duration::from_secs(10);
        let now = Instant::now();
        let mut bench = Self {
            coordinator: Coordinator::new(ttl, now),
            now,
            gvk: widget().key(),
            objects: (0..objects).map(|i| object(i, namespaces, 1)).collect(),
            changed: (0..objects).map(|i| object(i, namespaces, 2)).collect(),
            sessions: Vec::new(),
            next: 0,
        };
        let spec = OperatorMeshSpec {
            rollout: None,
            selector: LabelSelector {
                match_labels: Some(labels(&[("app", "op")])),
                match_expressions: None,
            },
            controllers: vec![ControllerSpec {
                primary: TypeRef {
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
                granularity: Granularity::Object,
                split: None,
                object_pins: Vec::new(),
                pins: Vec::new(),
                weights: ["v1", "v2"]
                    .iter()
                    .map(|s| WeightSpec {
                        subset: s.to_string(),
                        weight: 50,
                    })
                    .collect(),
                weight_total: None,
                cluster_scoped: None,
                exclude: vec![],
            },
            paused: false,
            namespace_selector: None,
            runtime_namespaces: vec![],
        };
        let mut om = OperatorMesh::new("mesh", spec);
        om.metadata.namespace = Some(MESH_NS.into());
        om.metadata.generation = Some(1);
        bench.step(Input::Mesh(WatchEvent::Apply(Arc::new(om))));
        for n in 0..namespaces {
            bench.step(Input::Namespace(WatchEvent::Apply(Arc::new((
                (String::new(), format!("team-{n}")),
                Labels::new(),
            )))));
        }
        let present = (0..namespaces)
            .map(|n| (String::new(), format!("team-{n}")))
            .collect();
        bench.step(Input::Namespace(WatchEvent::Relisted(present)));
        // Past any earlier manager's leases: keys may be assigned.
        bench.now += ttl * 2;
        bench.step(Input::Tick);
        for r in 0..replicas {
            let version = if r.is_multiple_of(2) { "v1" } else { "v2" };
            let hello = Hello {
                mesh_namespace: MESH_NS.into(),
                mesh_name: "mesh".into(),
                pod_namespace: MESH_NS.into(),
                pod_name: format!("op-{r}"),
                primary: Some(widget()),
                ..Default::default()
            };
            let (reply, mut answer) = oneshot::channel();
            bench.step(Input::Connect {
                hello: Box::new(hello),
                pod_labels: labels(&[("app", "op"), ("version", version)]),
                pod_uid: format!("uid-{r}"),
                reply,
            });
            if let Ok(Ok(c)) = answer.try_recv() {
                bench.sessions.push(c);
            }
        }
        bench.settle();
        bench
    }

    /// Answers every revoke (keys rebalanced as replicas joined) until no
    /// key is moving, so every key has a holder that gets its events.
    fn settle(&mut self) {
        use opmesh_proto::v1::manager_message::Msg;
        loop {
            self.step(Input::Tick);
            let mut released = Vec::new();
            for s in &self.sessions {
                let keys: Vec<String> = s
                    .pending
                    .drain_now()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| match m.msg {
                        Some(Msg::Revoke(r)) => Some(r.keys),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                if !keys.is_empty() {
                    released.push((s.holder.clone(), keys));
                }
            }
            if released.is_empty() {
                return;
            }
            for (holder, keys) in released {
                self.step(Input::Released { holder, keys });
            }
        }
    }

    /// Routes `events` object changes (objects round-robin, each
    /// alternating between two versions) and drains what they queued for
    /// the replicas; returns how many messages were queued.
    pub fn route(&mut self, events: usize) -> usize {
        let n = self.objects.len();
        for _ in 0..events {
            let i = self.next % n;
            let obj = if (self.next / n).is_multiple_of(2) {
                self.changed[i].clone()
            } else {
                self.objects[i].clone()
            };
            self.next += 1;
            let _ = self.coordinator.step(
                Input::Object {
                    gvk: self.gvk.clone(),
                    event: WatchEvent::Apply(obj),
                },
                self.now,
            );
        }
        self.drain()
    }

    /// Builds what the coordinator publishes for the admin API, health and
    /// status (it does so every 0.5 s while anything changes, on the task
    /// that routes); returns how many keys it lists.
    pub fn snapshot(&mut self) -> usize {
        self.coordinator
            .snapshot()
            .meshes
            .values()
            .map(|m| m.keys.len())
            .sum()
    }

    /// Replicas connected, and keys they hold.
    pub fn replicas(&self) -> usize {
        self.sessions.len()
    }

    fn drain(&mut self) -> usize {
        self.sessions
            .iter()
            .filter_map(|s| s.pending.drain_now())
            .map(|b| b.len())
            .sum()
    }

    fn step(&mut self, input: Input) {
        for effect in self.coordinator.step(input, self.now) {
            match effect {
                // The benchmark's types are watched when its runtimes
                // declare them.
                Effect::Resolve(_) | Effect::StopResolving(_) => {}
                Effect::Watch(g) => {
                    let key = g.key();
                    for obj in self.objects.clone() {
                        let _ = self.coordinator.step(
                            Input::Object {
                                gvk: key.clone(),
                                event: WatchEvent::Apply(obj),
                            },
                            self.now,
                        );
                    }
                    let present = self
                        .objects
                        .iter()
                        .map(|o| {
                            (
                                o.metadata.namespace.clone().unwrap_or_default(),
                                o.metadata.name.clone().unwrap_or_default(),
                            )
                        })
                        .collect();
                    let _ = self.coordinator.step(
                        Input::Object {
                            gvk: key,
                            event: WatchEvent::Relisted(present),
                        },
                        self.now,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_reaches_the_replica_holding_its_key() {
        let mut bench = Routing::new(1000, 10, 4);
        assert_eq!(bench.replicas(), 4);
        // Each event is one object change for the key's holder.
        assert_eq!(bench.route(500), 500);
    }
}
