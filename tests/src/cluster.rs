//! Helpers that set up what a test needs in the cluster: namespaces, Pods
//! with labels, ServiceAccounts and their grants, bound tokens and token
//! reviews.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;
use k8s_openapi::api::{
    authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
        TokenReviewStatus,
    },
    core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Creates a namespace named `<prefix>-<pid>-<n>` with `labels` and returns
/// its name. Each test makes its own, so tests sharing a control plane never
/// see each other's objects.
pub async fn create_namespace(
    client: &Client,
    prefix: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<String> {
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    create_named_namespace(client, &name, labels).await?;
    Ok(name)
}

/// Creates namespace `name` with `labels`.
pub async fn create_named_namespace(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<()> {
    let name = name.to_string();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(to_map(labels)),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// Creates a Pod object with `labels`, running as ServiceAccount
/// `service_account` (created if missing). No kubelet runs, so the Pod stays
/// Pending, which is enough for it to be an identity.
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    service_account: &str,
) -> anyhow::Result<Pod> {
    ensure_service_account(client, namespace, service_account).await?;
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(to_map(labels)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(service_account.to_string()),
            containers: vec![Container {
                name: "operator".into(),
                image: Some("opmesh.io/placeholder:never-pulled".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {namespace}/{name}"))
}

/// Creates ServiceAccount `name` in `namespace` unless it exists.
pub async fn ensure_service_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating serviceaccount {namespace}/{name}")),
    }
}

/// Lets ServiceAccount `namespace/service_account` `verbs` the resources
/// `(group, plural)` in all namespaces, through ClusterRole `role` (made or
/// updated) and a binding of its own.
pub async fn grant_cluster(
    client: &Client,
    role: &str,
    resources: &[(&str, &str)],
    verbs: &[&str],
    namespace: &str,
    service_account: &str,
) -> anyhow::Result<()> {
    let rules = rules(resources, verbs);
    let cluster_role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(role.to_string()),
            ..Default::default()
        },
        rules: Some(rules),
        ..Default::default()
    };
    let binding_name = format!("{role}:{namespace}:{service_account}");
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: service_account.to_string(),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        }]),
    };
    let apply = PatchParams::apply("opmesh-tests").force();
    Api::<ClusterRole>::all(client.clone())
        .patch(role, &apply, &Patch::Apply(&cluster_role))
        .await
        .with_context(|| format!("applying clusterrole {role}"))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(&binding_name, &apply, &Patch::Apply(&binding))
        .await
        .with_context(|| format!("applying clusterrolebinding {binding_name}"))?;
    Ok(())
}

/// Lets ServiceAccount `namespace/service_account` `verbs` the resources
/// `(group, plural)` in `namespace` only, through Role `role` and a
/// binding of the same name.
pub async fn grant_namespace(
    client: &Client,
    namespace: &str,
    role: &str,
    resources: &[(&str, &str)],
    verbs: &[&str],
    service_account: &str,
) -> anyhow::Result<()> {
    ensure_service_account(client, namespace, service_account).await?;
    let r = Role {
        metadata: ObjectMeta {
            name: Some(role.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        rules: Some(rules(resources, verbs)),
    };
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(role.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: role.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: service_account.to_string(),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        }]),
    };
    let apply = PatchParams::apply("opmesh-tests").force();
    Api::<Role>::namespaced(client.clone(), namespace)
        .patch(role, &apply, &Patch::Apply(&r))
        .await
        .with_context(|| format!("applying role {namespace}/{role}"))?;
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(role, &apply, &Patch::Apply(&binding))
        .await
        .with_context(|| format!("applying rolebinding {namespace}/{role}"))?;
    Ok(())
}

/// A token of ServiceAccount `namespace/name` for the apiserver's own
/// audience, as `kubectl create token` makes, valid for an hour.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<String> {
    ensure_service_account(client, namespace, name).await?;
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: Some(TokenRequestSpec {
            audiences: None,
            bound_object_ref: None,
            expiration_seconds: Some(3600),
        }),
        status: None,
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
    issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")
}

/// One rule per `(group, plural)`, each allowing `verbs`.
fn rules(resources: &[(&str, &str)], verbs: &[&str]) -> Vec<PolicyRule> {
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    resources
        .iter()
        .map(|(group, plural)| PolicyRule {
            api_groups: strings(&[group]),
            resources: strings(&[plural]),
            verbs: strings(verbs).unwrap_or_default(),
            ..Default::default()
        })
        .collect()
}

/// Requests a token for the Pod's ServiceAccount that is bound to the Pod
/// (TokenRequest), valid for an hour.
pub async fn pod_token(client: &Client, pod: &Pod, audiences: &[&str]) -> anyhow::Result<String> {
    let namespace = pod.namespace().context("pod has no namespace")?;
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .context("pod has no serviceAccountName")?;
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: Some(TokenRequestSpec {
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            expiration_seconds: Some(3600),
        }),
        status: None,
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for {namespace}/{sa}"))?;
    issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")
}

/// Reviews a token (TokenReview) and returns the result.
pub async fn review_token(client: &Client, token: &str) -> anyhow::Result<TokenReviewStatus> {
    let review = TokenReview {
        metadata: ObjectMeta::default(),
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: None,
        },
        status: None,
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .context("creating TokenReview")?;
    reviewed.status.context("TokenReview has no status")
}

/// A client that authenticates with a bearer token instead of the admin
/// certificate, for checking what a ServiceAccount may do.
pub async fn client_with_token(
    kubeconfig: &std::path::Path,
    token: &str,
) -> anyhow::Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Ok(Client::try_from(config)?)
}

/// Writes a copy of the `admin` kubeconfig that authenticates with `token`
/// instead, for running a process as a ServiceAccount.
pub fn write_token_kubeconfig(
    admin: &std::path::Path,
    token: &str,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let mut kc = kube::config::Kubeconfig::read_from(admin)?;
    for user in &mut kc.auth_infos {
        user.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        });
    }
    std::fs::write(path, serde_norway::to_string(&kc)?)?;
    Ok(())
}

fn to_map(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
