//! Test PKI: a CA, the apiserver's serving certificate, an admin client
//! certificate and the service-account signing key, all made with rcgen.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Paths and PEM data of everything the control plane needs.
pub struct Pki {
    /// The CA certificate (PEM) that signed the serving and client certificates.
    pub ca_pem: String,
    /// Path of the CA certificate file.
    pub ca_file: PathBuf,
    /// Path of the apiserver's serving certificate.
    pub serving_cert_file: PathBuf,
    /// Path of the apiserver's serving key.
    pub serving_key_file: PathBuf,
    /// The admin client certificate (PEM), in group `system:masters`.
    pub admin_cert_pem: String,
    /// The admin client key (PEM).
    pub admin_key_pem: String,
    /// Path of the private key that signs ServiceAccount tokens.
    pub service_account_key_file: PathBuf,
    /// Path of the public key that verifies ServiceAccount tokens.
    pub service_account_pub_file: PathBuf,
}

// === impl Pki ===

impl Pki {
    /// Generates a fresh PKI and writes the files the apiserver reads into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "opmesh-test-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        // The serving certificate names every way a local client reaches the
        // apiserver, plus the in-cluster names that token audiences use.
        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "opmesh-test-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa_key = KeyPair::generate()?;

        let write = |name: &str, data: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(Self {
            ca_file: write("ca.crt", &ca_pem)?,
            serving_cert_file: write("apiserver.crt", &serving_cert.pem())?,
            serving_key_file: write("apiserver.key", &serving_key.serialize_pem())?,
            service_account_key_file: write("service-account.key", &sa_key.serialize_pem())?,
            service_account_pub_file: write("service-account.pub", &sa_key.public_key_pem())?,
            ca_pem,
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        })
    }
}
