//! A TCP proxy on loopback whose connections a test can cut, to break the
//! stream between a runtime and the manager without killing either.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, watch},
};

/// Forwards `127.0.0.1:<port>` to a target that can be changed.
pub struct Proxy {
    port: u16,
    cut: watch::Sender<u64>,
    target: Arc<Mutex<SocketAddr>>,
    _task: tokio::task::JoinHandle<()>,
}

// === impl Proxy ===

impl Proxy {
    /// Starts forwarding a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, cuts) = watch::channel(0u64);
        let target = Arc::new(Mutex::new(target));
        let to = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (to, mut cuts) = (*to.lock().await, cuts.clone());
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            cut,
            target,
            _task: task,
        })
    }

    /// The `http://` address clients dial.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection; new ones are accepted as before.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Sends new connections to `target`.
    pub async fn retarget(&self, target: SocketAddr) {
        *self.target.lock().await = target;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self._task.abort();
    }
}
