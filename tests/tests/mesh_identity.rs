//! Runtime identity: the manager admits a runtime only as the pod its
//! projected ServiceAccount token is bound to. Every other claim is refused
//! with a status that says why, and an impostor cannot disturb the real
//! runtime's session.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, Patch, PatchParams},
};
use opmesh_proto::env;
use opmesh_tests::{
    cluster, eventually,
    mesh::{Replica, ReplicaOptions, create_generator, create_operator_pod, mesh_resource},
    world::{TIMEOUT, World},
};
use serde_json::json;

const LABELS: [(&str, &str); 2] = [("app", "cmg"), ("version", "v1")];

/// Starts a runtime (and operator) claiming `pod` of `namespace`, with
/// `token` (none: no file), and waits until the manager refuses it with
/// `code`, saying `says`.
async fn refused(
    w: &World,
    namespace: &str,
    pod: &str,
    token: Option<&str>,
    code: &str,
    says: &str,
) -> anyhow::Result<Replica> {
    let path = w.dir.path().join(format!("{pod}.crafted-token"));
    let _ = std::fs::remove_file(&path);
    if let Some(t) = token {
        std::fs::write(&path, t)?;
    }
    let path = path.display().to_string();
    let mesh = format!("{}/mesh", w.ns);
    let env = [(env::TOKEN_FILE, path.as_str())];
    let r = Replica::start_processes(&ReplicaOptions {
        mesh: &mesh,
        namespace,
        pod,
        extra_env: &env,
        ..w.replica_options("v1")
    })
    .await?;
    eventually(
        &format!("{pod} to be refused with {code}"),
        TIMEOUT,
        || async {
            r.check_running()?;
            let log = r.sidecar.log_tail(100);
            Ok(log
                .lines()
                .any(|l| l.contains("refused") && l.contains(code) && l.contains(says))
                .then_some(()))
        },
    )
    .await?;
    assert!(!r.ready(), "{pod} is ready though refused");
    Ok(r)
}

async fn pod(w: &World, namespace: &str, name: &str) -> anyhow::Result<Pod> {
    create_operator_pod(&w.client, namespace, name, &LABELS).await
}

#[tokio::test]
async fn a_runtime_is_admitted_only_as_the_pod_its_token_is_bound_to() -> anyhow::Result<()> {
    let mut w = World::new("identity").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    // The real runtime, with its own pod's token.
    w.replica("v1-0", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("identity-data", &[]).await?;
    create_generator(&w.client, &ns, "app", json!({"data": {"n": "0"}})).await?;
    w.wait_handled(std::slice::from_ref(&ns), 1).await?;
    let joins = |log: &str| {
        log.lines()
            .filter(|l| l.contains("runtime joined") && l.contains("/v1-0 "))
            .count()
    };
    let joined_before = joins(&w.manager.process().log_tail(2000));

    let mut held = Vec::new();
    // No token, a token that is not one, and a token for another audience.
    pod(&w, &w.ns, "no-token").await?;
    held.push(refused(&w, &w.ns, "no-token", None, "Unauthenticated", "no token").await?);
    pod(&w, &w.ns, "garbage").await?;
    held.push(
        refused(
            &w,
            &w.ns,
            "garbage",
            Some("not-a-token"),
            "Unauthenticated",
            "does not accept",
        )
        .await?,
    );
    let other = pod(&w, &w.ns, "other-audience").await?;
    let token = cluster::pod_token(&w.client, &other, &["someone-else"]).await?;
    held.push(
        refused(
            &w,
            &w.ns,
            "other-audience",
            Some(&token),
            "Unauthenticated",
            "does not accept",
        )
        .await?,
    );

    // Nothing was read for them: no Pod GET before a token is accepted. The
    // apiserver's audit log shows one GET of each, the harness's own (it
    // reads the Pod to mint the token a kubelet would project), and more
    // for the admitted runtime's Pod, which the manager reads.
    for name in ["no-token", "garbage", "other-audience"] {
        assert_eq!(
            w.cp.pod_gets(&w.ns, name),
            1,
            "pod {name} was read for its hello"
        );
    }
    assert!(w.cp.pod_gets(&w.ns, "v1-0") > 1);

    // A valid token, presented for another pod: here the real v1-0, whose
    // session must not notice.
    let a = pod(&w, &w.ns, "pod-a").await?;
    let token_a = cluster::pod_token(&w.client, &a, &[env::TOKEN_AUDIENCE]).await?;
    held.push(
        refused(
            &w,
            &w.ns,
            "v1-0",
            Some(&token_a),
            "PermissionDenied",
            "bound to pod",
        )
        .await?,
    );

    // A token of an earlier pod of the same name. The apiserver itself
    // rejects a bound token once its pod is gone; the manager's check of
    // the live Pod's UID is what catches a review it cached meanwhile, so
    // the token is used (and its review cached) while the old pod lives.
    let old = pod(&w, &w.ns, "recreated").await?;
    let stale = cluster::pod_token(&w.client, &old, &[env::TOKEN_AUDIENCE]).await?;
    {
        let path = w.dir.path().join("recreated.crafted-token");
        std::fs::write(&path, &stale)?;
        let path = path.display().to_string();
        let mesh = format!("{}/mesh", w.ns);
        let env = [(env::TOKEN_FILE, path.as_str())];
        let first = Replica::start_processes(&ReplicaOptions {
            mesh: &mesh,
            pod: "recreated",
            extra_env: &env,
            ..w.replica_options("v1")
        })
        .await?;
        eventually("the old pod's runtime to be admitted", TIMEOUT, || async {
            first.check_running()?;
            Ok(first.ready().then_some(()))
        })
        .await?;
        first.sidecar.signal("KILL").await?;
        first.operator.signal("KILL").await?;
    }
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &w.ns);
    pods.delete("recreated", &DeleteParams::default().grace_period(0))
        .await?;
    eventually("the old pod to be gone", TIMEOUT, || async {
        Ok(pods.get_opt("recreated").await?.is_none().then_some(()))
    })
    .await?;
    pod(&w, &w.ns, "recreated").await?;
    held.push(
        refused(
            &w,
            &w.ns,
            "recreated",
            Some(&stale),
            "PermissionDenied",
            "earlier pod",
        )
        .await?,
    );

    // A genuine pod whose ServiceAccount may not itself read the mesh's
    // types: it is not sent them.
    let blind = cluster::create_pod(&w.client, &w.ns, "blind", &LABELS, "blind").await?;
    let token_blind = cluster::pod_token(&w.client, &blind, &[env::TOKEN_AUDIENCE]).await?;
    held.push(
        refused(
            &w,
            &w.ns,
            "blind",
            Some(&token_blind),
            "PermissionDenied",
            "may not list/watch configmapgenerators.example.opmesh.io, list/watch configmaps",
        )
        .await?,
    );

    // A genuine pod of another namespace.
    let elsewhere = cluster::create_namespace(&w.client, "identity-elsewhere", &[]).await?;
    let far = pod(&w, &elsewhere, "far").await?;
    let token_far = cluster::pod_token(&w.client, &far, &[env::TOKEN_AUDIENCE]).await?;
    let far = held.len();
    held.push(
        refused(
            &w,
            &elsewhere,
            "far",
            Some(&token_far),
            "PermissionDenied",
            "not in the namespace",
        )
        .await?,
    );

    // The real runtime kept its one session and its key.
    let joined_after = joins(&w.manager.process().log_tail(2000));
    assert_eq!(
        joined_before, joined_after,
        "the impostor ended v1-0's session"
    );
    assert!(w.replicas[0].ready());
    assert_eq!(w.change_and_wait(&ns, "app").await?, "v1/v1-0");

    // Once the mesh lists its namespace, the pod of the other namespace is
    // admitted at its next attempt.
    let meshes: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &w.ns, &mesh_resource());
    meshes
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runtimeNamespaces": [elsewhere]}})),
        )
        .await?;
    eventually(
        "the pod of the listed namespace to be admitted",
        TIMEOUT,
        || async {
            held[far].check_running()?;
            Ok(held[far].ready().then_some(()))
        },
    )
    .await?;
    drop(held);
    Ok(())
}
