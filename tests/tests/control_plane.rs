//! The test control plane is real: CRDs, watches, RBAC and bound tokens work
//! as they do in a cluster.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::ConfigMap,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
        CustomResourceDefinitionVersion, CustomResourceValidation, JSONSchemaProps,
    },
};
use kube::{
    Api, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams,
        PostParams,
    },
    runtime::watcher,
};
use opmesh_tests::{ControlPlane, cluster, eventually};

const TIMEOUT: Duration = Duration::from_secs(30);

fn widget_crd() -> CustomResourceDefinition {
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some("widgets.e2e.opmesh.io".into()),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: "e2e.opmesh.io".into(),
            names: CustomResourceDefinitionNames {
                kind: "Widget".into(),
                plural: "widgets".into(),
                singular: Some("widget".into()),
                list_kind: Some("WidgetList".into()),
                ..Default::default()
            },
            scope: "Namespaced".into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: "v1".into(),
                served: true,
                storage: true,
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(JSONSchemaProps {
                        type_: Some("object".into()),
                        x_kubernetes_preserve_unknown_fields: Some(true),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

#[tokio::test]
async fn crd_objects_are_watched_through_added_modified_deleted() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.failure_guard();
    let client = cp.client().await?;
    let ns = cluster::create_namespace(&client, "watch", &[("team", "e2e")]).await?;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "widgets.e2e.opmesh.io",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&widget_crd()),
    )
    .await?;
    eventually("the Widget CRD to be served", TIMEOUT, || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("widgets.e2e.opmesh.io").await?;
            let ok = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(ok.then_some(()))
        }
    })
    .await?;

    let gvk = GroupVersionKind::gvk("e2e.opmesh.io", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);

    // Start watching before the object exists, so every change is an event.
    let mut events = watcher(widgets.clone(), watcher::Config::default()).boxed();
    let mut next_event = async || -> anyhow::Result<watcher::Event<DynamicObject>> {
        loop {
            let ev = tokio::time::timeout(TIMEOUT, events.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
            // The initial (empty) list is Init then InitDone; skip to InitDone.
            if !matches!(ev, watcher::Event::Init) {
                return Ok(ev);
            }
        }
    };
    assert!(matches!(next_event().await?, watcher::Event::InitDone));

    let mut obj = DynamicObject::new("w1", &ar).within(&ns);
    obj.data = serde_json::json!({"spec": {"size": 1}});
    widgets.create(&PostParams::default(), &obj).await?;
    match next_event().await? {
        watcher::Event::Apply(o) => {
            assert_eq!(o.name_any(), "w1");
            assert_eq!(o.data["spec"]["size"], 1);
        }
        other => panic!("expected the Added event, got {other:?}"),
    }

    widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"size": 2}})),
        )
        .await?;
    match next_event().await? {
        watcher::Event::Apply(o) => assert_eq!(o.data["spec"]["size"], 2),
        other => panic!("expected the Modified event, got {other:?}"),
    }

    widgets.delete("w1", &DeleteParams::default()).await?;
    match next_event().await? {
        watcher::Event::Delete(o) => assert_eq!(o.name_any(), "w1"),
        other => panic!("expected the Deleted event, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn service_account_without_grants_is_forbidden() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.failure_guard();
    let client = cp.client().await?;
    let ns = cluster::create_namespace(&client, "rbac", &[]).await?;
    let pod = cluster::create_pod(&client, &ns, "nobody", &[("app", "x")], "nobody").await?;
    let token = cluster::pod_token(&client, &pod, &[]).await?;

    let as_sa = cluster::client_with_token(cp.kubeconfig(), &token).await?;
    let err = Api::<ConfigMap>::namespaced(as_sa, &ns)
        .list(&Default::default())
        .await
        .expect_err("a ServiceAccount with no RBAC grants must not list ConfigMaps");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "expected 403 Forbidden, got {status:?}");
            assert!(
                status
                    .message
                    .contains(&format!("system:serviceaccount:{ns}:nobody")),
                "the refusal names the ServiceAccount: {}",
                status.message
            );
        }
        other => panic!("expected 403 Forbidden, got {other}"),
    }
    // The admin, by contrast, is allowed.
    Api::<ConfigMap>::namespaced(client, &ns)
        .list(&Default::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn bound_pod_token_passes_token_review_with_pod_name() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.failure_guard();
    let client = cp.client().await?;
    let ns = cluster::create_namespace(&client, "token", &[]).await?;
    let pod = cluster::create_pod(&client, &ns, "operator-0", &[("app", "op")], "operator").await?;

    let token = cluster::pod_token(&client, &pod, &[]).await?;
    let review = cluster::review_token(&client, &token).await?;
    assert_eq!(review.authenticated, Some(true), "review: {review:?}");
    let user = review.user.expect("an authenticated review names the user");
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:operator").as_str())
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["operator-0".to_string()]),
        "extra: {extra:?}"
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-uid"),
        Some(&vec![pod.uid().expect("created pods have a uid")])
    );

    // A forged token is not authenticated.
    let forged = cluster::review_token(&client, &format!("{token}x")).await?;
    assert_ne!(forged.authenticated, Some(true));
    Ok(())
}

#[tokio::test]
async fn namespaces_finish_deleting_owned_objects_are_collected_and_deployments_make_pods()
-> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.failure_guard();
    let client = cp.client().await?;
    let ns = cluster::create_namespace(&client, "lifecycle", &[]).await?;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);

    // A dependent goes when its owner does.
    let owner = configmaps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let reference = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        ..Default::default()
    };
    configmaps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("dependent".into()),
                    owner_references: Some(vec![reference]),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    configmaps.delete("owner", &DeleteParams::default()).await?;
    eventually("the dependent to be garbage-collected", TIMEOUT, || async {
        Ok(configmaps
            .get_opt("dependent")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    // A Deployment's ReplicaSet makes its Pods.
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "web:1"}]}
                }
            }
        }))?;
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &deployment)
        .await?;
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
    eventually("the Deployment's two pods", TIMEOUT, || async {
        let list = pods.list(&Default::default()).await?;
        Ok((list.items.len() == 2).then_some(()))
    })
    .await?;

    // A deleted namespace is emptied and then gone, not left Terminating.
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    eventually("the namespace to finish deleting", TIMEOUT, || async {
        Ok(namespaces.get_opt(&ns).await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}
