//! A TCP proxy on loopback whose connections a test can cut, to break the
//! stream between a runtime and the manager without killing either, or
//! blackhole, to partition a process from what it talks to: bytes stop
//! flowing but no connection closes, as when a network drops packets.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, watch},
};

/// Forwards `127.0.0.1:<port>` to a target that can be changed.
pub struct Proxy {
    port: u16,
    cut: watch::Sender<u64>,
    blackhole: watch::Sender<bool>,
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
        let (blackhole, holes) = watch::channel(false);
        let target = Arc::new(Mutex::new(target));
        let to = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (to, mut cuts, mut holes) = (*to.lock().await, cuts.clone(), holes.clone());
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let mut inbound = inbound;
                    if !*holes.borrow() {
                        let Ok(mut outbound) = TcpStream::connect(to).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                            _ = cuts.changed() => return,
                            _ = holes.wait_for(|h| *h) => {}
                        }
                    }
                    // Blackholed: hold the connection open and forward
                    // nothing, until it is cut.
                    let _ = cuts.changed().await;
                    drop(inbound);
                });
            }
        });
        Ok(Self {
            port,
            cut,
            blackhole,
            target,
            _task: task,
        })
    }

    /// The `http://` address clients dial.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The local port clients dial.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops (or resumes) forwarding: open connections stay open but carry
    /// nothing more, and new ones are accepted and left hanging.
    pub fn blackhole(&self, on: bool) {
        self.blackhole.send_replace(on);
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
