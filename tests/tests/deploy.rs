//! The manifests in `deploy/` (the kustomize install and the example
//! operator): the apiserver accepts them with strict field validation, they set only settings the binaries know, and their RBAC is
//! enough — the manager and the example operator (its runtime injected by
//! the manager's webhook), each running as its own ServiceAccount,
//! reconcile objects end to end.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration, apps::v1::Deployment,
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{Api, Client, ResourceExt as _, api::DynamicObject};
use opmesh_proto::env;
use opmesh_tests::{
    ControlPlane, cluster,
    control_plane::{free_port, repo_root},
    eventually, injected, manifests,
    mesh::{Binaries, Manager, create_generator, handled_by, mesh_resource},
    oracle::exact,
    tls::MeshTls,
};
use serde_json::json;

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

#[tokio::test]
async fn the_manifests_run_the_example_operator_as_their_service_accounts() -> anyhow::Result<()> {
    // The controller-manager's aggregation controller fills the manager's
    // aggregated read ClusterRole.
    let cp = ControlPlane::shared().await?;
    let bins = Binaries::locate()?;
    let client = cp.client().await?;
    let deploy = repo_root().join("deploy");

    // The example CRD is generated, like the OperatorMesh one.
    let committed = std::fs::read_to_string(deploy.join("examples/configmap-generator/crd.yaml"))?;
    let generated = Command::new(&bins.operator).arg("crd").output()?;
    assert_eq!(
        committed,
        String::from_utf8(generated.stdout)?,
        "deploy/examples/configmap-generator/crd.yaml is stale; regenerate it with \
         `cargo run -p opmesh-sdk --example configmap_generator -- crd`"
    );
    cp.install_crd_yaml(&committed).await?;

    // The install as a user applies it: the kustomize overlay in which the
    // manager makes its own certificate.
    let overlay = "overlays/self-managed";
    let mut objects = manifests::apply(
        &client,
        &manifests::kustomize(overlay)?,
        &format!("kubectl kustomize {overlay}"),
        false,
    )
    .await?;
    // The injection webhook's configuration, pointed at this test's manager
    // on loopback instead of its Service (nothing routes Services here), and
    // kept to this namespace.
    let webhook = objects
        .iter()
        .find(|o| {
            o.types
                .as_ref()
                .is_some_and(|t| t.kind == "MutatingWebhookConfiguration")
        })
        .context("the install has no webhook configuration")?
        .name_any();
    let webhook_port = free_port()?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = configs.get(&webhook).await?;
    for w in config.webhooks.iter_mut().flatten() {
        w.client_config.service = None;
        w.client_config.url = Some(format!("https://127.0.0.1:{webhook_port}/mutate-pods"));
        w.client_config.ca_bundle = Some(ByteString(
            MeshTls::shared(cp.dir()).ca_pem.clone().into_bytes(),
        ));
        w.namespace_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                "configmap-generator".to_string(),
            )])),
            ..Default::default()
        });
    }
    configs
        .replace(&config.name_any(), &Default::default(), &config)
        .await?;
    let example = deploy.join("examples/configmap-generator/operator.yaml");
    objects.extend(
        manifests::apply(
            &client,
            &manifests::documents(&std::fs::read_to_string(&example)?)?,
            &example.display().to_string(),
            false,
        )
        .await?,
    );

    // The example's read grant is folded into the manager's aggregated
    // ClusterRole.
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
    eventually(
        "the manager's aggregated ClusterRole to grant the example's types",
        TIMEOUT,
        || async {
            let role = roles.get("opmesh-manager-reads").await?;
            let resources: Vec<String> = role
                .rules
                .unwrap_or_default()
                .into_iter()
                .flat_map(|r| r.resources.unwrap_or_default())
                .collect();
            Ok((resources.iter().any(|r| r == "configmapgenerators")
                && resources.iter().any(|r| r == "configmaps"))
            .then_some(()))
        },
    )
    .await?;

    // Every environment variable a container sets is one its binary reads.
    let deployments: BTreeMap<String, Deployment> = objects
        .iter()
        .filter(|o| o.types.as_ref().is_some_and(|t| t.kind == "Deployment"))
        .map(|o| {
            Ok((
                o.name_any(),
                serde_json::from_value(serde_json::to_value(o)?)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(deployments.len(), 3, "{:?}", deployments.keys());
    for (name, d) in &deployments {
        let pod = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("no pod spec")?;
        for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
            let command = c.command.clone().unwrap_or_default();
            // Settings come from each binary's flags (shown with their
            // variables in --help); an SDK operator also reads the socket
            // path the SDK documents.
            let (bin, sub, sdk) = match command.first().map(String::as_str) {
                Some("opmesh-manager") => (&bins.manager, vec!["run"], &[][..]),
                Some("opmesh-runtime") => (&bins.runtime, vec![], &[][..]),
                Some("configmap_generator") => {
                    (&bins.operator, vec!["run"], &[env::RUNTIME_SOCKET][..])
                }
                other => anyhow::bail!("{name}/{}: unknown command {other:?}", c.name),
            };
            // A runtime has no default for the settings that say who it is.
            if command.first().map(String::as_str) == Some("opmesh-runtime") {
                for var in env::REQUIRED {
                    assert!(
                        c.env.iter().flatten().any(|v| v.name == var),
                        "{name}/{}: the runtime needs {var}",
                        c.name
                    );
                }
            }
            let help = Command::new(bin).args(&sub).arg("--help").output()?;
            let help = String::from_utf8_lossy(&help.stdout);
            for var in c.env.iter().flatten() {
                assert!(
                    help.contains(&format!("env: {}=", var.name))
                        || sdk.contains(&var.name.as_str()),
                    "{name}/{}: {} is not a setting of {}",
                    c.name,
                    var.name,
                    bin.display()
                );
            }
        }
    }

    // Pods as the Deployments would create them (nothing runs them here;
    // the processes below stand in for their containers).
    let manager_pod = pod_from(&client, &deployments["opmesh-manager"], "opmesh-manager-0").await?;

    let dir = tempfile::Builder::new()
        .prefix("opmesh-deploy-")
        .tempdir()?;
    let as_pod = |pod: Pod| {
        let path = dir.path().join(format!("{}.kubeconfig", pod.name_any()));
        let client = client.clone();
        async move {
            let token = cluster::pod_token(&client, &pod, &[]).await?;
            cluster::write_token_kubeconfig(cp.kubeconfig(), &token, &path)?;
            anyhow::Ok(path.display().to_string())
        }
    };
    let manager_kubeconfig = as_pod(manager_pod).await?;
    // Least privilege: the manager reads what meshes declare, not Secrets.
    let as_manager =
        opmesh_tests::control_plane::client_from_kubeconfig(Path::new(&manager_kubeconfig)).await?;
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::all(as_manager)
        .list(&Default::default())
        .await;
    assert!(
        matches!(&secrets, Err(kube::Error::Api(e)) if e.code == 403),
        "the manager's ServiceAccount may list Secrets: {:?}",
        secrets.map(|l| l.items.len())
    );
    let port = free_port()?;
    let manager = Manager::spawn(
        cp,
        &bins,
        dir.path(),
        port,
        &[
            "run".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--webhook-listen=127.0.0.1:{webhook_port}"),
            "--mesh-namespace=configmap-generator".into(),
            "--leader-election".into(),
            "--lease-namespace=opmesh-system".into(),
            "--identity=opmesh-manager-0".into(),
        ],
        &[("KUBECONFIG", &manager_kubeconfig)],
    )
    .await?;
    // The operator pods as their Deployments would make them, through the
    // webhook: each comes back with the runtime, whose settings are all
    // ones the runtime reads, and runs as injected.
    let runtime_help = Command::new(&bins.runtime).arg("--help").output()?;
    let runtime_help = String::from_utf8_lossy(&runtime_help.stdout).to_string();
    let mut replicas = Vec::new();
    for (deployment, name) in [
        ("configmap-generator-v1", "configmap-generator-v1-0"),
        ("configmap-generator-v2", "configmap-generator-v2-0"),
    ] {
        let pod = injected::create_injected(
            &client,
            "configmap-generator",
            &pod_of(&deployments[deployment], name)?,
        )
        .await?;
        let runtime = injected::runtime_of(&pod).context("injected")?;
        for var in env::REQUIRED {
            assert!(
                runtime.env.iter().flatten().any(|v| v.name == var),
                "{name}: the injected runtime lacks {var}"
            );
        }
        for var in runtime.env.iter().flatten() {
            assert!(
                runtime_help.contains(&format!("env: {}=", var.name)),
                "{name}: the injected {} is not a setting of the runtime",
                var.name
            );
        }
        let kubeconfig = as_pod(pod.clone()).await?;
        replicas.push(
            injected::run_injected(
                cp,
                &bins,
                dir.path(),
                &pod,
                manager.addr(),
                &[("KUBECONFIG", &kubeconfig)],
            )
            .await?,
        );
    }

    // The mesh as applied routes 95/5 by namespace, apportioned exactly:
    // of 20 namespaces, the canary gets 1.
    let mut namespaces = Vec::new();
    for i in 0..20 {
        let ns = format!("team-{i}");
        cluster::create_named_namespace(&client, &ns, &[]).await?;
        create_generator(&client, &ns, "settings", json!({"data": {"team": ns}})).await?;
        namespaces.push(ns);
    }
    let handled = eventually("every object to be handled", TIMEOUT, || async {
        manager.process().check_running()?;
        for r in &replicas {
            r.runtime.check_running()?;
            r.operator.check_running()?;
        }
        let all = handled_by(&client, &namespaces).await?;
        Ok((all.len() == namespaces.len() && all.values().all(Option::is_some)).then_some(all))
    })
    .await?;
    let want = exact(&namespaces, &[("v1", 95), ("v2", 5)]);
    assert_eq!(want.values().filter(|s| **s == "v2").count(), 1);
    for (key, by) in &handled {
        let by = by.as_deref().unwrap_or_default();
        let (ns, name) = key.split_once('/').context("key")?;
        let pod = match want[ns] {
            "v2" => "v2/configmap-generator-v2-0",
            _ => "v1/configmap-generator-v1-0",
        };
        assert!(by.starts_with(pod), "{key}: handled by {by}, want {pod}");
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
            .get(&format!("{name}-generated"))
            .await
            .with_context(|| format!("the ConfigMap of {key}"))?;
    }

    // The manager may write status and hold its Lease.
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "configmap-generator", &mesh_resource());
    eventually("the mesh to report Ready", TIMEOUT, || async {
        let mesh = meshes.get("configmap-generator").await?;
        let ready = mesh.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        Ok(ready.then_some(()))
    })
    .await?;
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        client.clone(),
        "opmesh-system",
    )
    .get("opmesh-manager")
    .await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("opmesh-manager-0")
    );
    Ok(())
}

/// A Pod as Deployment `d` would make it, named `name`.
fn pod_of(d: &Deployment, name: &str) -> anyhow::Result<Pod> {
    let ns = d.namespace().context("deployment namespace")?;
    let template = d.spec.as_ref().context("deployment spec")?.template.clone();
    let mut pod = Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: template.spec,
        ..Default::default()
    };
    pod.metadata.name = Some(name.to_string());
    pod.metadata.namespace = Some(ns);
    Ok(pod)
}

/// Creates a Pod as Deployment `d` would make it, named `name`.
async fn pod_from(client: &Client, d: &Deployment, name: &str) -> anyhow::Result<Pod> {
    let pod = pod_of(d, name)?;
    let ns = pod.namespace().unwrap_or_default();
    Ok(Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &pod)
        .await?)
}
