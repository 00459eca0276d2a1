//! The install manifests as a user renders and applies them: the Helm chart
//! through `helm`, the kustomize overlays through `kubectl kustomize` (both
//! built by `tests/tools/go-tool.sh`), applied server-side with strict field
//! validation.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, ensure};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{Scope, pinned_kind},
};
use serde::Deserialize as _;
use serde_json::Value;

use crate::control_plane::repo_root;

/// Builds (once, then cached) or locates a tool `tests/tools/go-tool.sh`
/// knows (`helm`, `kubectl`, `crane`, `cert-manager-crds`, …) and returns
/// its path.
pub fn go_tool(name: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(repo_root().join("tests/tools/go-tool.sh"))
        .arg(name)
        .output()
        .context("running tests/tools/go-tool.sh")?;
    ensure!(
        out.status.success(),
        "tests/tools/go-tool.sh {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let path = stdout
        .lines()
        .last()
        .context("go-tool.sh printed nothing")?;
    Ok(PathBuf::from(path))
}

/// Runs `tool args…` and returns its standard output, or fails with its
/// standard error.
pub fn run(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(go_tool(tool)?)
        .args(args)
        .current_dir(repo_root())
        .output()?;
    ensure!(
        out.status.success(),
        "{tool} {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template` of the chart in `deploy/helm/opmesh`, CRDs included, as
/// release `opmesh` in `namespace`, with `--set` values.
pub fn helm_template(namespace: &str, set: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut args = vec![
        "template",
        "opmesh",
        "deploy/helm/opmesh",
        "--include-crds",
        "--namespace",
        namespace,
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    documents(&run("helm", &args)?)
}

/// `kubectl kustomize` of a directory under `deploy/kustomize`.
pub fn kustomize(dir: &str) -> anyhow::Result<Vec<Value>> {
    let path = format!("deploy/kustomize/{dir}");
    documents(&run("kubectl", &["kustomize", &path])?)
}

/// The objects of a multi-document YAML stream; empty documents skipped.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = serde_json::to_value(serde_norway::Value::deserialize(doc)?)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Server-side applies each object in order with strict field validation
/// (only a dry run if `dry_run`), and returns them as the apiserver
/// answered. `source` names them in errors.
pub async fn apply(
    client: &Client,
    objects: &[Value],
    source: &str,
    dry_run: bool,
) -> anyhow::Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    for value in objects {
        let obj: DynamicObject = serde_json::from_value(value.clone())?;
        let types = obj
            .types
            .clone()
            .with_context(|| format!("{source}: a document without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (ar, caps) = pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("{source}: the apiserver does not serve {gvk:?}"))?;
        let api: Api<DynamicObject> = match (caps.scope, obj.namespace()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &ar),
            (Scope::Namespaced, None) => anyhow::bail!(
                "{source}: {} {} has no namespace",
                types.kind,
                obj.name_any()
            ),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
        };
        let mut pp = PatchParams::apply("opmesh-install-test")
            .force()
            .validation_strict();
        if dry_run {
            pp = pp.dry_run();
        }
        let out = api
            .patch(&obj.name_any(), &pp, &Patch::Apply(&obj))
            .await
            .with_context(|| format!("{source}: applying {} {}", types.kind, obj.name_any()))?;
        applied.push(DynamicObject {
            types: Some(types),
            ..out
        });
    }
    Ok(applied)
}
