//! Installing opmesh with the Helm chart or with kustomize: the chart lints
//! clean and refuses bad values by name, both render the same objects for
//! each way of getting the manager's certificate, and the real apiserver
//! accepts every rendered object with strict field validation (a
//! server-side dry run; cert-manager's and prometheus-operator's own CRDs
//! are installed for their kinds).

use std::collections::BTreeMap;

use anyhow::Context as _;
use opmesh_tests::{
    ControlPlane, cluster,
    control_plane::repo_root,
    manifests::{self, apply, go_tool, helm_template, kustomize},
};
use serde_json::Value;

/// Labels Helm adds for its own bookkeeping; kustomize has no release.
const HELM_ONLY_LABELS: [&str; 3] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
];

#[tokio::test]
async fn the_chart_and_kustomize_render_the_same_objects_and_the_apiserver_accepts_both()
-> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    for crds in ["cert-manager-crds", "prometheus-operator-crds"] {
        cp.install_crds(&go_tool(crds)?).await?;
    }
    cluster::create_named_namespace(&client, "opmesh-system", &[]).await?;

    // The chart's version of opmesh is the workspace's.
    let chart: Value = serde_norway::from_str(&std::fs::read_to_string(
        repo_root().join("deploy/helm/opmesh/Chart.yaml"),
    )?)?;
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));

    for (mode, overlay) in [
        ("self-managed", "overlays/self-managed"),
        ("cert-manager", "overlays/cert-manager"),
    ] {
        let set = format!("tls.mode={mode}");
        let lint = manifests::run(
            "helm",
            &["lint", "--strict", "deploy/helm/opmesh", "--set", &set],
        )?;
        assert!(
            lint.contains("0 chart(s) failed")
                && !lint.contains("[WARNING]")
                && !lint.contains("[ERROR]"),
            "helm lint ({mode}):\n{lint}"
        );

        let helm = helm_template("opmesh-system", &[&set])?;
        let kustomized = kustomize(overlay)?;
        let from_helm = by_identity(&helm)?;
        let mut from_kustomize = by_identity(&kustomized)?;
        // helm leaves the namespace to `--create-namespace`.
        assert!(
            from_kustomize
                .remove("v1/Namespace /opmesh-system")
                .is_some()
        );
        assert_eq!(
            from_helm.keys().collect::<Vec<_>>(),
            from_kustomize.keys().collect::<Vec<_>>(),
            "{mode}: the chart and {overlay} render different sets of objects"
        );
        for (id, object) in &from_helm {
            let mut differences = Vec::new();
            differ("", object, &from_kustomize[id], &mut differences);
            assert!(
                differences.is_empty(),
                "{mode}: {id} differs between the chart and {overlay}:\n{}",
                differences.join("\n")
            );
        }

        apply(&client, &helm, &format!("helm template ({mode})"), true).await?;
        apply(
            &client,
            &kustomized,
            &format!("kubectl kustomize {overlay}"),
            true,
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_chart_takes_its_registry_tag_namespace_and_monitoring_as_values() -> anyhow::Result<()>
{
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    cp.install_crds(&go_tool("prometheus-operator-crds")?)
        .await?;
    let ns = cluster::create_namespace(&client, "platform-mesh", &[]).await?;

    let objects = helm_template(
        &ns,
        &[
            "image.registry=registry.example.com/platform",
            "image.tag=1.2.3-rc.1",
            "monitoring.podMonitor.enabled=true",
            "monitoring.serviceMonitor.enabled=true",
            "manager.replicas=3",
        ],
    )?;
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .context("no Deployment")?;
    assert_eq!(deployment["metadata"]["namespace"], ns.as_str());
    assert_eq!(deployment["spec"]["replicas"], 3);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com/platform/opmesh-manager:1.2.3-rc.1"
    );
    let env: BTreeMap<&str, &Value> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, &e["value"])))
        .collect();
    // What the webhook injects, and where its certificate is valid, follow
    // the release.
    assert_eq!(
        env["OPMESH_RUNTIME_IMAGE"],
        "registry.example.com/platform/opmesh-runtime:1.2.3-rc.1"
    );
    assert_eq!(
        env["OPMESH_INJECTED_MANAGER_ADDR"],
        format!("https://opmesh-manager.{ns}.svc:9440").as_str()
    );
    assert_eq!(
        env["OPMESH_TLS_DNS_NAMES"],
        format!("opmesh-manager.{ns}.svc,opmesh-manager.{ns}.svc.cluster.local").as_str()
    );
    assert_eq!(
        env["OPMESH_TLS_SECRET"],
        format!("{ns}/opmesh-manager-tls").as_str()
    );
    let webhook = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .context("no webhook configuration")?;
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["service"]["namespace"],
        ns.as_str()
    );
    for o in &objects {
        if let Some(subjects) = o["subjects"].as_array() {
            for s in subjects {
                assert_eq!(s["namespace"], ns.as_str(), "{}", o["metadata"]["name"]);
            }
        }
    }
    assert!(objects.iter().any(|o| o["kind"] == "PodMonitor"));
    assert!(objects.iter().any(|o| o["kind"] == "ServiceMonitor"));
    apply(&client, &objects, "helm template (platform values)", true).await?;

    // Values the schema does not know, or outside it, are refused by name.
    for (bad, names) in [
        ("tls.mode=cert-manger", "/tls/mode"),
        ("manager.replica=3", "replica"),
        ("image.registry=Registry.Example.com/", "/image/registry"),
        ("webhook.failurePolicy=Retry", "/webhook/failurePolicy"),
    ] {
        let refused = manifests::run("helm", &["template", "deploy/helm/opmesh", "--set", bad]);
        let message = format!(
            "{:#}",
            refused.err().context(format!("{bad} was accepted"))?
        );
        assert!(message.contains(names), "{bad}: {message}");
    }
    Ok(())
}

/// Objects by `apiVersion/Kind namespace/name`, normalised for comparison:
/// Helm's bookkeeping labels dropped, and lists of named items (env,
/// containers, ports, subjects…) in name order, since merging patches
/// appends where a template writes in place.
fn by_identity(objects: &[Value]) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for o in objects {
        let mut o = o.clone();
        if let Some(labels) = o
            .get_mut("metadata")
            .and_then(|m| m.get_mut("labels"))
            .and_then(Value::as_object_mut)
        {
            for l in HELM_ONLY_LABELS {
                labels.remove(l);
            }
        }
        sort_named_lists(&mut o);
        let id = format!(
            "{}/{} {}/{}",
            o["apiVersion"].as_str().unwrap_or_default(),
            o["kind"].as_str().unwrap_or_default(),
            o["metadata"]["namespace"].as_str().unwrap_or_default(),
            o["metadata"]["name"].as_str().unwrap_or_default(),
        );
        anyhow::ensure!(out.insert(id.clone(), o).is_none(), "{id} twice");
    }
    Ok(out)
}

fn sort_named_lists(v: &mut Value) {
    match v {
        Value::Array(items) => {
            items.iter_mut().for_each(sort_named_lists);
            if items.iter().all(|i| i["name"].is_string()) {
                items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            }
        }
        Value::Object(map) => map.values_mut().for_each(sort_named_lists),
        _ => {}
    }
}

/// Where `a` (the chart's) and `b` (kustomize's) differ, as JSON pointers
/// with both values.
fn differ(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (l, r) = (x.get(k), y.get(k));
                let p = format!("{path}/{k}");
                match (l, r) {
                    (Some(l), Some(r)) => differ(&p, l, r, out),
                    _ => out.push(format!("  {p}: chart {l:?}, kustomize {r:?}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                differ(&format!("{path}/{i}"), l, r, out);
            }
        }
        // 1.0 and 1 are one number (the generated CRD writes floats, which
        // kustomize prints as integers).
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a != b => out.push(format!("  {path}: chart {a}, kustomize {b}")),
        _ => {}
    }
}
