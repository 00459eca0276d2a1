//! The sidecar-injection webhook on the real apiserver, which calls the
//! manager over TLS on loopback: labelled pods (also those a Deployment
//! makes through its ReplicaSet) get the runtime, others are
//! untouched, a pod two meshes select is refused, injecting twice changes
//! nothing, and with the webhook down a labelled pod is refused rather than
//! started without its sidecar.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{Container, Pod, PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use opmesh_proto::env;
use opmesh_tests::{
    ControlPlane,
    control_plane::free_port,
    eventually,
    injected::{run_injected, runtime_of},
    mesh::{apply_mesh, create_generator, grant_example_reads, handled_by},
    tls::MeshTls,
    world::{TIMEOUT, World},
};
use serde_json::json;

const MESH_LABEL: &str = "opmesh.io/mesh";

fn pod(name: &str, labels: &[(&str, &str)], spec: Option<PodSpec>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(spec.unwrap_or(PodSpec {
            service_account_name: Some("operator".into()),
            containers: vec![Container {
                name: "operator".into(),
                image: Some("configmap-generator:dev".into()),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn labelled_operator_pods_get_the_runtime_and_nothing_else_changes() -> anyhow::Result<()> {
    // The controller-manager makes a Deployment's pods as in a cluster: by
    // its ReplicaSet, through the webhook.
    ControlPlane::shared().await?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let w = World::with_manager_env("webhook", &[("OPMESH_WEBHOOK_LISTEN", &listen)]).await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;

    opmesh_tests::cluster::ensure_service_account(&w.client, &w.ns, "operator").await?;

    // The webhook, scoped to labelled pods of this test's namespace.
    let name = format!("opmesh-{}", w.ns);
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(w.client.clone());
    let config = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "inject.opmesh.io".into(),
            client_config: WebhookClientConfig {
                url: Some(format!("https://{listen}/mutate-pods")),
                ca_bundle: Some(ByteString(
                    MeshTls::shared(w.cp.dir()).ca_pem.clone().into_bytes(),
                )),
                ..Default::default()
            },
            rules: Some(vec![RuleWithOperations {
                operations: Some(vec!["CREATE".into()]),
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                resources: Some(vec!["pods".into()]),
                ..Default::default()
            }]),
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: MESH_LABEL.into(),
                    operator: "Exists".into(),
                    values: None,
                }]),
                ..Default::default()
            }),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    w.ns.clone(),
                )])),
                ..Default::default()
            }),
            // An opted-in pod without its sidecar would reconcile nothing,
            // or worse: refuse it while the webhook is down.
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            admission_review_versions: vec!["v1".into()],
            timeout_seconds: Some(5),
            ..Default::default()
        }]),
    };
    webhooks.create(&PostParams::default(), &config).await?;

    // A labelled operator pod comes back with the runtime. (The apiserver
    // takes a moment to pick the configuration up.)
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &w.ns);
    let labels = [("app", "cmg"), ("version", "v1"), (MESH_LABEL, "mesh")];
    let mut n = 0;
    let injected = eventually("a labelled pod to be injected", TIMEOUT, || {
        n += 1;
        let (pods, name) = (pods.clone(), format!("op-{n}"));
        async move {
            let created = pods
                .create(&PostParams::default(), &pod(&name, &labels, None))
                .await?;
            if runtime_of(&created).is_some() {
                return Ok(Some(created));
            }
            pods.delete(&name, &DeleteParams::default()).await?;
            Ok(None)
        }
    })
    .await?;
    let runtime = runtime_of(&injected).expect("injected");
    assert_eq!(runtime.restart_policy.as_deref(), Some("Always"));
    let envs = runtime.env.clone().unwrap_or_default();
    let var = |n: &str| envs.iter().find(|e| e.name == n).cloned();
    assert_eq!(
        var(env::MESH).and_then(|e| e.value),
        Some(format!("{}/mesh", w.ns))
    );
    assert!(var(env::POD_NAME).and_then(|e| e.value_from).is_some());
    let sc = runtime.security_context.clone().unwrap_or_default();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_string()])
    );
    let spec = injected.spec.clone().unwrap_or_default();
    let operator = &spec.containers[0];
    assert!(
        operator
            .env
            .iter()
            .flatten()
            .any(|e| e.name == env::RUNTIME_SOCKET),
        "the operator does not know where the socket is"
    );
    let audience = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref()?.sources.clone())
        .flatten()
        .find_map(|s| s.service_account_token?.audience);
    assert_eq!(audience.as_deref(), Some(env::TOKEN_AUDIENCE));

    // The pods a labelled operator Deployment makes, through its
    // ReplicaSet, come back injected.
    let deployments: Api<Deployment> = Api::namespaced(w.client.clone(), &w.ns);
    let template_labels: BTreeMap<String, String> = [
        ("app", "cmg"),
        ("version", "v1"),
        ("deployment", "operator"),
        (MESH_LABEL, "mesh"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some("operator".into()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "deployment".to_string(),
                    "operator".to_string(),
                )])),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    ..Default::default()
                }),
                spec: pod("template", &[], None).spec,
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    let made = eventually("the Deployment's pods to be made", TIMEOUT, || async {
        let list = pods
            .list(&kube::api::ListParams::default().labels("deployment=operator"))
            .await?;
        Ok((list.items.len() == 2).then_some(list.items))
    })
    .await?;
    for p in &made {
        assert!(
            runtime_of(p).is_some(),
            "{} was made without the runtime",
            p.metadata.name.clone().unwrap_or_default()
        );
    }

    // The injected spec runs: the runtime and the operator, started with
    // exactly the injected environment, reconcile an object end to end.
    let pod_name = injected.metadata.name.clone().unwrap_or_default();
    grant_example_reads(&w.client, &w.ns).await?;
    let records = w.dir.path().join("injected.jsonl").display().to_string();
    let running = run_injected(
        w.cp,
        &w.bins,
        w.dir.path(),
        &injected,
        w.manager.addr(),
        &[("OPMESH_EXAMPLE_RECORDS", &records)],
    )
    .await?;
    let data = w.object_namespace("webhook-data", &[]).await?;
    create_generator(&w.client, &data, "app", json!({"data": {"n": "0"}})).await?;
    let handled = eventually("the injected replica to reconcile", TIMEOUT, || async {
        running.runtime.check_running()?;
        running.operator.check_running()?;
        let all = handled_by(&w.client, std::slice::from_ref(&data)).await?;
        Ok(all.values().next().cloned().flatten())
    })
    .await?;
    assert_eq!(handled, format!("v1/{pod_name}"));

    // Injecting the injected spec again changes nothing.
    let again = pods
        .create(
            &PostParams::default(),
            &pod("again", &labels, injected.spec.clone()),
        )
        .await?;
    let again_spec = again.spec.clone().unwrap_or_default();
    assert_eq!(again_spec.init_containers, spec.init_containers);
    assert_eq!(again_spec.containers, spec.containers);
    assert_eq!(again_spec.volumes, spec.volumes);

    // An unlabelled pod is untouched.
    let plain = pods
        .create(
            &PostParams::default(),
            &pod("plain", &[("app", "cmg")], None),
        )
        .await?;
    assert!(runtime_of(&plain).is_none());
    assert!(
        plain
            .spec
            .unwrap_or_default()
            .volumes
            .unwrap_or_default()
            .is_empty()
    );

    // A pod two meshes select is refused, naming both.
    let mut spec2 = w.mesh_spec(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    );
    spec2["subsets"] = json!([{"name": "v1", "labels": {"version": "v1"}}]);
    apply_mesh(&w.client, &w.ns, "mesh-two", spec2).await?;
    let err = pods
        .create(&PostParams::default(), &pod("contested", &labels, None))
        .await
        .expect_err("a pod two meshes select was admitted");
    let message = err.to_string();
    assert!(
        message.contains("two meshes select this pod")
            && message.contains(&format!("{}/mesh ", w.ns))
            && message.contains(&format!("{}/mesh-two", w.ns)),
        "{message}"
    );

    // With the webhook down, a labelled pod is refused, saying which
    // webhook failed; an unlabelled one is admitted as ever.
    w.manager.process().signal("KILL").await?;
    let err = pods
        .create(&PostParams::default(), &pod("orphan", &labels, None))
        .await
        .expect_err("a labelled pod started without its sidecar");
    assert!(err.to_string().contains("inject.opmesh.io"), "{err}");
    pods.create(
        &PostParams::default(),
        &pod("bystander", &[("app", "other")], None),
    )
    .await?;
    webhooks.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}
