//! TLS on the session port: a runtime trusts only the CAs in its bundle and
//! refuses plaintext, and the manager's certificate rotates under open
//! sessions without losing a key or an update.

use std::time::Duration;

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_proto::env;
use opmesh_tests::{
    control_plane::Process,
    eventually,
    mesh::{create_generator, generator_resource},
    tls::{MeshTls, TLS_CERT_FILE, TLS_KEY_FILE},
    world::{TIMEOUT, World},
};
use serde_json::json;

/// How many times the manager logged that `pod` joined.
fn joins(w: &World, pod: &str) -> usize {
    let suffix = format!("/{pod} ");
    w.manager
        .process()
        .log_tail(5000)
        .lines()
        .filter(|l| l.contains("runtime joined") && l.contains(&suffix))
        .count()
}

#[tokio::test]
async fn a_runtime_trusts_only_its_bundle_and_never_plaintext() -> anyhow::Result<()> {
    let mut w = World::new("tls-trust").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;

    // A bundle with another CA: the manager's certificate is outside it.
    let other = MeshTls::generate(&w.dir.path().join("other-ca"), "someone-elses-ca")?;
    let ca = other.ca_file.display().to_string();
    w.replica_with_env("stranger", "v1", &[(env::CA_FILE, &ca)])
        .await?;
    let r = &w.replicas[0];
    eventually(
        "the runtime to refuse the manager's certificate",
        TIMEOUT,
        || async {
            r.check_running()?;
            let log = r.sidecar.log_tail(200);
            Ok(log
                .lines()
                .any(|l| l.contains("cannot open session") && l.contains("UnknownIssuer"))
                .then_some(()))
        },
    )
    .await?;
    assert!(!r.ready(), "a runtime that distrusts its manager is ready");
    assert_eq!(joins(&w, "stranger"), 0, "the session opened anyway");

    // A plaintext address, without the development flag: the runtime
    // does not start, and says what to do.
    let plain = w.manager.addr().replace("https://", "http://");
    let mesh = format!("{}/mesh", w.ns);
    let vars: Vec<(String, String)> = [
        (env::MANAGER_ADDR, plain.as_str()),
        (env::MESH, mesh.as_str()),
        (env::POD_NAMESPACE, w.ns.as_str()),
        (env::POD_NAME, "plain"),
        (env::HEALTH_ADDR, "127.0.0.1:0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sidecar = Process::spawn_with_env(
        "plain-sidecar",
        &w.bins.runtime,
        &[],
        &vars,
        w.dir.path(),
        None,
    )?;
    let code = sidecar.wait_exit(TIMEOUT).await;
    assert!(matches!(code, Some(Some(c)) if c != 0), "exit: {code:?}");
    eventually("the runtime to say why it stopped", TIMEOUT, || async {
        let log = sidecar.log_tail(500);
        anyhow::ensure!(
            log.contains("refusing the plaintext manager address")
                && log.contains(env::INSECURE_PLAINTEXT),
            "the log does not say why"
        );
        Ok(Some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn rotating_the_certificate_under_open_sessions_loses_no_key_and_no_update()
-> anyhow::Result<()> {
    // The manager's own certificate files (CA A), and the next CA (B). The
    // runtimes trust both, as during a CA rotation.
    let tls_dir = tempfile::Builder::new().prefix("opmesh-tls-").tempdir()?;
    let current = MeshTls::generate(&tls_dir.path().join("a"), "ca-a")?;
    let next = MeshTls::generate(&tls_dir.path().join("b"), "ca-b")?;
    let bundle = tls_dir.path().join("bundle.crt");
    std::fs::write(&bundle, format!("{}{}", current.ca_pem, next.ca_pem))?;
    let bundle = bundle.display().to_string();
    let (cert, key) = (
        current.cert_file.display().to_string(),
        current.key_file.display().to_string(),
    );
    let mut w = World::with_manager_env(
        "tls-rotate",
        &[(TLS_CERT_FILE, &cert), (TLS_KEY_FILE, &key)],
    )
    .await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    for pod in ["v1-0", "v1-1"] {
        w.replica_with_env(pod, "v1", &[(env::CA_FILE, &bundle)])
            .await?;
    }
    w.all_ready().await?;
    let ns = w.object_namespace("tls-rotate-data", &[]).await?;
    const N: usize = 12;
    w.apps(&ns, N).await?;
    let joined = (joins(&w, "v1-0"), joins(&w, "v1-1"));

    // Objects keep changing while the certificate rotates.
    let api: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            for n in 1u64.. {
                let patch =
                    json!({"spec": {"data": {"n": n.to_string()}, "reconcileMs": (n * 37) % 200}});
                let name = format!("app-{}", n as usize % N);
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    // Rotate: a certificate of CA B replaces the files, key first, as a
    // Secret update lands (the manager may read a torn pair in between,
    // and keeps the old one until the pair loads).
    let rotated = next.issue()?;
    std::fs::write(&current.key_file, &rotated.key_pem)?;
    std::fs::write(&current.cert_file, &rotated.cert_pem)?;
    eventually(
        "the manager to serve the new certificate",
        TIMEOUT,
        || async {
            w.manager.process().check_running()?;
            Ok(w.manager
                .process()
                .log_tail(5000)
                .contains("serving a new TLS certificate")
                .then_some(()))
        },
    )
    .await?;
    // A runtime that trusts only CA B joins: new connections get the new
    // certificate.
    let only_b = next.ca_file.display().to_string();
    w.replica_with_env("v1-2", "v1", &[(env::CA_FILE, &only_b)])
        .await?;
    w.all_ready().await?;
    writer.abort();
    let _ = writer.await;

    // The sessions open before the rotation never broke.
    assert_eq!(
        (joins(&w, "v1-0"), joins(&w, "v1-1")),
        joined,
        "a session opened before the rotation was re-established"
    );

    // Every object's last change is reconciled (no update lost), by one
    // owner at a time.
    let (finals, _) = w.settle_and_check(&ns).await?;
    assert_eq!(finals.len(), N);
    Ok(())
}

#[tokio::test]
async fn a_manager_makes_and_renews_its_own_certificate() -> anyhow::Result<()> {
    let cp = opmesh_tests::ControlPlane::shared().await?;
    let client = cp.client().await?;
    let secret_ns = opmesh_tests::cluster::create_namespace(&client, "tls-own", &[]).await?;
    let secret = format!("{secret_ns}/opmesh-manager-tls");
    // A webhook configuration whose caBundle the manager is to keep: it
    // selects no pod.
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let webhook_name = format!("opmesh-{secret_ns}");
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    webhooks
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": webhook_name},
                "webhooks": [{
                    "name": "inject.opmesh.io",
                    "clientConfig": {"url": "https://127.0.0.1:9/mutate-pods"},
                    "objectSelector": {"matchExpressions": [{"key": "opmesh.io/nothing", "operator": "Exists"}]},
                    "failurePolicy": "Ignore",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                }],
            }))?,
        )
        .await?;
    // No certificate files: the manager makes its own, valid 30 s, so it
    // renews it after 20 s.
    let mut w = World::with_manager_env(
        "tls-own",
        &[
            (TLS_CERT_FILE, ""),
            (TLS_KEY_FILE, ""),
            ("OPMESH_TLS_SECRET", &secret),
            ("OPMESH_TLS_DNS_NAMES", "127.0.0.1,localhost"),
            ("OPMESH_TLS_CERT_VALIDITY_SECONDS", "30"),
            ("OPMESH_WEBHOOK_CONFIGURATION", &webhook_name),
        ],
    )
    .await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;

    // Runtimes trust the CA it publishes in the mesh's namespace.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(w.client.clone(), &w.ns);
    let ca = eventually("the CA bundle to be published", TIMEOUT, || async {
        Ok(cms
            .get_opt("opmesh-ca")
            .await?
            .and_then(|c| c.data?.get("ca.crt").cloned()))
    })
    .await?;
    // The webhook trusts the same CA.
    eventually("the webhook's caBundle to be the CA", TIMEOUT, || async {
        let config = webhooks.get(&webhook_name).await?;
        let bundle = config
            .webhooks
            .unwrap_or_default()
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone());
        Ok((bundle.map(|b| b.0) == Some(ca.clone().into_bytes())).then_some(()))
    })
    .await?;
    let ca_file = w.dir.path().join("published-ca.crt");
    std::fs::write(&ca_file, &ca)?;
    let ca_file = ca_file.display().to_string();
    w.replica_with_env("v1-0", "v1", &[(env::CA_FILE, &ca_file)])
        .await?;
    w.all_ready().await?;
    let ns = w.object_namespace("tls-own-data", &[]).await?;
    create_generator(&w.client, &ns, "app", json!({"data": {"n": "0"}})).await?;
    w.wait_handled(std::slice::from_ref(&ns), 1).await?;

    // The serving certificate is renewed in its Secret and served.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(w.client.clone(), &secret_ns);
    let cert = |s: k8s_openapi::api::core::v1::Secret| {
        s.data
            .and_then(|d| d.get("tls.crt").cloned())
            .map(|b| b.0)
            .unwrap_or_default()
    };
    let first = cert(secrets.get("opmesh-manager-tls").await?);
    let joined = joins(&w, "v1-0");
    eventually(
        "the certificate to be renewed and served",
        TIMEOUT,
        || async {
            w.manager.process().check_running()?;
            let now = cert(secrets.get("opmesh-manager-tls").await?);
            let served = w
                .manager
                .process()
                .log_tail(5000)
                .contains("serving a new TLS certificate");
            Ok((now != first && served).then_some(()))
        },
    )
    .await?;
    // The open session went on; a new runtime with the same bundle joins
    // on the new certificate; the mesh keeps reconciling.
    assert_eq!(
        joins(&w, "v1-0"),
        joined,
        "the session broke at the renewal"
    );
    w.replica_with_env("v1-1", "v1", &[(env::CA_FILE, &ca_file)])
        .await?;
    w.all_ready().await?;
    w.change_and_wait(&ns, "app").await?;
    webhooks.delete(&webhook_name, &Default::default()).await?;
    Ok(())
}
