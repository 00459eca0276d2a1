//! A raw client of the manager's session port, for tests that send hellos
//! no real runtime would: forged, oversized, or declaring other types.

use opmesh_proto::v1::{
    GroupVersionKind, Hello, RuntimeMessage, mesh_service_client::MeshServiceClient,
    runtime_message::Msg,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{tls::MeshTls, world::World};

/// A client of `w`'s manager, trusting the harness's CA.
pub async fn client(w: &World) -> anyhow::Result<MeshServiceClient<Channel>> {
    let ca = &MeshTls::shared(w.cp.dir()).ca_pem;
    let channel = Endpoint::from_shared(w.manager.addr().to_string())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
        .connect()
        .await?;
    Ok(MeshServiceClient::new(channel))
}

/// Sends `hello` and returns the manager's answer: the status it was
/// refused with, or OK.
pub async fn send(client: &mut MeshServiceClient<Channel>, hello: Hello) -> (Code, String) {
    let first = RuntimeMessage {
        msg: Some(Msg::Hello(hello)),
    };
    // The stream stays open (the sender is held) until the answer.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.send(first).await;
    let answer = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    drop(tx);
    match answer {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// A hello for `pod` of `w`'s mesh `mesh`, declaring the example
/// operator's primary type only, with `token`.
pub fn hello(w: &World, pod: &str, token: &str) -> Hello {
    Hello {
        mesh_namespace: w.ns.clone(),
        mesh_name: "mesh".into(),
        pod_namespace: w.ns.clone(),
        pod_name: pod.into(),
        primary: Some(GroupVersionKind {
            group: "example.opmesh.io".into(),
            version: "v1".into(),
            kind: "ConfigMapGenerator".into(),
            plural: "configmapgenerators".into(),
            namespaced: true,
        }),
        auth_token: token.into(),
        ..Default::default()
    }
}
