//! TLS on the session port.
//!
//! The serving certificate and key are PEM files: a mounted
//! `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`), as cert-manager
//! writes it, or any other source. They are re-read every few seconds and
//! a changed pair is served to new connections from then on, so a rotation
//! needs no restart; open sessions keep the connection they have. A pair
//! that does not load (half-written, key and certificate that do not
//! match) is reported and the last good one stays in force.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};

mod managed;

pub(crate) use managed::Managed;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

/// How often the files are checked for a new pair.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handshaken but not yet taken by the server.
const ACCEPTED: usize = 64;

/// The serving certificate in force, reloaded from its files (or, when the
/// manager makes its own, from its Secret: see `managed`).
#[derive(Debug)]
pub(crate) struct Certificate {
    /// The files, when it comes from files.
    files: Option<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
    /// The pair last loaded, to notice a change.
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
    current: ArcSwap<CertifiedKey>,
}

// === impl Certificate ===

impl Certificate {
    /// Loads the pair from `cert_file` and `key_file`; fails with what to
    /// fix if they do not load.
    pub(crate) fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<Self>> {
        let (cert, key) = read_pair(cert_file, key_file)?;
        let mut loaded = Self::from_pem(&cert, &key)
            .with_context(|| format!("--tls-cert-file {}", cert_file.display()))?;
        loaded.files = Some((cert_file.to_path_buf(), key_file.to_path_buf()));
        Ok(Arc::new(loaded))
    }

    /// The pair `cert` and `key` (PEM), with no files behind it.
    pub(crate) fn from_pem(cert: &[u8], key: &[u8]) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = certified(&provider, cert, key)?;
        Ok(Self {
            files: None,
            provider,
            loaded: std::sync::Mutex::new((cert.to_vec(), key.to_vec())),
            current: ArcSwap::from_pointee(certified),
        })
    }

    /// Serves `cert` and `key` (PEM) to new connections from now on, if
    /// they differ from the pair in force and load; returns true if so.
    pub(crate) fn install(&self, cert: &[u8], key: &[u8]) -> anyhow::Result<bool> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == cert && loaded.1 == key {
            return Ok(false);
        }
        let certified = certified(&self.provider, cert, key)?;
        self.current.store(Arc::new(certified));
        *loaded = (cert.to_vec(), key.to_vec());
        Ok(true)
    }

    /// Re-reads the files, if any; returns true when a new pair is now in
    /// force.
    pub(crate) fn reload(&self) -> anyhow::Result<bool> {
        let Some((cert_file, key_file)) = &self.files else {
            return Ok(false);
        };
        let (cert, key) = read_pair(cert_file, key_file)?;
        self.install(&cert, &key)
    }

    /// Checks the files every few seconds for as long as it runs.
    pub(crate) async fn watch(self: Arc<Self>) {
        let Some((cert_file, _)) = self.files.clone() else {
            return;
        };
        let mut failing = false;
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            match self.reload() {
                Ok(true) => {
                    failing = false;
                    tracing::info!(cert = %cert_file.display(), "serving a new TLS certificate to new connections");
                }
                Ok(false) => failing = false,
                // Once per failure, not every few seconds.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(cert = %cert_file.display(), error = %format!("{e:#}"), "cannot load the new TLS certificate; still serving the previous one");
                }
                Err(_) => {}
            }
        }
    }

    /// A TLS acceptor that serves whichever pair is in force, offering
    /// HTTP/2 only (gRPC).
    pub(crate) fn acceptor(self: &Arc<Self>) -> anyhow::Result<TlsAcceptor> {
        self.acceptor_for(&[b"h2"])
    }

    /// A TLS acceptor that serves whichever pair is in force, offering the
    /// ALPN `protocols`.
    pub(crate) fn acceptor_for(
        self: &Arc<Self>,
        protocols: &[&[u8]],
    ) -> anyhow::Result<TlsAcceptor> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    Ok((
        read("--tls-cert-file", cert_file)?,
        read("--tls-key-file", key_file)?,
    ))
}

/// The chain and key in `cert` and `key` (PEM), checked to belong together.
fn certified(provider: &CryptoProvider, cert: &[u8], key: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .context("the certificate file is not PEM certificates")?;
    anyhow::ensure!(
        !chain.is_empty(),
        "the certificate file holds no certificate"
    );
    let key =
        PrivateKeyDer::from_pem_slice(key).context("the key file holds no PEM private key")?;
    CertifiedKey::from_der(chain, key, provider)
        .context("the key does not load, or does not belong to the certificate")
}

/// TLS connections accepted on `listener`, each handshaken in a task of its
/// own so a slow client holds up no other.
pub(crate) fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            // Sessions carry small messages both ways: with Nagle's algorithm
            // on, one waits for the peer's delayed ACK (up to 40 ms). tonic
            // sets this itself only for listeners it accepts on.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its key, PEM.
    fn pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn served(cert: &Certificate) -> Vec<u8> {
        cert.current.load().cert[0].to_vec()
    }

    #[test]
    fn a_new_pair_is_served_and_a_broken_one_leaves_the_last_good_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair();
        std::fs::write(&cert_file, &c1).unwrap();
        std::fs::write(&key_file, &k1).unwrap();
        let cert = Certificate::load(&cert_file, &key_file).unwrap();
        let first = served(&cert);
        assert!(
            !cert.reload().unwrap(),
            "unchanged files are not a new pair"
        );

        // Half written: the new certificate with the old key.
        let (c2, k2) = pair();
        std::fs::write(&cert_file, &c2).unwrap();
        let err = cert.reload().unwrap_err();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");
        assert_eq!(served(&cert), first);

        std::fs::write(&key_file, &k2).unwrap();
        assert!(cert.reload().unwrap());
        assert_ne!(served(&cert), first);

        // Not PEM at all: a clear error, and the pair in force stays.
        std::fs::write(&cert_file, "garbage").unwrap();
        assert!(cert.reload().is_err());
        assert!(Certificate::load(&cert_file, &key_file).is_err());
        let missing = Certificate::load(&dir.path().join("nope"), &key_file).unwrap_err();
        assert!(
            format!("{missing:#}").contains("--tls-cert-file"),
            "{missing:#}"
        );
    }
}
