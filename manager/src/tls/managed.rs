//! A certificate the manager makes and renews itself, for clusters without
//! cert-manager (`--tls-secret NAMESPACE/NAME`).
//!
//! The Secret (type `kubernetes.io/tls`) holds a private CA (`ca.crt`,
//! `ca.key`, valid ten years) and a serving certificate it signed for
//! `--tls-dns-names` (`tls.crt`, `tls.key`), which is renewed once two
//! thirds of its validity have passed. Every manager replica reads the
//! Secret and serves what it holds; whichever first finds a renewal due
//! writes it (a conflicting write loses and reads the winner's). The CA
//! bundle is published as ConfigMap `opmesh-ca` (`ca.crt`) in each mesh's
//! namespace and the namespaces its `spec.runtimeNamespaces` lists, where
//! injected runtimes read it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::Certificate;
use crate::{inject::CA_CONFIGMAP, snapshot::Published};

/// How long the CA lasts.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// When the serving certificate stops being valid, in seconds since the
/// epoch, recorded next to it.
const NOT_AFTER: &str = "opmesh.io/not-after";

/// The manager's own certificate, kept in a Secret.
#[derive(Clone)]
pub(crate) struct Managed {
    secrets: Api<Secret>,
    client: Client,
    secret: String,
    name: String,
    dns_names: Vec<String>,
    validity: Duration,
    /// The MutatingWebhookConfiguration whose `caBundle`s to keep current.
    webhook: Option<String>,
}

/// A serving pair and the CA bundle, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Issued {
    /// `tls.crt`.
    pub(crate) cert: Vec<u8>,
    /// `tls.key`.
    pub(crate) key: Vec<u8>,
    /// `ca.crt`.
    pub(crate) ca: Vec<u8>,
}

// === impl Managed ===

impl Managed {
    /// The certificate in Secret `namespace/name`, for `dns_names` (DNS
    /// names or IP addresses), each serving certificate valid `validity`.
    pub(crate) fn new(
        client: Client,
        namespace: &str,
        name: &str,
        dns_names: Vec<String>,
        validity: Duration,
    ) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            client,
            secret: format!("{namespace}/{name}"),
            name: name.to_string(),
            dns_names,
            validity,
            webhook: None,
        }
    }

    /// Also keeps the `caBundle` of every webhook in MutatingWebhook-
    /// Configuration `name` current with the CA.
    pub(crate) fn with_webhook(mut self, name: Option<String>) -> Self {
        self.webhook = name;
        self
    }

    /// What the Secret holds, after making or renewing what is missing or
    /// due.
    pub(crate) async fn ensure(&self) -> anyhow::Result<Issued> {
        let grant = || {
            format!(
                "the manager needs get, create and update on Secret {} (the chart with tls.mode=self-managed, or deploy/kustomize/overlays/self-managed/tls.yaml)",
                self.secret
            )
        };
        let existing = self.secrets.get_opt(&self.name).await.with_context(grant)?;
        let data = existing
            .as_ref()
            .and_then(|s| s.data.clone())
            .unwrap_or_default();
        let field = |k: &str| data.get(k).map(|b| b.0.clone()).filter(|b| !b.is_empty());
        let not_after = existing.as_ref().and_then(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get(NOT_AFTER)?
                .parse::<u64>()
                .ok()
        });
        let now = unix_now();
        let renew_after = not_after.map(|t| t.saturating_sub(self.validity.as_secs() / 3));
        let (ca, ca_key, cert, key) = (
            field("ca.crt"),
            field("ca.key"),
            field("tls.crt"),
            field("tls.key"),
        );
        if let (Some(ca), Some(_), Some(cert), Some(key), Some(t)) =
            (&ca, &ca_key, &cert, &key, renew_after)
            && now < t
        {
            return Ok(Issued {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            });
        }
        // Make what is missing: the CA only if there is none.
        let (ca_pem, ca_key) = match (ca, ca_key) {
            (Some(ca), Some(k)) => (ca, KeyPair::from_pem(&String::from_utf8_lossy(&k))?),
            _ => {
                let k = KeyPair::generate()?;
                let mut params = ca_params();
                params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
                params.not_after = time::OffsetDateTime::now_utc()
                    + time::Duration::seconds(CA_VALIDITY.as_secs() as i64);
                (params.self_signed(&k)?.pem().into_bytes(), k)
            }
        };
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params(), ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(self.dns_names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "opmesh-manager");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let start = time::OffsetDateTime::now_utc();
        params.not_before = start - time::Duration::minutes(5);
        params.not_after = start + time::Duration::seconds(self.validity.as_secs() as i64);
        let issued = Issued {
            cert: params.signed_by(&key, &issuer)?.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
            ca: ca_pem,
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: existing
                    .as_ref()
                    .and_then(|s| s.metadata.resource_version.clone()),
                annotations: Some(BTreeMap::from([(
                    NOT_AFTER.to_string(),
                    (now + self.validity.as_secs()).to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(issued.cert.clone())),
                ("tls.key".to_string(), ByteString(issued.key.clone())),
                ("ca.crt".to_string(), ByteString(issued.ca.clone())),
                ("ca.key".to_string(), ByteString(ca_key_pem.into_bytes())),
            ])),
            ..Default::default()
        };
        let pp = PostParams::default();
        let written = match &existing {
            None => self.secrets.create(&pp, &secret).await,
            Some(_) => self.secrets.replace(&self.name, &pp, &secret).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %self.secret, valid_for = ?self.validity, "made a new serving certificate");
                Ok(issued)
            }
            // Another replica wrote first: use what it wrote.
            Err(kube::Error::Api(e)) if e.code == 409 => Box::pin(self.ensure()).await,
            Err(e) => Err(e).with_context(grant),
        }
    }

    /// Keeps `certificate` current with the Secret and the CA bundle
    /// published, for as long as it runs.
    pub(crate) async fn run(self, certificate: Arc<Certificate>, published: Arc<Published>) {
        let mut published_to: HashMap<String, Vec<u8>> = HashMap::new();
        let mut failing = false;
        loop {
            match self.ensure().await {
                Ok(issued) => {
                    failing = false;
                    match certificate.install(&issued.cert, &issued.key) {
                        Ok(true) => {
                            tracing::info!(secret = %self.secret, "serving a new TLS certificate to new connections")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "the managed certificate does not load; still serving the previous one")
                        }
                    }
                    self.publish(&issued.ca, &published, &mut published_to)
                        .await;
                    if let Err(e) = self.webhook_trusts(&issued.ca).await {
                        tracing::warn!(error = %format!("{e:#}"), "cannot keep the webhook's caBundle current");
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %format!("{e:#}"), "cannot keep the managed TLS certificate; still serving the previous one");
                }
                Err(_) => {}
            }
            tokio::time::sleep(super::RELOAD_EVERY).await;
        }
    }

    /// Sets `ca` as the `caBundle` of each webhook of the configured
    /// MutatingWebhookConfiguration that has another.
    async fn webhook_trusts(&self, ca: &[u8]) -> anyhow::Result<()> {
        use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
        let Some(name) = &self.webhook else {
            return Ok(());
        };
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let Some(config) = api.get_opt(name).await? else {
            return Ok(());
        };
        let stale: Vec<serde_json::Value> = config
            .webhooks
            .unwrap_or_default()
            .iter()
            .filter(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca))
            .map(|w| {
                serde_json::json!({
                    "name": w.name,
                    "clientConfig": {"caBundle": ByteString(ca.to_vec())},
                })
            })
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({ "webhooks": stale })),
        )
        .await
        .with_context(|| {
            format!("the manager needs get and patch on mutatingwebhookconfigurations {name}")
        })?;
        tracing::info!(webhook = %name, "set the webhook's caBundle to the manager's CA");
        Ok(())
    }

    /// Writes ConfigMap `opmesh-ca` with `ca` into every namespace whose
    /// runtimes dial this manager, where it is not there yet.
    async fn publish(&self, ca: &[u8], published: &Published, done: &mut HashMap<String, Vec<u8>>) {
        let snapshot = published.load();
        let namespaces: std::collections::BTreeSet<String> = snapshot
            .meshes
            .iter()
            .flat_map(|(id, m)| {
                std::iter::once(id.namespace.clone()).chain(m.runtime_namespaces.clone())
            })
            .collect();
        for ns in namespaces {
            if done.get(&ns).is_some_and(|c| c == ca) {
                continue;
            }
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CA_CONFIGMAP.into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "ca.crt".to_string(),
                    String::from_utf8_lossy(ca).into_owned(),
                )])),
                ..Default::default()
            };
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
            match api
                .patch(
                    CA_CONFIGMAP,
                    &PatchParams::apply("opmesh-manager").force(),
                    &Patch::Apply(&cm),
                )
                .await
            {
                Ok(_) => {
                    done.insert(ns, ca.to_vec());
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "cannot publish the CA bundle (ConfigMap opmesh-ca); the manager needs create and patch on it")
                }
            }
        }
    }
}

/// The CA's parameters; the same each time, so its key signs as the CA its
/// certificate names.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "opmesh-ca");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
