//! TLS for the session port: a CA and serving certificates for the manager
//! on loopback, made with rcgen, as cert-manager would write them
//! (`ca.crt`, `tls.crt`, `tls.key`).
//!
//! Every process the harness starts gets the shared material through the
//! environment ([`MeshTls::env`]): managers serve with it, runtimes trust
//! its CA. A test that rotates or mistrusts certificates makes its own.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::Context as _;
use opmesh_proto::env;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The manager's TLS environment variables (see `opmesh-manager run --help`).
pub const TLS_CERT_FILE: &str = "OPMESH_TLS_CERT_FILE";
/// See [`TLS_CERT_FILE`].
pub const TLS_KEY_FILE: &str = "OPMESH_TLS_KEY_FILE";

static SHARED: OnceLock<MeshTls> = OnceLock::new();

/// A CA and one serving certificate it signed, in files.
pub struct MeshTls {
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// `ca.crt`.
    pub ca_file: PathBuf,
    /// `tls.crt`: the serving certificate.
    pub cert_file: PathBuf,
    /// `tls.key`: its key.
    pub key_file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// A serving certificate and its key, PEM.
pub struct Serving {
    /// The certificate.
    pub cert_pem: String,
    /// The key.
    pub key_pem: String,
}

// === impl MeshTls ===

impl MeshTls {
    /// The material every harness process uses, made once per test binary
    /// under `dir` (the control plane's directory).
    pub fn shared(dir: &Path) -> &'static MeshTls {
        SHARED.get_or_init(|| {
            Self::generate(&dir.join("mesh-tls"), "opmesh-test-mesh-ca")
                .expect("generating the mesh's test TLS material")
        })
    }

    /// A new CA named `name`, and a serving certificate for `127.0.0.1` and
    /// `localhost`, written into `dir`.
    pub fn generate(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(params, ca_key);
        let serving = issue(&issuer)?;
        let write = |file: &str, data: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(file);
            std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(Self {
            ca_file: write("ca.crt", &ca_pem)?,
            cert_file: write("tls.crt", &serving.cert_pem)?,
            key_file: write("tls.key", &serving.key_pem)?,
            ca_pem,
            issuer,
        })
    }

    /// A new serving certificate from this CA.
    pub fn issue(&self) -> anyhow::Result<Serving> {
        issue(&self.issuer)
    }

    /// The environment that makes a manager serve this certificate and a
    /// runtime trust this CA.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = |p: &Path| p.display().to_string();
        vec![
            (TLS_CERT_FILE.into(), path(&self.cert_file)),
            (TLS_KEY_FILE.into(), path(&self.key_file)),
            (env::CA_FILE.into(), path(&self.ca_file)),
        ]
    }
}

fn issue(issuer: &Issuer<'_, KeyPair>) -> anyhow::Result<Serving> {
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "opmesh-manager");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(Serving {
        cert_pem: params.signed_by(&key, issuer)?.pem(),
        key_pem: key.serialize_pem(),
    })
}
