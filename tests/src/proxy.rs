//! A TCP proxy on loopback whose connections a test can break in the ways
//! networks do:
//!
//! - cut: every open connection closes;
//! - blackhole: bytes stop flowing but no connection closes, as when a
//!   network drops packets;
//! - delay: bytes from the client reach the target only after a delay; a
//!   client that gives up first (closes) takes its undelivered bytes with
//!   it, and the target's side is reset, as when a stalled connection is
//!   torn down;
//! - hold replies: the target's bytes are not passed on, as if the client
//!   stopped reading (TCP backpressure), while the client's still flow.
//!
//! It also counts the bytes the target sent its clients, so a benchmark can
//! measure what an apiserver sends the processes behind it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Mutex, mpsc, watch},
    time::Instant,
};

/// Forwards `127.0.0.1:<port>` to a target that can be changed.
pub struct Proxy {
    port: u16,
    modes: Modes,
    target: Arc<Mutex<SocketAddr>>,
    _task: tokio::task::JoinHandle<()>,
}

/// What the test has asked of the proxy; every connection watches these.
#[derive(Clone)]
struct Modes {
    cut: watch::Sender<u64>,
    blackhole: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    hold_replies: watch::Sender<bool>,
    /// Delayed chunks neither delivered nor discarded yet.
    in_flight: Arc<AtomicUsize>,
    /// Bytes passed from the target to clients, over every connection.
    to_clients: Arc<AtomicU64>,
}

/// A delayed chunk of the client's bytes; it counts as in flight until it
/// is delivered or discarded.
struct Chunk {
    at: Instant,
    bytes: Vec<u8>,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// === impl Proxy ===

impl Proxy {
    /// Starts forwarding a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let modes = Modes {
            cut: watch::channel(0u64).0,
            blackhole: watch::channel(false).0,
            delay: watch::channel(Duration::ZERO).0,
            hold_replies: watch::channel(false).0,
            in_flight: Arc::default(),
            to_clients: Arc::default(),
        };
        let target = Arc::new(Mutex::new(target));
        let (to, m) = (target.clone(), modes.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let to = *to.lock().await;
                tokio::spawn(forward(inbound, to, m.clone()));
            }
        });
        Ok(Self {
            port,
            modes,
            target,
            _task: task,
        })
    }

    /// Starts a proxy to the control plane's apiserver and writes a
    /// kubeconfig at `path` that reaches the apiserver through it, for a
    /// process the test wants to partition or slow down.
    pub async fn to_apiserver(
        cp: &crate::ControlPlane,
        path: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let server = cp.server();
        let addr: SocketAddr = server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .parse()?;
        let proxy = Self::start(addr).await?;
        std::fs::write(
            path,
            std::fs::read_to_string(cp.kubeconfig())?
                .replace(server, &format!("https://127.0.0.1:{}", proxy.port)),
        )?;
        Ok(proxy)
    }

    /// The `https://` address runtimes dial in front of a manager; TLS
    /// passes through, and the manager's certificate names 127.0.0.1.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The local port clients dial.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops (or resumes) forwarding: open connections stay open but carry
    /// nothing more, and new ones are accepted and left hanging.
    pub fn blackhole(&self, on: bool) {
        self.modes.blackhole.send_replace(on);
    }

    /// Drops every open connection; new ones are accepted as before.
    pub fn cut(&self) {
        self.modes.cut.send_modify(|n| *n += 1);
    }

    /// Delays the client's bytes by `delay` (zero: no delay) from now on.
    pub fn delay(&self, delay: Duration) {
        self.modes.delay.send_replace(delay);
    }

    /// How many chunks of delayed bytes are still held: neither delivered
    /// nor discarded with their connection.
    pub fn in_flight(&self) -> usize {
        self.modes.in_flight.load(Ordering::SeqCst)
    }

    /// Stops (or resumes) passing the target's bytes to clients, as if they
    /// had stopped reading.
    pub fn hold_replies(&self, on: bool) {
        self.modes.hold_replies.send_replace(on);
    }

    /// Bytes the target has sent to clients through this proxy so far (TLS
    /// records included: what crosses the wire).
    pub fn bytes_to_clients(&self) -> u64 {
        self.modes.to_clients.load(Ordering::Relaxed)
    }

    /// Sends new connections to `target`.
    pub async fn retarget(&self, target: SocketAddr) {
        *self.target.lock().await = target;
    }
}

/// Carries one connection until it closes, is cut or is blackholed.
async fn forward(inbound: TcpStream, to: SocketAddr, m: Modes) {
    let mut cuts = m.cut.subscribe();
    let mut holes = m.blackhole.subscribe();
    if !*holes.borrow() {
        let Ok(outbound) = TcpStream::connect(to).await else {
            return;
        };
        // Closing with undelivered bytes resets the target's side, so a
        // request cut short is never half applied.
        #[allow(deprecated)]
        let _ = outbound.set_linger(Some(Duration::ZERO));
        let (mut client_rx, mut client_tx) = inbound.into_split();
        let (mut target_rx, mut target_tx) = outbound.into_split();
        let (delayed, mut due) = mpsc::unbounded_channel::<Chunk>();
        let delay = m.delay.subscribe();
        let up = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        m.in_flight.fetch_add(1, Ordering::SeqCst);
                        let chunk = Chunk {
                            at: Instant::now() + *delay.borrow(),
                            bytes: buf[..n].to_vec(),
                            in_flight: m.in_flight.clone(),
                        };
                        if delayed.send(chunk).is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let deliver = async {
            while let Some(chunk) = due.recv().await {
                tokio::time::sleep_until(chunk.at).await;
                if target_tx.write_all(&chunk.bytes).await.is_err() {
                    return;
                }
            }
        };
        let mut held = m.hold_replies.subscribe();
        let down = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                if held.wait_for(|h| !*h).await.is_err() {
                    return;
                }
                match target_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if held.wait_for(|h| !*h).await.is_err()
                            || client_tx.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                        m.to_clients.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        };
        tokio::select! {
            // Either side closed: undelivered bytes go with the connection.
            _ = up => return,
            _ = deliver => return,
            _ = down => return,
            _ = cuts.changed() => return,
            _ = holes.wait_for(|h| *h) => {}
        }
        // Blackholed: hold the client's side open and forward nothing,
        // until it is cut.
        drop((target_rx, target_tx));
        let _ = cuts.changed().await;
        drop((client_rx, client_tx));
    } else {
        let _ = cuts.changed().await;
        drop(inbound);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self._task.abort();
    }
}
