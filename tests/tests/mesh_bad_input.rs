//! Bad input gets a clear error that says what to fix, and the last good
//! state stays in force.

use std::time::Duration;

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_tests::world::{TIMEOUT, World};
use opmesh_tests::{
    cluster,
    control_plane::Process,
    eventually,
    mesh::{
        Manager, Replica, ReplicaOptions, apply_mesh, create_generator, create_operator_pod,
        handled_by, mesh_resource,
    },
};
use serde_json::json;

#[tokio::test]
async fn invalid_meshes_are_rejected_by_the_api_server() -> anyhow::Result<()> {
    let w = World::new("reject").await?;
    let cases = [
        (
            json!({"weights": [{"subset": "v1", "weight": 80}, {"subset": "v2", "weight": 10}]}),
            "weights must sum to weightTotal",
        ),
        (
            json!({"weights": [{"subset": "v1", "weight": 100}], "pins": [{"subset": "v9", "namespaces": ["x"]}]}),
            "every pin must name a subset",
        ),
        // Bounded: a regex the manager would have to compile is capped.
        (
            json!({"weights": [{"subset": "v1", "weight": 100}], "pins": [{"subset": "v1", "namespaceRegex": "a".repeat(2000)}]}),
            "spec.routing.pins[0].namespaceRegex: Too long",
        ),
    ];
    for (routing, message) in cases {
        let err = w
            .apply_mesh(routing, &["v1", "v2"])
            .await
            .expect_err("must be rejected");
        assert!(format!("{err:#}").contains(message), "{err:#}");
    }
    let dup = w
        .apply_mesh(
            json!({"weights": [{"subset": "v1", "weight": 100}]}),
            &["v1", "v1"],
        )
        .await;
    assert!(
        format!("{:#}", dup.expect_err("duplicate subsets"))
            .contains("subset names must be unique")
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_regex_is_reported_and_the_last_policy_stays_in_force() -> anyhow::Result<()> {
    let mut w = World::new("regex").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}, {"subset": "v2", "weight": 0}]}),
        &["v1", "v2"],
    )
    .await?;
    w.replica("v1-0", "v1").await?;
    w.replica("v2-0", "v2").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("regex-data", &[]).await?;
    create_generator(&w.client, &ns, "before", json!({})).await?;
    w.wait_handled(std::slice::from_ref(&ns), 1).await?;

    // Would move everything to v2, but its regex does not compile.
    w.apply_mesh(
        json!({
            "weights": [{"subset": "v1", "weight": 0}, {"subset": "v2", "weight": 100}],
            "pins": [{"subset": "v2", "namespaceRegex": "team-("}],
        }),
        &["v1", "v2"],
    )
    .await?;
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &w.ns, &mesh_resource());
    let ready = eventually("Ready=False InvalidSpec", TIMEOUT, || async {
        let m = meshes.get("mesh").await?;
        let generation = m.metadata.generation;
        let status = &m.data["status"];
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .cloned();
        Ok(ready.filter(|c| {
            c["reason"] == "InvalidSpec" && status["observedGeneration"].as_i64() == generation
        }))
    })
    .await?;
    let message = ready["message"].as_str().unwrap_or_default();
    assert_eq!(ready["status"], "False");
    assert!(
        message.contains("namespaceRegex") && message.contains("team-("),
        "{message}"
    );
    assert!(
        message.contains("last valid policy stays in force"),
        "{message}"
    );

    create_generator(&w.client, &ns, "after", json!({})).await?;
    let handled = w.wait_handled(std::slice::from_ref(&ns), 2).await?;
    assert!(
        handled.values().all(|s| s == "v1"),
        "the previous policy routes: {handled:?}"
    );
    Ok(())
}

async fn refused_runtime(
    w: &World,
    pod: &str,
    mesh: &str,
    labels: &[(&str, &str)],
    expect: &str,
) -> anyhow::Result<()> {
    create_operator_pod(&w.client, &w.ns, pod, labels).await?;
    let r = Replica::start_processes(&ReplicaOptions {
        mesh,
        pod,
        ..w.replica_options("v1")
    })
    .await?;
    // Refused with a clear message, and retried with backoff.
    eventually(
        &format!("two refusals saying {expect:?}"),
        TIMEOUT,
        || async {
            r.check_running()?;
            let log = r.sidecar.log_tail(200);
            let refusals = log
                .lines()
                .filter(|l| l.contains("refused") && l.contains(expect))
                .count();
            Ok((refusals >= 2).then_some(()))
        },
    )
    .await?;
    assert!(!r.ready(), "a refused runtime is not ready");
    Ok(())
}

#[tokio::test]
async fn unknown_meshes_and_foreign_pods_are_refused_with_a_clear_status() -> anyhow::Result<()> {
    let w = World::new("refuse").await?;
    apply_mesh(
        &w.client,
        &w.ns,
        "mesh",
        w.mesh_spec(
            json!({"weights": [{"subset": "v1", "weight": 100}]}),
            &["v1"],
        ),
    )
    .await?;
    let unknown = format!("{}/no-such-mesh", w.ns);
    refused_runtime(
        &w,
        "stray-0",
        &unknown,
        &[("app", "cmg"), ("version", "v1")],
        "no OperatorMesh",
    )
    .await?;
    let mesh = format!("{}/mesh", w.ns);
    refused_runtime(
        &w,
        "stray-1",
        &mesh,
        &[("app", "other"), ("version", "v1")],
        "do not match the mesh's spec.selector",
    )
    .await?;
    // A mesh that routes ConfigMapGenerators but not the ConfigMaps the
    // operator declares it owns (as a mesh of ConfigMaps would not route an
    // operator's Secrets): refused, naming the difference.
    let mut narrow = w.mesh_spec(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    );
    narrow["controllers"] = json!([{
        "primary": {"apiVersion": "example.opmesh.io/v1", "kind": "ConfigMapGenerator"},
    }]);
    apply_mesh(&w.client, &w.ns, "narrow", narrow).await?;
    let narrow = format!("{}/narrow", w.ns);
    refused_runtime(
        &w,
        "greedy-0",
        &narrow,
        &[("app", "cmg"), ("version", "v1")],
        "owned types the mesh does not route for example.opmesh.io/v1/ConfigMapGenerator: /v1/ConfigMap",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_sdk_without_a_sidecar_fails_fast() -> anyhow::Result<()> {
    let w = World::new("nosidecar").await?;
    let missing = w.dir.path().join("missing.sock");
    let op = Process::spawn_with_env(
        "lonely-operator",
        &w.bins.operator,
        &["run".into()],
        &[
            (
                "OPMESH_RUNTIME_SOCKET".into(),
                missing.display().to_string(),
            ),
            ("KUBECONFIG".into(), w.cp.kubeconfig().display().to_string()),
            ("RUST_BACKTRACE".into(), "0".into()),
        ],
        w.dir.path(),
        None,
    )?;
    let code = op
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the operator exits instead of hanging");
    assert_ne!(code, Some(0));
    let log = op.log_tail(500);
    assert!(log.contains("no opmesh runtime sidecar at"), "{log}");
    assert!(log.contains("OPMESH_RUNTIME_SOCKET"), "{log}");
    Ok(())
}

#[tokio::test]
async fn a_watch_the_manager_may_not_run_is_reported_and_recovers_once_granted()
-> anyhow::Result<()> {
    let w = World::new("rbac").await?;
    // A manager of its own, running as a ServiceAccount that may read
    // everything it needs except ConfigMaps (the example operator's owned kind).
    let mesh_ns = cluster::create_namespace(&w.client, "rbac-mesh", &[]).await?;
    let pod = cluster::create_pod(
        &w.client,
        &mesh_ns,
        "limited-manager",
        &[],
        "limited-manager",
    )
    .await?;
    let role = format!("opmesh-test-{mesh_ns}");
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| json!({"apiGroups": groups, "resources": resources, "verbs": verbs});
    let read = ["get", "list", "watch"];
    let mut rules = vec![
        rule(&["opmesh.io"], &["operatormeshes"], &read),
        rule(
            &["opmesh.io"],
            &["operatormeshes/status"],
            &["get", "patch", "update"],
        ),
        rule(&[""], &["pods", "namespaces"], &read),
        rule(&["example.opmesh.io"], &["configmapgenerators"], &read),
        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        rule(
            &["authorization.k8s.io"],
            &["subjectaccessreviews"],
            &["create"],
        ),
    ];
    let roles: Api<DynamicObject> = Api::all_with(
        w.client.clone(),
        &api_resource(
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            "clusterroles",
        ),
    );
    let apply_role = |rules: Vec<serde_json::Value>| {
        let roles = roles.clone();
        let role = role.clone();
        async move {
            let obj = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role}, "rules": rules});
            roles
                .patch(
                    &role,
                    &PatchParams::apply("opmesh-tests").force(),
                    &Patch::Apply(&obj),
                )
                .await
        }
    };
    apply_role(rules.clone()).await?;
    let bindings: Api<DynamicObject> = Api::all_with(
        w.client.clone(),
        &api_resource(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
        ),
    );
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "limited-manager", "namespace": mesh_ns}],
    });
    bindings
        .patch(
            &role,
            &PatchParams::apply("opmesh-tests").force(),
            &Patch::Apply(&binding),
        )
        .await?;
    let token = cluster::pod_token(&w.client, &pod, &[]).await?;
    let kubeconfig = w.dir.path().join("limited-manager.kubeconfig");
    cluster::write_token_kubeconfig(w.cp.kubeconfig(), &token, &kubeconfig)?;
    let port = opmesh_tests::control_plane::free_port()?;
    let manager = Manager::spawn(
        w.cp,
        &w.bins,
        w.dir.path(),
        port,
        &[
            "run".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--mesh-namespace={mesh_ns}"),
            format!(
                "--lease-ttl-ms={}",
                opmesh_tests::mesh::LEASE_TTL.as_millis()
            ),
        ],
        &[("KUBECONFIG", &kubeconfig.display().to_string())],
    )
    .await?;

    apply_mesh(
        &w.client,
        &mesh_ns,
        "mesh",
        w.mesh_spec(
            json!({"weights": [{"subset": "v1", "weight": 100}]}),
            &["v1"],
        ),
    )
    .await?;
    let replica = Replica::start(
        &w.client,
        &ReplicaOptions {
            manager: manager.addr(),
            mesh: &format!("{mesh_ns}/mesh"),
            namespace: &mesh_ns,
            pod: "v1-0",
            labels: &[("app", "cmg"), ("version", "v1")],
            ..w.replica_options("v1")
        },
    )
    .await?;
    let ns = w.object_namespace("rbac-data", &[]).await?;
    create_generator(&w.client, &ns, "gen", json!({})).await?;
    let namespaces = vec![ns];

    // Reported, with what to fix; nothing is placed on a partial view.
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &mesh_ns, &mesh_resource());
    let ready = |want: &'static str| {
        let meshes = meshes.clone();
        async move {
            let mesh = meshes.get("mesh").await?;
            let cond = mesh.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .cloned();
            anyhow::Ok(cond.filter(|c| c["status"] == want))
        }
    };
    let cond = eventually("Ready=False saying which watch fails", TIMEOUT, || async {
        manager.process().check_running()?;
        Ok(ready("False")
            .await?
            .filter(|c| c["reason"] == "WatchFailed"))
    })
    .await?;
    let message = cond["message"].as_str().unwrap_or_default();
    assert!(message.contains("/v1/ConfigMap"), "{message}");
    assert!(message.contains("forbidden"), "{message}");
    assert!(message.contains("RBAC"), "{message}");
    let handled = handled_by(&w.client, &namespaces).await?;
    assert_eq!(
        handled.values().filter(|v| v.is_some()).count(),
        0,
        "{handled:?}"
    );

    // Granting the missing permission recovers without a restart.
    rules.push(rule(&[""], &["configmaps"], &read));
    apply_role(rules).await?;
    eventually(
        "the object to be handled once the watch works",
        TIMEOUT,
        || async {
            manager.process().check_running()?;
            replica.check_running()?;
            let handled = handled_by(&w.client, &namespaces).await?;
            Ok(handled.values().all(Option::is_some).then_some(()))
        },
    )
    .await?;
    eventually("Ready=True", TIMEOUT, || async { ready("True").await }).await?;
    Ok(())
}

fn api_resource(api_version: &str, kind: &str, plural: &str) -> kube::api::ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

#[tokio::test]
async fn a_hello_declaring_secrets_for_a_mesh_of_configmaps_is_refused() -> anyhow::Result<()> {
    use opmesh_proto::v1::GroupVersionKind;
    use opmesh_tests::session;

    let w = World::new("secrets").await?;
    let mut spec = w.mesh_spec(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    );
    spec["controllers"] = json!([{"primary": {"apiVersion": "v1", "kind": "ConfigMap"}}]);
    apply_mesh(&w.client, &w.ns, "mesh", spec).await?;
    let labels = [("app", "cmg"), ("version", "v1")];
    let pod = create_operator_pod(&w.client, &w.ns, "greedy-0", &labels).await?;
    let token = cluster::pod_token(&w.client, &pod, &[opmesh_proto::env::TOKEN_AUDIENCE]).await?;
    let core = |kind: &str, plural: &str| GroupVersionKind {
        version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
        namespaced: true,
        ..Default::default()
    };
    let mut hello = session::hello(&w, "greedy-0", &token);
    hello.primary = Some(core("ConfigMap", "configmaps"));
    hello.owns = vec![core("Secret", "secrets")];
    let mut c = session::client(&w).await?;
    // The mesh may not have been compiled yet: wait until the answer is
    // about the types.
    let (code, message) = eventually("the hello to be refused for its types", TIMEOUT, || {
        let (mut c, hello) = (c.clone(), hello.clone());
        async move {
            let answer = session::send(&mut c, hello).await;
            Ok(answer.1.contains("Secret").then_some(answer))
        }
    })
    .await?;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("owned types the mesh does not route for /v1/ConfigMap: /v1/Secret"),
        "{message}"
    );
    // The same runtime declaring only ConfigMaps is admitted.
    hello.owns.clear();
    let (code, message) = session::send(&mut c, hello).await;
    assert_eq!(code, tonic::Code::Ok, "{message}");
    Ok(())
}

#[tokio::test]
async fn a_mesh_of_a_type_not_installed_says_so_and_routes_once_it_is() -> anyhow::Result<()> {
    let w = World::new("notyet").await?;
    // A type of this test's own: its CRD comes after the mesh.
    let group = format!("{}.example.opmesh.io", w.tag);
    let api_version = format!("{group}/v1");
    let mut spec = w.mesh_spec(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    );
    spec["controllers"] = json!([{"primary": {"apiVersion": api_version, "kind": "Gadget"}}]);
    apply_mesh(&w.client, &w.ns, "mesh", spec).await?;

    let (status, _, message) = eventually("Ready=False WatchFailed", TIMEOUT, || async {
        Ok(w.condition("Ready")
            .await?
            .filter(|(_, r, _)| r == "WatchFailed"))
    })
    .await?;
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!(
            "{api_version} Gadget is not served by the API server"
        )) && message.contains("install its CRD"),
        "{message}"
    );

    w.cp.install_crd_yaml(&format!(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: gadgets, singular: gadget, kind: Gadget, listKind: GadgetList}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"#
    ))
    .await?;
    let ns = w.object_namespace("notyet-data", &[]).await?;
    let gadgets: Api<DynamicObject> = Api::namespaced_with(
        w.client.clone(),
        &ns,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(&group, "v1", "Gadget"),
            "gadgets",
        ),
    );
    for i in 0..3 {
        let g: DynamicObject = serde_json::from_value(json!({
            "apiVersion": api_version, "kind": "Gadget",
            "metadata": {"name": format!("gadget-{i}"), "namespace": ns},
        }))?;
        gadgets.create(&Default::default(), &g).await?;
    }
    // No replica has come, yet the mesh routes its keys and says what is
    // missing now.
    let shares = w.observed_shares(3).await?;
    assert_eq!(shares["v1"].0, 3, "{shares:?}");
    let (status, reason, message) = eventually("Ready=False NoReplicas", TIMEOUT, || async {
        Ok(w.condition("Ready")
            .await?
            .filter(|(_, r, _)| r != "WatchFailed"))
    })
    .await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NoReplicas"),
        "{message}"
    );
    Ok(())
}
