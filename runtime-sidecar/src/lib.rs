//! The opmesh runtime sidecar: keeps the session with the manager, a slice
//! cache and a work queue, and serves its operator on a Unix socket.
//!
//! - [`config`] — settings; their environment variables come from
//!   [`opmesh_proto::env`], shared with the SDK and the manifests.
//! - `queue` — the work queue with client-go semantics.
//! - `cache` — the slice cache of owned objects.
//! - `state` — shared state: the session's slice (owned, unsynced and held
//!   keys) and lease, with `state/inflight` for reconciles handed to the
//!   operator.
//! - `session` — the session with the manager, with reconnect and backoff.
//! - `dispatch` — hands queued keys to the operator.
//! - `server` — the `RuntimeService` for the operator.
//! - `http` — `/healthz`, `/readyz`, `/metrics`.
//! - `metrics` — controller-runtime-named metrics.
//!
//! Invariants: a key is reconciled only while it is owned, synced and the
//! lease is valid; a revoked key is answered with `Released` only after its
//! running reconcile finished; on session loss every key is dropped.

#![warn(unreachable_pub)]

mod cache;
pub mod config;
mod dispatch;
mod http;
mod metrics;
mod queue;
mod server;
mod session;
mod state;

use std::sync::Arc;

use opmesh_proto::v1::runtime_service_server::RuntimeServiceServer;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tokio_stream::wrappers::UnixListenerStream;

pub use config::Config;

/// The operator socket's file, removed when this is dropped if it is still
/// the one this process created (a newer runtime may have replaced it).
#[derive(Debug)]
pub struct SocketFile {
    path: std::path::PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the operator socket at `config.socket`, replacing a stale one.
/// The socket is readable and writable by its owner only (the operator
/// container runs as the same user) from the moment it appears: it is
/// bound under a temporary name, restricted, then renamed into place. A
/// directory it creates is private to its owner; one that others may
/// write to is reported. Keep the [`SocketFile`] for as long as the socket
/// serves: dropping it removes the file.
pub fn bind_socket(config: &Config) -> anyhow::Result<(UnixListener, SocketFile)> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    let path = &config.socket;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {} for --socket: {e}", dir.display()))?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the socket's directory is writable by every user; mount it from a volume only this pod's containers share");
    }
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--socket {} names no file", path.display()))?;
    let staging = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)
        .map_err(|e| anyhow::anyhow!("cannot listen on --socket {}: {e}", path.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
    // Replaces a stale socket in one step.
    std::fs::rename(&staging, path)
        .map_err(|e| anyhow::anyhow!("cannot replace --socket {}: {e}", path.display()))?;
    let file = SocketFile {
        path: path.clone(),
        ino: std::fs::metadata(path)?.ino(),
    };
    Ok((listener, file))
}

/// Runs the runtime until `shutdown` fires.
pub async fn run(
    config: Config,
    socket: UnixListener,
    health: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let rt = Arc::new(state::Runtime::new(config));
    let (stop_tx, stop) = watch::channel(false);
    let (server_stop_tx, mut server_stop) = watch::channel(false);
    let session = tokio::spawn(session::run(rt.clone(), stop.clone()));
    let dispatch = tokio::spawn(dispatch::run(rt.clone(), stop.clone()));
    let http = tokio::spawn(http::serve(rt.clone(), health, stop.clone()));
    // While disconnected (or draining) nothing else notices the lease
    // running out; it stops last, so no reconcile outlives the lease.
    let (watchdog_stop_tx, watchdog_stop) = watch::channel(false);
    let watchdog = {
        let (rt, mut stop) = (rt.clone(), watchdog_stop);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(25));
            loop {
                tokio::select! {
                    _ = tick.tick() => rt.expire_lease(),
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        })
    };
    tracing::info!(socket = %rt.config.socket.display(), "runtime serving the operator");
    // The operator socket stays up while draining, so running reconciles
    // can still complete.
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(server::RuntimeServer::new(
                rt.clone(),
            )))
            .serve_with_incoming_shutdown(UnixListenerStream::new(socket), async move {
                let _ = server_stop.wait_for(|s| *s).await;
            }),
    );
    shutdown.await;
    let _ = stop_tx.send(true);
    // The session drains, then says goodbye before it returns.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(40), session).await;
    rt.queue.shut_down();
    let _ = server_stop_tx.send(true);
    for task in [dispatch, http] {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    let _ = watchdog_stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), watchdog).await;
    match result {
        Ok(Ok(r)) => r.map_err(Into::into),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// A runtime's settings with its socket at `path`.
    fn with_socket(path: &std::path::Path) -> Config {
        Config::try_parse_from([
            "opmesh-runtime",
            "--mesh",
            "ops/mesh",
            "--pod-namespace",
            "ops",
            "--pod-name",
            "op-0",
            "--socket",
            path.to_str().unwrap(),
        ])
        .unwrap()
    }

    #[tokio::test]
    async fn the_socket_file_goes_with_its_runtime_but_not_a_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runtime.sock");
        let config = with_socket(&path);
        let (_l, file) = bind_socket(&config).unwrap();
        drop(file);
        assert!(!path.exists(), "the socket file was left behind");

        // An older runtime exiting after a newer one took the path over
        // leaves the newer one's socket alone.
        let (_old_l, old) = bind_socket(&config).unwrap();
        let (_new_l, new) = bind_socket(&config).unwrap();
        drop(old);
        assert!(
            path.exists(),
            "the older runtime removed the newer one's socket"
        );
        drop(new);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn only_the_owner_may_use_the_socket_or_its_new_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/runtime.sock");
        let config = with_socket(&path);
        let (_l, _file) = bind_socket(&config).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // Nothing is left under the temporary name.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["runtime.sock"]);
    }
}
