//! The gRPC edge: admits runtime sessions (checks the hello, resolves the
//! real Pod's labels) and pumps their streams between the network and the
//! coordinator.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt as _};
use opmesh_proto::v1::{
    ControllerTypes, GoodbyeReason, GroupVersionKind, Hello, LeaseRenewal, ManagerMessage,
    ObjectEvent, ObjectEvents, RuntimeMessage, manager_message::Msg,
    mesh_service_server::MeshService, runtime_message::Msg as In,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    coordinator::{Connected, Input, Load},
    error::Refusal,
    gvk::controller_keys,
    leader::Authority,
    limits::Limits,
    metrics::Metrics,
    outcomes::Outcomes,
    snapshot::Published,
};

/// How long a runtime may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a Pod lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Inputs of one session waiting for the coordinator, beyond which reading
/// the session's stream waits too.
const SESSION_INPUTS: usize = 1024;
/// Messages taken from a pending set per write.
const BATCH: usize = 256;
/// The largest message a runtime may send: a hello with the most held keys
/// it may report, of typical length. Larger ones are refused by gRPC
/// (`OUT_OF_RANGE`) before anything else reads them.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// Serves `MeshService`.
pub(crate) struct MeshServer {
    core: mpsc::Sender<Input>,
    client: Client,
    admission: crate::admission::Admission,
    lease_ttl: Duration,
    authority: Arc<Authority>,
    published: Arc<Published>,
    limits: Limits,
    /// Where runtimes' reconcile reports go.
    outcomes: Arc<Outcomes>,
    metrics: Arc<Metrics>,
}

// === impl MeshServer ===

impl MeshServer {
    /// A server that hands sessions to the coordinator behind `core` while
    /// `authority` says this manager leads, to runtimes `admission` admits;
    /// `published` is the coordinator's view, for the types a mesh routes;
    /// `limits` bound the hellos and sessions it takes.
    pub(crate) fn new(
        core: mpsc::Sender<Input>,
        client: Client,
        lease_ttl: Duration,
        authority: Arc<Authority>,
        admission: crate::admission::Admission,
        published: Arc<Published>,
        limits: Limits,
    ) -> Self {
        Self {
            core,
            client,
            admission,
            lease_ttl,
            authority,
            published,
            limits,
            outcomes: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// Keeps runtimes' reconcile reports in `outcomes` and counts them in
    /// `metrics`.
    pub(crate) fn with_reports(mut self, outcomes: Arc<Outcomes>, metrics: Arc<Metrics>) -> Self {
        self.outcomes = outcomes;
        self.metrics = metrics;
        self
    }

    async fn admit(&self, hello: Hello) -> Result<Connected, Refusal> {
        crate::admission::check_hello(&hello)?;
        let controllers =
            ControllerTypes::declared(&hello.controllers, hello.primary.as_ref(), &hello.owns);
        let named = |g: &Option<GroupVersionKind>| {
            g.as_ref().is_some_and(|g| {
                !g.kind.is_empty() && !g.version.is_empty() && !g.plural.is_empty()
            })
        };
        if controllers.is_empty() || !controllers.iter().all(|c| named(&c.primary)) {
            return Err(Refusal::Malformed(
                "every controller of the hello must name a primary kind, version and plural".into(),
            ));
        }
        // Who it is, before anything is read on its behalf.
        let id = self.admission.authenticate(&hello).await?;
        // The mesh decides what it routes (checked again when the session
        // starts, against the policy then in force); the runtime's own
        // identity must be able to read all of it.
        let mesh = crate::id::MeshId::new(&hello.mesh_namespace, &hello.mesh_name);
        let types: Vec<&GroupVersionKind> = controllers
            .iter()
            .flat_map(|c| c.primary.iter().chain(&c.owns))
            .collect();
        let published = self.published.load();
        let view = published.meshes.get(&mesh);
        if hello.pod_namespace != hello.mesh_namespace
            && !view.is_some_and(|m| m.runtime_namespaces.contains(&hello.pod_namespace))
        {
            return Err(Refusal::PermissionDenied(format!(
                "pod {}/{} is not in the namespace of OperatorMesh {mesh}: a mesh admits runtimes \
                 of its own namespace and of those its spec.runtimeNamespaces lists",
                hello.pod_namespace, hello.pod_name
            )));
        }
        if let Some(reason) = view
            .and_then(|m| m.declared.as_ref())
            .and_then(|d| d.undeclared(&controller_keys(&controllers)))
        {
            return Err(Refusal::UndeclaredTypes {
                mesh: mesh.to_string(),
                reason,
            });
        }
        drop(published);
        if let Some(id) = &id {
            self.admission.authorize(id, &types).await?;
        }
        let uid = id.map(|id| id.pod_uid);
        // The subset comes from the real Pod's labels, never from the runtime.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &hello.pod_namespace);
        let pod = tokio::time::timeout(LOOKUP_TIMEOUT, pods.get_opt(&hello.pod_name))
            .await
            .map_err(|_| Refusal::Lookup("timed out reading the Pod".into()))?
            .map_err(|e| Refusal::Lookup(e.to_string()))?
            .ok_or_else(|| Refusal::UnknownPod {
                pod: format!("{}/{}", hello.pod_namespace, hello.pod_name),
            })?;
        if let Some(uid) = uid
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(Refusal::PermissionDenied(format!(
                "the token is bound to an earlier pod {}/{} (uid {uid}); the pod was re-created, \
                 so its runtime needs the new pod's token",
                hello.pod_namespace, hello.pod_name
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.core
            .send(Input::Connect {
                hello: Box::new(hello),
                pod_labels: pod.labels().clone(),
                pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                reply,
            })
            .await
            .map_err(|_| Refusal::ShuttingDown)?;
        answer.await.map_err(|_| Refusal::ShuttingDown)?
    }
}

#[tonic::async_trait]
impl MeshService for MeshServer {
    type SessionStream = ReceiverStream<Result<ManagerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<RuntimeMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if !self.authority.leading(std::time::Instant::now()) {
            return Err(Refusal::NotLeader.into());
        }
        // Over a limit: refused before the hello is even read.
        let admitting = self.limits.hello(std::time::Instant::now())?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(In::Hello(h)) => h,
            _ => return Err(Refusal::Malformed("the first message must be hello".into()).into()),
        };
        let pod = crate::id::PodId::new(&hello.pod_namespace, &hello.pod_name);
        let batched = hello.accepts_event_batches;
        let slot = self.limits.session()?;
        let connected = match self.admit(hello).await {
            Ok(c) => c,
            Err(refusal) => {
                tracing::warn!(runtime = %pod, %refusal, "refused runtime");
                return Err(refusal.into());
            }
        };
        drop(admitting);
        let Connected {
            holder,
            pending,
            contact,
            mesh,
            subset,
        } = connected;
        let (outcomes, metrics) = (self.outcomes.clone(), self.metrics.clone());

        // Writer: pending set -> stream. A bounded channel gives backpressure;
        // the pending set coalesces while the runtime is slow.
        // Messages written but not yet on the wire wait ahead of a lease
        // renewal, so the buffer holds about as many events either way.
        let (tx, rx) = mpsc::channel(if batched { 2 } else { 64 });
        let core = self.core.clone();
        let (writer_holder, writer_pending) = (holder.clone(), pending.clone());
        let stuck_after = self.lease_ttl;
        tokio::spawn(async move {
            while let Some(batch) = writer_pending.next_batch(BATCH).await {
                let batch = if batched {
                    batch_events(batch, opmesh_proto::batch::MAX_BYTES)
                } else {
                    batch
                };
                for msg in batch {
                    // A runtime that stops reading gets no renewal either,
                    // so its lease runs out; it is dropped then, and its keys
                    // wait for that lease like any lost runtime's.
                    let sent = match tokio::time::timeout(stuck_after, tx.send(Ok(msg))).await {
                        Ok(r) => r.is_ok(),
                        Err(_) => {
                            tracing::warn!(runtime = %writer_holder.pod, waited = ?stuck_after, "the runtime stopped reading its stream; dropping its session");
                            false
                        }
                    };
                    if !sent {
                        let _ = core
                            .send(Input::Disconnect {
                                holder: writer_holder,
                                graceful: false,
                                operator_gone: None,
                            })
                            .await;
                        return;
                    }
                }
            }
        });

        // Reader: stream -> core. The session ends when the stream does.
        // What goes to the coordinator passes through a queue of the
        // session's own, so a busy coordinator never holds up the reading
        // of heartbeats; the queue keeps Released before Disconnect.
        let (to_core, mut for_core) = mpsc::channel::<Input>(SESSION_INPUTS);
        let core = self.core.clone();
        tokio::spawn(async move {
            while let Some(input) = for_core.recv().await {
                if core.send(input).await.is_err() {
                    return;
                }
            }
        });
        let core = to_core;
        let ttl_ms = u32::try_from(self.lease_ttl.as_millis()).unwrap_or(u32::MAX);
        let (authority, ttl) = (self.authority.clone(), self.lease_ttl);
        tokio::spawn(async move {
            // The session's slot is free again when its stream ends.
            let _slot = slot;
            let mut graceful = false;
            let mut operator_gone = None;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(runtime = %holder.pod, error = %e, "session stream failed");
                        break;
                    }
                };
                let now = std::time::Instant::now();
                contact.touch(now);
                match msg.msg {
                    // Renewed only while this manager leads by its own clock
                    // and its coordinator runs; otherwise the runtime's lease
                    // runs out and it stops.
                    Some(In::Heartbeat(hb)) if authority.may_renew(now, ttl) => {
                        contact.report(Load {
                            queue_depth: hb.queue_depth,
                            in_flight: hb.in_flight,
                            capacity: hb.capacity,
                        });
                        pending.urgent(ManagerMessage {
                            msg: Some(Msg::Lease(LeaseRenewal {
                                seq: hb.seq,
                                ttl_ms,
                            })),
                        })
                    }
                    Some(In::Heartbeat(_)) => {}
                    Some(In::Released(r)) => {
                        let input = Input::Released {
                            holder: holder.clone(),
                            keys: r.keys,
                        };
                        if core.send(input).await.is_err() {
                            break;
                        }
                    }
                    Some(In::Goodbye(bye)) => {
                        graceful = true;
                        if bye.reason() == GoodbyeReason::OperatorGone {
                            operator_gone = Some(bye.message);
                        }
                        break;
                    }
                    Some(In::Reports(r)) => {
                        tracing::debug!(runtime = %holder.pod, reports = r.reports.len(), "reconcile reports");
                        outcomes.record(&mesh, &subset, &holder.pod, &r.reports);
                        metrics.reconciled(&mesh, &subset, &r.reports, r.dropped);
                    }
                    Some(In::Report(_)) | Some(In::Hello(_)) | None => {}
                }
            }
            let input = Input::Disconnect {
                holder,
                graceful,
                operator_gone,
            };
            let _ = core.send(input).await;
        });

        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Merges each run of object events in `batch` into `ObjectEvents`
/// messages of at most about `max_bytes` of objects, keeping the order of
/// everything. A run of one stays an `ObjectEvent`.
fn batch_events(batch: Vec<ManagerMessage>, max_bytes: usize) -> Vec<ManagerMessage> {
    fn close(run: &mut Vec<ObjectEvent>, out: &mut Vec<ManagerMessage>) {
        let msg = match run.len() {
            0 => return,
            1 => Msg::Event(run.pop().expect("one event")),
            _ => Msg::Events(ObjectEvents {
                events: std::mem::take(run),
            }),
        };
        out.push(ManagerMessage { msg: Some(msg) });
    }
    let mut out = Vec::with_capacity(batch.len());
    let (mut run, mut bytes) = (Vec::new(), 0);
    for m in batch {
        match m.msg {
            Some(Msg::Event(ev)) => {
                if bytes + ev.object.len() > max_bytes {
                    close(&mut run, &mut out);
                    bytes = 0;
                }
                bytes += ev.object.len();
                run.push(ev);
            }
            other => {
                close(&mut run, &mut out);
                bytes = 0;
                out.push(ManagerMessage { msg: other });
            }
        }
    }
    close(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use opmesh_proto::v1::Synced;

    use super::*;

    fn event(key: &str, size: usize) -> ManagerMessage {
        ManagerMessage {
            msg: Some(Msg::Event(ObjectEvent {
                key: key.into(),
                object: vec![b' '; size],
                ..Default::default()
            })),
        }
    }

    fn synced() -> ManagerMessage {
        ManagerMessage {
            msg: Some(Msg::Synced(Synced {})),
        }
    }

    /// The keys of each message: events' keys, or "synced".
    fn shape(batch: &[ManagerMessage]) -> Vec<Vec<String>> {
        batch
            .iter()
            .map(|m| match &m.msg {
                Some(Msg::Event(e)) => vec![e.key.clone()],
                Some(Msg::Events(es)) => es.events.iter().map(|e| e.key.clone()).collect(),
                _ => vec!["synced".into()],
            })
            .collect()
    }

    #[test]
    fn runs_of_events_travel_together_in_order_and_within_the_size() {
        let batch = vec![
            event("a", 10),
            event("b", 10),
            event("c", 10),
            synced(),
            event("d", 10),
            synced(),
            event("e", 600),
            event("f", 600),
            event("g", 2_000),
            event("h", 10),
        ];
        let out = batch_events(batch, 1_000);
        let s = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shape(&out),
            vec![
                s(&["a", "b", "c"]),
                s(&["synced"]),
                s(&["d"]),
                s(&["synced"]),
                // 1,200 bytes would exceed the size: two messages.
                s(&["e"]),
                s(&["f"]),
                // Larger than the size on its own: alone.
                s(&["g"]),
                s(&["h"]),
            ]
        );
        assert!(
            matches!(out[2].msg, Some(Msg::Event(_))),
            "a run of one stays an event"
        );
        assert!(matches!(out[0].msg, Some(Msg::Events(_))));
    }
}
