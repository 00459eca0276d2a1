//! The one-owner property, checked in process.
//!
//! Random inputs drive a real [`Coordinator`]: policy changes, namespace
//! relabels, objects created and deleted, runtimes connecting (reporting the
//! keys they hold), dropping their stream, saying goodbye, heartbeating,
//! answering revokes, the clock moving, and the manager itself failing over.
//! Runtimes are modelled from the messages they read in their outboxes, as
//! the real runtime acts on them. After every step no key may be held by two
//! runtimes; at the end of each run, once faults stop, every key is held by
//! its policy owner.

mod fixtures;
mod model;

use std::time::Duration;

use proptest::{prelude::*, test_runner::TestRunner};

use model::Sim;

const TTL: Duration = Duration::from_millis(1000);
/// Pods and their subsets: three replicas of v1, two of v2.
const PODS: [(&str, &str); 5] = [
    ("op-v1-0", "v1"),
    ("op-v1-1", "v1"),
    ("op-v1-2", "v1"),
    ("op-v2-0", "v2"),
    ("op-v2-1", "v2"),
];
const NAMESPACES: usize = 4;
const NAMES: usize = 6;
const MESH_NS: &str = "operators";

#[derive(Clone, Debug)]
enum Op {
    /// A new spec: v2's weight (of 100), a pin of `canary=true` namespaces
    /// to v2, paused, and namespace granularity (with the exact split).
    Policy(u8, bool, bool, bool),
    /// Toggles `canary=true` on a namespace.
    Relabel(usize),
    /// Creates or deletes object `app-N` in namespace `team-M`.
    Object(usize, usize, bool),
    /// The runtime (re)connects, reporting the keys it holds.
    Connect(usize),
    /// The runtime's stream breaks; it keeps its keys until its lease ends.
    Drop(usize),
    /// The runtime drains, releases everything and says goodbye.
    Goodbye(usize),
    /// The runtime reads its outbox.
    Deliver(usize),
    /// The runtime finished draining revoked keys and answers `Released`.
    Release(usize),
    /// The runtime heartbeats; its lease is renewed.
    Heartbeat(usize),
    /// A reconcile of the runtime hangs (or resumes): it answers no revoke,
    /// but goes on heartbeating.
    Stall(usize, bool),
    /// Time passes, in milliseconds.
    Advance(u64),
    /// The manager fails over: a new coordinator, every stream broken.
    Restart,
    /// The OperatorMesh is deleted and created again.
    Recreate,
    /// Discovery answers the lookup of the mesh's type, if one is pending;
    /// until then only a hello starts its watch.
    Discover,
}

/// How often the property was actually exercised, over all cases.
#[derive(Debug, Default)]
pub(super) struct Power {
    handoffs_after_release: usize,
    handoffs_after_expiry: usize,
    reported_on_reconnect: usize,
    failovers: usize,
    ended_by_manager: usize,
}

fn op() -> impl Strategy<Value = Op> {
    let pod = 0..PODS.len();
    prop_oneof![
        1 => (prop::sample::select(vec![0u8, 5, 20, 50, 100]), any::<bool>(), prop::bool::weighted(0.2), any::<bool>())
            .prop_map(|(w, pin, paused, by_ns)| Op::Policy(w, pin, paused, by_ns)),
        1 => (0..NAMESPACES).prop_map(Op::Relabel),
        2 => (0..NAMESPACES, 0..NAMES, prop::bool::weighted(0.7)).prop_map(|(n, o, e)| Op::Object(n, o, e)),
        2 => pod.clone().prop_map(Op::Connect),
        1 => pod.clone().prop_map(Op::Drop),
        1 => pod.clone().prop_map(Op::Goodbye),
        4 => pod.clone().prop_map(Op::Deliver),
        3 => pod.clone().prop_map(Op::Release),
        4 => pod.clone().prop_map(Op::Heartbeat),
        2 => (pod, any::<bool>()).prop_map(|(i, on)| Op::Stall(i, on)),
        3 => (0u64..1500).prop_map(Op::Advance),
        1 => Just(Op::Restart),
        1 => Just(Op::Recreate),
        1 => Just(Op::Discover),
    ]
}

#[test]
fn no_key_is_handed_to_a_second_runtime_and_every_key_ends_with_its_owner() {
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases: 2000,
        failure_persistence: None,
        // The cheap generator: a debug-built ChaCha costs more than the
        // coordinator under test.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..Default::default()
    });
    let power = std::cell::RefCell::new(Power::default());
    let result = runner.run(&prop::collection::vec(op(), 1..120), |ops| {
        let mut sim = Sim::new();
        // The first placement waits for leases an earlier manager may have
        // granted; start the run after it.
        sim.apply(Op::Advance(TTL.as_millis() as u64 * 2));
        for (i, op) in ops.into_iter().enumerate() {
            sim.apply(op);
            sim.check()?;
            // Snapshots along the way, so the final one may reuse what they
            // computed: a reuse after a change it depends on shows below.
            if i % 3 == 0 {
                sim.snapshot();
            }
        }
        sim.settle();
        sim.check()?;
        sim.check_settled()?;
        let mut p = power.borrow_mut();
        p.handoffs_after_release += sim.power.handoffs_after_release;
        p.handoffs_after_expiry += sim.power.handoffs_after_expiry;
        p.reported_on_reconnect += sim.power.reported_on_reconnect;
        p.failovers += sim.power.failovers;
        p.ended_by_manager += sim.power.ended_by_manager;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let power = power.into_inner();
    eprintln!("coordinator property: 2000 runs, {power:?}");
    // The property was exercised, not passed vacuously.
    assert!(power.handoffs_after_release > 1000, "{power:?}");
    assert!(power.handoffs_after_expiry > 100, "{power:?}");
    assert!(power.failovers > 100, "{power:?}");
    assert!(power.reported_on_reconnect > 100, "{power:?}");
    assert!(power.ended_by_manager > 20, "{power:?}");
}

#[test]
fn a_revoke_left_unanswered_ends_the_session_and_its_keys_follow_its_lease() {
    let mut sim = Sim::new();
    sim.apply(Op::Advance(TTL.as_millis() as u64 * 2));
    sim.apply(Op::Connect(0));
    sim.apply(Op::Deliver(0));
    sim.apply(Op::Connect(3));
    // Everything to v2: pod 0 (v1) is asked to release its keys, and a
    // reconcile of one of them hangs.
    sim.apply(Op::Stall(0, true));
    sim.apply(Op::Policy(100, false, false, false));
    sim.apply(Op::Deliver(0));
    for _ in 0..6 {
        sim.apply(Op::Heartbeat(3));
        sim.apply(Op::Deliver(3));
        sim.apply(Op::Advance(500));
        sim.check().unwrap();
    }
    assert_eq!(
        sim.power.ended_by_manager, 1,
        "the stalled session was not ended"
    );
    // Its keys went to v2 only after its lease ran out.
    sim.settle();
    sim.check().unwrap();
    sim.check_settled().unwrap();
}

#[test]
fn a_mesh_recreated_twice_still_waits_for_the_leases_of_the_first() {
    // Found by the property test: the second delete forgot the wait the
    // first had started, and the new mesh handed out keys a runtime of the
    // first still held.
    let mut sim = Sim::new();
    sim.apply(Op::Advance(TTL.as_millis() as u64 * 2));
    for op in [
        Op::Connect(3),
        Op::Deliver(3),
        Op::Recreate,
        Op::Recreate,
        Op::Connect(4),
        Op::Deliver(4),
    ] {
        sim.apply(op);
        sim.check().unwrap();
    }
    for _ in 0..8 {
        sim.apply(Op::Advance(250));
        sim.apply(Op::Deliver(4));
        sim.check().unwrap();
    }
}

#[test]
fn a_manager_without_meshes_becomes_ready_once_earlier_leases_ran_out() {
    use crate::{coordinator::Input, watch::WatchEvent};
    let start = std::time::Instant::now();
    let mut c = super::Coordinator::new(TTL, start);
    let _ = c.step(
        Input::Namespace(WatchEvent::Relisted(Default::default())),
        start,
    );
    assert!(c.take_dirty());
    assert!(!c.snapshot().synced, "ready before earlier leases ran out");
    let _ = c.step(Input::Tick, start + TTL * 2);
    assert!(c.take_dirty(), "nothing would publish the change");
    assert!(c.snapshot().synced);
}

#[test]
fn a_mesh_s_types_are_watched_and_routed_before_any_runtime_declares_them() {
    use std::{sync::Arc, time::Instant};

    use super::{Coordinator, Effect, Input};
    use crate::{crd::OperatorMesh, gvk::Gvk, id::MeshId, watch::WatchEvent};

    let mut now = Instant::now();
    let mut c = Coordinator::new(TTL, now);
    let mesh = |name: &str, weight: u8| {
        let mut om = OperatorMesh::new(name, fixtures::spec(weight, false, false, false));
        om.metadata.namespace = Some(MESH_NS.into());
        Input::Mesh(WatchEvent::Apply(Arc::new(om)))
    };
    let id = MeshId::new(MESH_NS.to_string(), "mesh".to_string());
    let declared = fixtures::spec(0, false, false, false).controllers[0]
        .primary
        .clone();
    // The mesh alone asks for its type to be found in discovery.
    assert_eq!(
        c.step(mesh("mesh", 0), now),
        vec![Effect::Resolve(declared)]
    );
    // A new spec, and a second mesh of the same type, ask nothing more.
    assert!(c.step(mesh("mesh", 50), now).is_empty());
    assert!(c.step(mesh("other", 0), now).is_empty());

    // Not served yet (its CRD is missing): the mesh's status says so.
    let key = Gvk::from(&fixtures::gvk()).key();
    c.step(
        Input::Unresolved {
            key: key.clone(),
            error: "example.com/v1 Widget is not served by the API server".into(),
        },
        now,
    );
    let errors = c.snapshot().meshes[&id].watch_errors.clone();
    assert_eq!(
        errors,
        vec![(
            key.clone(),
            "example.com/v1 Widget is not served by the API server".to_string()
        )]
    );

    // Found: its watch starts, once, and the error is gone.
    let widget = Gvk::from(&fixtures::gvk());
    assert_eq!(
        c.step(Input::Resolved(widget.clone()), now),
        vec![Effect::Watch(widget.clone())]
    );
    assert!(c.step(Input::Resolved(widget), now).is_empty());
    assert!(c.snapshot().meshes[&id].watch_errors.is_empty());

    // Its objects are routed with no runtime yet: counted, and unowned
    // until a replica of their subset joins.
    let team = (String::new(), fixtures::namespace(0));
    c.step(
        Input::Namespace(WatchEvent::Apply(Arc::new((
            team.clone(),
            Default::default(),
        )))),
        now,
    );
    c.step(
        Input::Namespace(WatchEvent::Relisted([team].into_iter().collect())),
        now,
    );
    let mut present = std::collections::HashSet::new();
    for o in 0..NAMES {
        let obj = fixtures::object(0, o);
        present.insert((fixtures::namespace(0), format!("app-{o}")));
        c.step(
            Input::Object {
                gvk: key.clone(),
                event: WatchEvent::Apply(obj),
            },
            now,
        );
    }
    c.step(
        Input::Object {
            gvk: key,
            event: WatchEvent::Relisted(present),
        },
        now,
    );
    now += TTL * 2;
    c.step(Input::Tick, now);
    let view = &c.snapshot().meshes[&id];
    let routed: u64 = view.subsets.iter().map(|s| s.routed_keys).sum();
    assert_eq!(routed, NAMES as u64, "every object's key is routed");
    assert_eq!(view.unowned, NAMES, "and waits for a replica");
}

/// A coordinator fed by hand, for the declared-type scenarios below.
mod declared {
    use std::{sync::Arc, time::Instant};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::{DynamicObject, ObjectMeta};
    use opmesh_proto::v1::{GroupVersionKind, Hello, manager_message::Msg};
    use tokio::sync::oneshot;

    use super::{MESH_NS, TTL, fixtures};
    use crate::{
        coordinator::{Connected, Coordinator, Effect, Input},
        crd::{OperatorMesh, OperatorMeshSpec, TypeRef},
        gvk::Gvk,
        id::MeshId,
        object::RawObject,
        watch::WatchEvent,
    };

    fn type_ref(api_version: &str, kind: &str) -> TypeRef {
        TypeRef {
            api_version: api_version.into(),
            kind: kind.into(),
        }
    }

    fn proto(group: &str, kind: &str, plural: &str) -> GroupVersionKind {
        GroupVersionKind {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced: true,
        }
    }

    fn widget() -> GroupVersionKind {
        fixtures::gvk()
    }
    fn config_map() -> GroupVersionKind {
        proto("", "ConfigMap", "configmaps")
    }
    fn gizmo() -> GroupVersionKind {
        proto("example.com", "Gizmo", "gizmos")
    }

    struct Harness {
        c: Coordinator,
        now: Instant,
    }

    impl Harness {
        fn new() -> Self {
            let now = Instant::now();
            let mut h = Self {
                c: Coordinator::new(TTL, now),
                now,
            };
            let team = (String::new(), fixtures::namespace(0));
            h.step(Input::Namespace(WatchEvent::Apply(Arc::new((
                team.clone(),
                Default::default(),
            )))));
            h.step(Input::Namespace(WatchEvent::Relisted(
                [team].into_iter().collect(),
            )));
            // Past any lease an earlier manager may have granted.
            h.now += TTL * 2;
            h.step(Input::Tick);
            h
        }

        fn step(&mut self, input: Input) -> Vec<Effect> {
            self.c.step(input, self.now)
        }

        fn apply(&mut self, spec: OperatorMeshSpec) -> Vec<Effect> {
            let mut om = OperatorMesh::new("mesh", spec);
            om.metadata.namespace = Some(MESH_NS.into());
            self.step(Input::Mesh(WatchEvent::Apply(Arc::new(om))))
        }

        /// Discovery finds `g`, and its watch lists `objects`.
        fn listed(&mut self, g: &GroupVersionKind, objects: Vec<Arc<RawObject>>) {
            let gvk = Gvk::from(g);
            self.step(Input::Resolved(gvk.clone()));
            let mut present = std::collections::HashSet::new();
            for o in objects {
                present.insert((o.namespace().unwrap_or_default(), o.name_any()));
                self.step(Input::Object {
                    gvk: gvk.key(),
                    event: WatchEvent::Apply(o),
                });
            }
            self.step(Input::Object {
                gvk: gvk.key(),
                event: WatchEvent::Relisted(present),
            });
        }

        fn connect(&mut self, pod: &str, owns: Vec<GroupVersionKind>) -> Connected {
            let hello = Hello {
                mesh_namespace: MESH_NS.into(),
                mesh_name: "mesh".into(),
                pod_namespace: MESH_NS.into(),
                pod_name: pod.into(),
                primary: Some(widget()),
                owns,
                ..Default::default()
            };
            let (reply, mut answer) = oneshot::channel();
            self.step(Input::Connect {
                hello: Box::new(hello),
                pod_labels: fixtures::pod_labels(0),
                pod_uid: String::new(),
                reply,
            });
            answer.try_recv().unwrap().expect("the runtime joins")
        }

        /// The (type key, name) of every object event `c` was sent.
        fn sent(c: &Connected) -> Vec<(String, String)> {
            c.pending
                .drain_now()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| match m.msg {
                    Some(Msg::Event(e)) => {
                        let g = Gvk::from(&e.gvk.unwrap_or_default());
                        Some((g.key(), e.name))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    use kube::ResourceExt as _;

    fn object(g: &GroupVersionKind, name: &str, owner: Option<&str>) -> Arc<RawObject> {
        let api_version = Gvk::from(g).api_version();
        Arc::new(RawObject::from(&DynamicObject {
            types: Some(kube::api::TypeMeta {
                api_version,
                kind: g.kind.clone(),
            }),
            metadata: ObjectMeta {
                namespace: Some(fixtures::namespace(0)),
                name: Some(name.into()),
                owner_references: owner.map(|o| {
                    vec![OwnerReference {
                        api_version: Gvk::from(&widget()).api_version(),
                        kind: widget().kind,
                        name: o.into(),
                        uid: format!("uid-{o}"),
                        controller: Some(true),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            data: serde_json::json!({}),
        }))
    }

    fn spec_owning(owns: Vec<TypeRef>) -> OperatorMeshSpec {
        let mut spec = fixtures::spec(0, false, false, false);
        spec.controllers[0].owns = owns;
        spec
    }

    #[test]
    fn an_owned_type_listed_before_its_primary_still_reaches_the_owner() {
        let mut h = Harness::new();
        let effects = h.apply(spec_owning(vec![type_ref("v1", "ConfigMap")]));
        assert_eq!(effects.len(), 2, "both types are looked up: {effects:?}");
        // The built-in type is found at once; the primary's CRD comes later.
        h.listed(
            &config_map(),
            vec![object(&config_map(), "app-0-cm", Some("app-0"))],
        );
        h.listed(&widget(), vec![object(&widget(), "app-0", None)]);
        let c = h.connect("op-v1-0", vec![config_map()]);
        let sent = Harness::sent(&c);
        assert!(
            sent.contains(&(Gvk::from(&config_map()).key(), "app-0-cm".into())),
            "the owned ConfigMap went with its key: {sent:?}"
        );
        assert!(sent.contains(&(Gvk::from(&widget()).key(), "app-0".into())));
    }

    #[test]
    fn a_type_added_to_a_running_mesh_freezes_nothing_while_it_lists() {
        let mut h = Harness::new();
        h.apply(spec_owning(Vec::new()));
        h.listed(&widget(), vec![object(&widget(), "app-0", None)]);
        let c = h.connect("op-v1-0", Vec::new());
        assert_eq!(Harness::sent(&c).len(), 1);
        // The spec now also owns ConfigMaps; their watch has not listed
        // (its RBAC may come later). New objects are still placed.
        h.apply(spec_owning(vec![type_ref("v1", "ConfigMap")]));
        h.step(Input::Resolved(Gvk::from(&config_map())));
        h.step(Input::Object {
            gvk: Gvk::from(&widget()).key(),
            event: WatchEvent::Apply(object(&widget(), "app-1", None)),
        });
        let sent = Harness::sent(&c);
        assert!(
            sent.contains(&(Gvk::from(&widget()).key(), "app-1".into())),
            "a new object waited for another type's list: {sent:?}"
        );
    }

    #[test]
    fn a_primary_added_to_the_spec_is_not_routed_to_runtimes_that_do_not_run_it() {
        let mut h = Harness::new();
        h.apply(spec_owning(Vec::new()));
        h.listed(&widget(), vec![object(&widget(), "app-0", None)]);
        let c = h.connect("op-v1-0", Vec::new());
        Harness::sent(&c);
        let mut spec = spec_owning(Vec::new());
        let mut gizmos = spec.controllers[0].clone();
        gizmos.primary = type_ref("example.com/v1", "Gizmo");
        spec.controllers.push(gizmos);
        h.apply(spec);
        h.listed(&gizmo(), vec![object(&gizmo(), "g-0", None)]);
        let sent = Harness::sent(&c);
        assert!(
            sent.iter().all(|(g, _)| *g != Gvk::from(&gizmo()).key()),
            "a Gizmo went to a runtime that only runs Widgets: {sent:?}"
        );
        let id = MeshId::new(MESH_NS.to_string(), "mesh".to_string());
        let routed: u64 = h.c.snapshot().meshes[&id]
            .subsets
            .iter()
            .map(|s| s.routed_keys)
            .sum();
        assert_eq!(routed, 1, "only the Widget is routed");
    }

    #[test]
    fn a_type_no_mesh_declares_any_more_is_no_longer_looked_up() {
        let mut h = Harness::new();
        let mut spec = spec_owning(Vec::new());
        let mut typo = spec.controllers[0].clone();
        typo.primary = type_ref("example.com/v1", "Gizmoo");
        spec.controllers.push(typo);
        h.apply(spec);
        let key = crate::gvk::Gvk::from(&proto("example.com", "Gizmoo", "gizmoos")).key();
        h.step(Input::Unresolved {
            key: key.clone(),
            error: "example.com/v1 Gizmoo is not served by the API server".into(),
        });
        let id = MeshId::new(MESH_NS.to_string(), "mesh".to_string());
        assert_eq!(h.c.snapshot().meshes[&id].watch_errors.len(), 1);
        // The typo is fixed: the lookup stops and the error goes.
        let effects = h.apply(spec_owning(Vec::new()));
        assert!(
            effects.contains(&Effect::StopResolving(key.clone())),
            "{effects:?}"
        );
        assert!(h.c.snapshot().meshes[&id].watch_errors.is_empty());
        // An answer already on its way starts no watch.
        let late = proto("example.com", "Gizmoo", "gizmoos");
        let effects = h.step(Input::Resolved(Gvk::from(&late)));
        assert!(effects.is_empty(), "{effects:?}");
    }
}
