//! The session with the manager: dial, hello, then apply what the manager
//! sends; reconnect with backoff when the session ends or is refused.

use std::{collections::HashMap, sync::Arc, time::Duration};

use opmesh_proto::v1::{
    GoodbyeReason, Heartbeat, Hello, ManagerMessage, ReconcileReports, Released, RuntimeMessage,
    manager_message::Msg, mesh_service_client::MeshServiceClient, runtime_message::Msg as Out,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

use crate::state::Runtime;

/// First reconnect delay.
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Network waits: dialing, the first answer.
const NET_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session attempt ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The manager refused this runtime; the message says why.
    #[error("the manager refused this runtime ({code:?}): {message}")]
    Refused {
        /// The gRPC code.
        code: Code,
        /// The manager's message.
        message: String,
    },
    /// The manager could not be reached or the stream broke.
    #[error("manager unreachable at {addr}: {reason}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The manager is a standby; another one leads.
    #[error("{addr} is a standby manager")]
    Standby {
        /// The address tried.
        addr: String,
    },
    /// The session was established and then ended.
    #[error("session ended: {0}")]
    Ended(String),
    /// The operator stopped or stayed gone: this runtime said goodbye and
    /// waits for an operator before it joins again.
    #[error("left the mesh: {0}")]
    OperatorGone(String),
}

/// Why a session says goodbye.
enum Leaving {
    /// The runtime shuts down.
    Shutdown,
    /// The operator stopped (`abnormal`: it has been gone past the grace).
    Operator { abnormal: bool, message: String },
}

/// Keeps a session with the manager until `shutdown` fires.
pub(crate) async fn run(rt: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    // Nothing to declare before the operator registers.
    let mut reg = rt.registration.subscribe();
    tokio::select! {
        r = reg.wait_for(Option::is_some) => if r.is_err() { return },
        _ = shutdown.wait_for(|s| *s) => return,
    }
    let mut backoff = BACKOFF_START;
    let addrs = rt.config.manager.clone();
    let mut attempt = 0usize;
    loop {
        // Try each manager address in turn (a standby refuses; the leader
        // accepts); back off only after a whole round failed.
        let addr = addrs[attempt % addrs.len().max(1)].clone();
        attempt += 1;
        let result = session(&rt, &addr, &mut shutdown).await;
        if *shutdown.borrow() {
            rt.session_lost();
            return;
        }
        // Keep the keys (without starting reconciles) while the lease runs,
        // to report them to whichever manager answers next.
        rt.session_ended();
        if let Err(SessionError::OperatorGone(why)) = &result {
            // The manager moved the keys at the goodbye.
            rt.session_lost();
            tracing::warn!(reason = %why, "left the mesh; waiting for an operator to join again");
            tokio::select! {
                () = rt.operator_back() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            tracing::info!("an operator is back; joining the mesh again");
            backoff = BACKOFF_START;
            continue;
        }
        match &result {
            Err(SessionError::Ended(why)) => {
                tracing::warn!(manager = %addr, reason = %why, "session ended; reconnecting");
                backoff = BACKOFF_START;
            }
            Err(e @ SessionError::Refused { .. }) => {
                tracing::error!(manager = %addr, error = %e, retry_in = ?backoff, "refused; retrying");
            }
            Err(e @ SessionError::Standby { .. }) => {
                tracing::info!(error = %e, "trying another manager")
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot open session; retrying")
            }
            Ok(()) => {}
        }
        if !attempt.is_multiple_of(addrs.len().max(1))
            && !matches!(result, Err(SessionError::Refused { .. }))
        {
            continue;
        }
        if matches!(result, Err(SessionError::Standby { .. })) {
            // Behind a Service, the next connection may reach the leader:
            // retry soon, without growing the backoff.
            tokio::select! {
                _ = tokio::time::sleep(BACKOFF_START) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// How long a graceful shutdown waits for running reconciles.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often reconcile outcomes go to the manager, and at most how many in
/// one message.
const REPORT_EVERY: Duration = Duration::from_secs(1);
const REPORT_BATCH: usize = 1000;

async fn session(
    rt: &Arc<Runtime>,
    addr: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let unreachable = |reason: String| SessionError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let reg = rt
        .registered()
        .ok_or_else(|| unreachable("not registered".into()))?;
    let mut endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| unreachable(format!("bad --manager address: {e}")))?
        .connect_timeout(NET_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(NET_TIMEOUT);
    if addr.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls_config(&rt.config).map_err(unreachable)?)
            .map_err(|e| unreachable(format!("TLS settings: {}", chain(&e))))?;
    }
    let channel = tokio::select! {
        c = endpoint.connect() => c.map_err(|e| unreachable(chain(&e)))?,
        _ = shutdown.wait_for(|s| *s) => return Ok(()),
    };
    let mut client = MeshServiceClient::new(channel);

    let (tx, rx) = mpsc::channel::<RuntimeMessage>(64);
    let reported = rt.held_keys();
    let hello = Hello {
        mesh_namespace: rt.config.mesh.namespace.clone(),
        mesh_name: rt.config.mesh.name.clone(),
        pod_namespace: rt.config.pod_namespace.clone(),
        pod_name: rt.config.pod_name.clone(),
        controllers: reg.controllers.clone(),
        primary: None,
        owns: Vec::new(),
        runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        auth_token: read_token(&rt.config.token_file),
        held: reported
            .iter()
            .map(|key| opmesh_proto::v1::HeldKey { key: key.clone() })
            .collect(),
        accepts_event_batches: true,
    };
    let hello_sent = Instant::now();
    // The channel is fresh, so this cannot fail.
    let _ = tx
        .send(RuntimeMessage {
            msg: Some(Out::Hello(hello)),
        })
        .await;
    let refused = |s: tonic::Status| match s.code() {
        Code::Unavailable if s.message().contains("not the leader") => SessionError::Standby {
            addr: addr.to_string(),
        },
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
            unreachable(s.message().to_string())
        }
        code => SessionError::Refused {
            code,
            message: s.message().to_string(),
        },
    };
    let response = tokio::time::timeout(NET_TIMEOUT * 3, client.session(ReceiverStream::new(rx)))
        .await
        .map_err(|_| unreachable("no answer to hello".into()))?
        .map_err(refused)?;
    let mut inbound = response.into_inner();
    let welcome = match tokio::time::timeout(NET_TIMEOUT * 3, inbound.message()).await {
        Ok(Ok(Some(m))) => match m.msg {
            Some(Msg::Welcome(w)) => w,
            _ => return Err(unreachable("the first message was not a welcome".into())),
        },
        Ok(Ok(None)) => return Err(unreachable("stream closed before welcome".into())),
        Ok(Err(s)) => return Err(refused(s)),
        Err(_) => return Err(unreachable("no welcome".into())),
    };
    rt.welcomed(&welcome, hello_sent, &reported);
    tracing::info!(manager = %addr, runtime = %welcome.runtime_id, subset = %welcome.subset, "session established");

    let ttl = Duration::from_millis(u64::from(welcome.lease_ttl_ms.max(100)));
    let grace = Duration::from_millis(rt.config.operator_grace_ms);
    let mut tasks = JoinSet::new();
    let sent_at: SentAt = Arc::default();
    {
        let (tx, sent_at, rt) = (tx.clone(), sent_at.clone(), rt.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            let mut seq = 0u64;
            loop {
                tick.tick().await;
                seq += 1;
                {
                    let mut m = sent_at.lock().unwrap_or_else(|e| e.into_inner());
                    m.retain(|s, _| seq.saturating_sub(*s) < 16);
                    m.insert(seq, Instant::now());
                }
                let hb = RuntimeMessage {
                    msg: Some(Out::Heartbeat(Heartbeat {
                        seq,
                        queue_depth: u32::try_from(rt.queue.len()).unwrap_or(u32::MAX),
                        in_flight: u32::try_from(rt.in_flight()).unwrap_or(u32::MAX),
                        capacity: rt
                            .registered()
                            .map_or(0, |r| r.max_concurrent(rt.config.max_concurrent_reconciles)),
                    })),
                };
                if tx.send(hb).await.is_err() {
                    return;
                }
            }
        });
    }

    // Reconcile outcomes go to the manager in batches, once a second.
    {
        let (tx, rt) = (tx.clone(), rt.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(REPORT_EVERY);
            loop {
                tick.tick().await;
                let (reports, dropped) = rt.take_reports();
                if reports.is_empty() && dropped == 0 {
                    continue;
                }
                tracing::debug!(
                    reports = reports.len(),
                    dropped,
                    "sending reconcile reports"
                );
                let mut chunks = reports.chunks(REPORT_BATCH).peekable();
                let mut dropped = Some(dropped);
                while chunks.peek().is_some() || dropped.is_some() {
                    let batch = RuntimeMessage {
                        msg: Some(Out::Reports(ReconcileReports {
                            reports: chunks.next().map(<[_]>::to_vec).unwrap_or_default(),
                            dropped: dropped.take().unwrap_or(0),
                        })),
                    };
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
            }
        });
    }

    // Without renewals the lease runs out; then every key is dropped and
    // running reconciles are cancelled, before the manager (which waits a
    // margin longer) gives the keys to anyone else.
    loop {
        let lease_end = rt.lease_until().unwrap_or_else(Instant::now);
        let msg = tokio::select! {
            m = inbound.message() => Ok(m),
            _ = tokio::time::sleep_until(lease_end) => {
                rt.expire_lease();
                return Err(SessionError::Ended("the lease ran out without renewal".into()));
            }
            r = shutdown.wait_for(|s| *s) => {
                drop(r);
                Err(Leaving::Shutdown)
            }
            (abnormal, message) = rt.operator_gone(grace) => {
                Err(Leaving::Operator { abnormal, message })
            }
        };
        let msg = match msg {
            Ok(msg) => msg,
            Err(leaving) => {
                let gone = match &leaving {
                    Leaving::Operator { message, .. } => Some(message.clone()),
                    Leaving::Shutdown => None,
                };
                goodbye(rt, &tx, &mut inbound, &sent_at, ttl, &mut tasks, leaving).await?;
                return match gone {
                    Some(message) => Err(SessionError::OperatorGone(message)),
                    None => Ok(()),
                };
            }
        };
        // Reap finished revoke tasks so they do not pile up.
        while tasks.try_join_next().is_some() {}
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => return Err(SessionError::Ended("the manager closed the stream".into())),
            Err(s) => return Err(SessionError::Ended(s.message().to_string())),
        };
        on_message(rt, msg, &sent_at, &tx, ttl, &mut tasks);
    }
}

/// The token in `path`, or empty (the manager then says what is missing)
/// if it cannot be read.
/// TLS that trusts the CA bundle file, read now (so a rotated bundle is
/// used from the next connection on), and nothing else.
fn tls_config(config: &crate::Config) -> Result<ClientTlsConfig, String> {
    let pem = std::fs::read(&config.ca_file).map_err(|e| {
        format!(
            "cannot read the CA bundle {} ({e}): mount the manager's ca.crt there, or point \
             {} at it",
            config.ca_file.display(),
            opmesh_proto::env::CA_FILE
        )
    })?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    if let Some(name) = &config.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

/// An error with its causes, which say what failed in a handshake.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn read_token(path: &std::path::Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the token file; the manager will refuse this runtime unless it allows unauthenticated runtimes");
            String::new()
        }
    }
}

/// Heartbeat sequence numbers and when each was sent.
type SentAt = Arc<std::sync::Mutex<HashMap<u64, Instant>>>;

/// Applies one message from the manager.
fn on_message(
    rt: &Arc<Runtime>,
    msg: ManagerMessage,
    sent_at: &SentAt,
    tx: &mpsc::Sender<RuntimeMessage>,
    ttl: Duration,
    tasks: &mut JoinSet<()>,
) {
    match msg.msg {
        Some(Msg::Event(ev)) => rt.on_event(ev),
        Some(Msg::Events(batch)) => {
            for ev in batch.events {
                rt.on_event(ev);
            }
        }
        Some(Msg::Synced(_)) => rt.on_synced(),
        Some(Msg::Revoke(r)) => {
            rt.revoke(&r.keys);
            let (rt, tx) = (rt.clone(), tx.clone());
            tasks.spawn(async move {
                // A running reconcile gets a lease TTL to finish, and may
                // write meanwhile (the key is not given away before
                // Released); a hung one is cancelled, so the key cannot
                // stay stuck.
                if tokio::time::timeout(ttl, rt.drained(&r.keys)).await.is_err() {
                    tracing::warn!(keys = r.keys.len(), "reconciles of revoked keys still running after a lease TTL; cancelling them");
                    rt.cancel_keys(&r.keys);
                    rt.drained(&r.keys).await;
                }
                rt.releasing_done(&r.keys);
                let _ = tx
                    .send(RuntimeMessage {
                        msg: Some(Out::Released(Released { keys: r.keys })),
                    })
                    .await;
            });
        }
        Some(Msg::Lease(l)) => {
            let sent = sent_at.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = sent.get(&l.seq) {
                rt.metrics.lease_renewal.observe(at.elapsed().as_secs_f64());
            }
            let until = renewed_until(&sent, l.seq, l.ttl_ms);
            drop(sent);
            if let Some(until) = until {
                rt.renewed(until);
            }
        }
        Some(Msg::Welcome(_)) | None => {}
    }
}

/// A graceful shutdown: start nothing new, let running reconciles finish,
/// then say goodbye so the manager moves the keys at once. While draining,
/// renewals still apply, so the reconciles keep their lease (and their
/// writes); if the lease runs out anyway, they are cancelled as always.
async fn goodbye(
    rt: &Arc<Runtime>,
    tx: &mpsc::Sender<RuntimeMessage>,
    inbound: &mut tonic::Streaming<ManagerMessage>,
    sent_at: &SentAt,
    ttl: Duration,
    tasks: &mut JoinSet<()>,
    leaving: Leaving,
) -> Result<(), SessionError> {
    if matches!(leaving, Leaving::Shutdown) {
        rt.start_draining();
    }
    tracing::info!("draining before goodbye");
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let drained = rt.drained_all();
    tokio::pin!(drained);
    let mut connected = true;
    loop {
        let lease_end = rt.lease_until().filter(|t| *t > Instant::now());
        tokio::select! {
            () = &mut drained => break,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("reconciles still running after {DRAIN_TIMEOUT:?}; leaving without goodbye");
                return Ok(());
            }
            m = inbound.message(), if connected => match m {
                Ok(Some(m)) => on_message(rt, m, sent_at, tx, ttl, tasks),
                Ok(None) | Err(_) => connected = false,
            },
            _ = tokio::time::sleep_until(lease_end.unwrap_or(deadline)), if lease_end.is_some() => {
                rt.expire_lease();
            }
        }
    }
    if !connected {
        tracing::info!("drained; the stream to the manager is gone, so no goodbye");
        return Ok(());
    }
    let (reason, message) = match leaving {
        Leaving::Shutdown => (
            GoodbyeReason::Shutdown,
            "the runtime is shutting down".to_string(),
        ),
        Leaving::Operator { abnormal, message } => (
            if abnormal {
                GoodbyeReason::OperatorGone
            } else {
                GoodbyeReason::OperatorStopping
            },
            message,
        ),
    };
    let bye = RuntimeMessage {
        msg: Some(Out::Goodbye(opmesh_proto::v1::Goodbye {
            reason: reason as i32,
            message,
        })),
    };
    let _ = tokio::time::timeout(NET_TIMEOUT, tx.send(bye)).await;
    // Give the stream a moment to carry the goodbye before it is torn down.
    let _ = tokio::time::timeout(Duration::from_millis(500), tx.closed()).await;
    tracing::info!("said goodbye");
    Ok(())
}

/// When a renewal answering heartbeat `seq` ends the lease: `ttl_ms` from
/// when that heartbeat was sent, since the manager's lease started no
/// earlier, and never from when the answer arrived, which may be late. An
/// answer to a heartbeat this session never sent renews nothing.
fn renewed_until(sent_at: &HashMap<u64, Instant>, seq: u64, ttl_ms: u32) -> Option<Instant> {
    let sent = sent_at.get(&seq)?;
    Some(*sent + Duration::from_millis(u64::from(ttl_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_renewal_counts_from_when_its_heartbeat_was_sent() {
        let now = Instant::now();
        let sent = now - Duration::from_secs(2);
        let sent_at = HashMap::from([(7, sent)]);
        // The answer arrives 2 s after the heartbeat: the lease still ends
        // 3 s after the heartbeat, 1 s from now, not 3 s from now.
        assert_eq!(
            renewed_until(&sent_at, 7, 3000),
            Some(sent + Duration::from_secs(3))
        );
        assert!(renewed_until(&sent_at, 8, 3000).is_none());
    }

    #[tokio::test]
    async fn a_batch_of_events_applies_like_the_events_one_by_one() {
        use opmesh_proto::v1::{
            GroupVersionKind, ObjectEvent, ObjectEvents, Synced, Welcome, object_event::Type,
        };
        let rt = Arc::new(Runtime::for_test(&[]));
        rt.welcomed(
            &Welcome {
                runtime_id: "ops/op-0".into(),
                subset: "v1".into(),
                lease_ttl_ms: 3_600_000,
            },
            Instant::now(),
            &[],
        );
        let gvk = GroupVersionKind {
            version: "v1".into(),
            kind: "ConfigMap".into(),
            ..Default::default()
        };
        let event = |name: &str, ty: Type, body: &str| ObjectEvent {
            key: opmesh_proto::mesh_key("", "v1", "ConfigMap", Some("ns"), name),
            r#type: ty as i32,
            gvk: Some(gvk.clone()),
            namespace: "ns".into(),
            name: name.into(),
            object: body.as_bytes().to_vec(),
            ..Default::default()
        };
        let (tx, _rx) = mpsc::channel(8);
        let mut tasks = JoinSet::new();
        let sent_at = SentAt::default();
        let mut apply = |msg| {
            on_message(
                &rt,
                ManagerMessage { msg: Some(msg) },
                &sent_at,
                &tx,
                Duration::from_secs(3),
                &mut tasks,
            )
        };
        // In order: b's second state wins, and c is gone again.
        apply(Msg::Events(ObjectEvents {
            events: vec![
                event("a", Type::Applied, r#"{"v":1}"#),
                event("b", Type::Applied, r#"{"v":1}"#),
                event("b", Type::Applied, r#"{"v":2}"#),
                event("c", Type::Applied, r#"{"v":1}"#),
                event("c", Type::Deleted, ""),
            ],
        }));
        apply(Msg::Synced(Synced {}));
        let primary = |name: &str| {
            rt.primary(&opmesh_proto::mesh_key(
                "",
                "v1",
                "ConfigMap",
                Some("ns"),
                name,
            ))
            .map(|(o, _)| String::from_utf8(o).unwrap())
        };
        assert_eq!(primary("a").as_deref(), Some(r#"{"v":1}"#));
        assert_eq!(primary("b").as_deref(), Some(r#"{"v":2}"#));
        assert_eq!(primary("c"), None);
    }
}
