//! The operator's life cycle: a crashed operator's keys move after a grace
//! period and the mesh says why; a stopping operator finishes its work and
//! hands its keys over at once; the mesh's status tells the truth about
//! replicas.

use std::time::Duration;

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use opmesh_proto::env;
use opmesh_tests::{
    control_plane::Process,
    eventually,
    history::now_us,
    history::{self, Deaths},
    mesh::{LEASE_TTL, create_generator, generator_resource, read_records},
    world::{TIMEOUT, World},
};
use serde_json::json;

/// How long the replicas here wait for a crashed operator.
const GRACE: Duration = Duration::from_secs(1);

/// Two v1 replicas with a short operator grace, and `n` objects handled.
async fn two_replicas(prefix: &str, n: usize) -> anyhow::Result<(World, String)> {
    let mut w = World::new(prefix).await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    let grace = GRACE.as_millis().to_string();
    for pod in ["v1-0", "v1-1"] {
        w.replica_with_env(pod, "v1", &[(env::OPERATOR_GRACE_MS, &grace)])
            .await?;
    }
    w.all_ready().await?;
    let ns = w.object_namespace(&format!("{prefix}-data"), &[]).await?;
    for i in 0..n {
        create_generator(
            &w.client,
            &ns,
            &format!("app-{i}"),
            json!({"data": {"n": "0"}}),
        )
        .await?;
    }
    w.wait_handled(std::slice::from_ref(&ns), n).await?;
    Ok((w, ns))
}

/// The names of the objects in `ns` that `pod` handles.
async fn handled_by(w: &World, ns: &str, pod: &str) -> anyhow::Result<Vec<String>> {
    let api: Api<DynamicObject> = Api::namespaced_with(w.client.clone(), ns, &generator_resource());
    Ok(api
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|o| o.data["status"]["handledBy"].as_str() == Some(&format!("v1/{pod}")))
        .filter_map(|o| o.metadata.name)
        .collect())
}

async fn patch(w: &World, ns: &str, name: &str, patch: serde_json::Value) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(w.client.clone(), ns, &generator_resource());
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_crashed_operators_keys_move_after_the_grace_and_the_mesh_says_why() -> anyhow::Result<()>
{
    let (mut w, ns) = two_replicas("crash", 8).await?;
    let mine = handled_by(&w, &ns, "v1-0").await?;
    anyhow::ensure!(!mine.is_empty(), "v1-0 owns none of 8 keys");

    w.replicas[0].operator.signal("KILL").await?;
    w.replicas[0]
        .operator
        .wait_exit(Duration::from_secs(10))
        .await;
    let killed = now_us();
    // Every key of v1-0 changes; v1-1 must pick them up.
    for name in &mine {
        patch(&w, &ns, name, json!({"spec": {"data": {"n": "after"}}})).await?;
    }
    let moved = eventually("v1-0's keys to be reconciled by v1-1", TIMEOUT, || async {
        let now = handled_by(&w, &ns, "v1-1").await?;
        Ok(mine.iter().all(|k| now.contains(k)).then_some(now_us()))
    })
    .await?;
    let took = Duration::from_micros((moved - killed) as u64);
    assert!(
        took < GRACE + LEASE_TTL * 2,
        "v1-0's keys took {took:?} to move (grace {GRACE:?}, TTL {LEASE_TTL:?})"
    );
    // Its sidecar is not ready, and the mesh says why.
    assert!(
        !w.replicas[0].ready(),
        "v1-0's sidecar says ready without an operator"
    );
    let (status, reason, message) = eventually("the mesh to say why", TIMEOUT, || async {
        Ok(w.condition("Degraded")
            .await?
            .filter(|(s, _, _)| s == "True"))
    })
    .await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "OperatorGone"),
        "{message}"
    );
    assert!(message.contains("v1-0"), "{message}");

    // The operator comes back (as a kubelet restarts it): v1-0 rejoins and
    // the note goes.
    let mut r = w.replicas.remove(0);
    let mesh = format!("{}/mesh", w.ns);
    let grace = GRACE.as_millis().to_string();
    let env = [(env::OPERATOR_GRACE_MS, grace.as_str())];
    let opts = opmesh_tests::mesh::ReplicaOptions {
        mesh: &mesh,
        pod: "v1-0",
        extra_env: &env,
        ..w.replica_options("v1")
    };
    r.restart_operator(&opts)?;
    w.replicas.insert(0, r);
    eventually("v1-0 to be ready again", TIMEOUT, || async {
        Ok(w.replicas[0].ready().then_some(()))
    })
    .await?;
    eventually("the mesh to be no longer degraded", TIMEOUT, || async {
        Ok(w.condition("Degraded")
            .await?
            .filter(|(s, _, _)| s == "False"))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_stopping_operator_finishes_its_reconciles_and_its_keys_move_at_once()
-> anyhow::Result<()> {
    let (w, ns) = two_replicas("stop-op", 8).await?;
    let mine = handled_by(&w, &ns, "v1-0").await?;
    let name = mine
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("v1-0 owns none of 8 keys"))?;
    let key = format!("{ns}/{name}");
    let work = (LEASE_TTL * 2 / 3).as_millis() as u64;
    patch(
        &w,
        &ns,
        &name,
        json!({"spec": {"data": {"n": "1"}, "reconcileMs": work}}),
    )
    .await?;
    let old = w.replicas[0].records.clone();
    let started = eventually("v1-0 to start working on the change", TIMEOUT, || async {
        Ok(history::working(&old, &key, 2))
    })
    .await?;

    // SIGTERM to the operator, as the kubelet sends when the pod goes.
    w.replicas[0].operator.signal("TERM").await?;
    let code = w.replicas[0].operator.wait_exit(TIMEOUT).await;
    assert_eq!(code, Some(Some(0)), "the operator did not stop cleanly");
    let ended = read_records(&old)
        .into_iter()
        .find(|r| r.id == started.id)
        .ok_or_else(|| anyhow::anyhow!("v1-0's reconcile has no end"))?;
    assert_eq!(ended.outcome, "ok", "{ended:?}");

    // The key moved at the goodbye: v1-1 starts on it well within a TTL.
    let new = w.replicas[1].records.clone();
    let next = eventually("v1-1 to reconcile the key", TIMEOUT, || async {
        Ok(history::read(&[&new], &Deaths::default(), now_us())
            .into_iter()
            .find(|r| r.key == key && r.start_us > ended.end_us))
    })
    .await?;
    let waited = Duration::from_micros((next.start_us - ended.end_us) as u64);
    assert!(waited < LEASE_TTL, "the key waited {waited:?}");
    Ok(())
}

#[tokio::test]
async fn the_status_tells_no_replicas_a_lost_replica_and_a_contested_pod_name() -> anyhow::Result<()>
{
    let mut w = World::new("status-truth").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    // No replicas: not ready, whatever the (zero) keys say.
    let (_, reason, _) = eventually("Ready=False with no replicas", TIMEOUT, || async {
        Ok(w.condition("Ready").await?.filter(|(s, _, _)| s == "False"))
    })
    .await?;
    assert_eq!(reason, "NoReplicas");

    w.replica("v1-0", "v1").await?;
    w.all_ready().await?;
    eventually("Ready=True with a replica", TIMEOUT, || async {
        Ok(w.condition("Ready").await?.filter(|(s, _, _)| s == "True"))
    })
    .await?;

    // A killed replica shows within a TTL.
    let r = w.replicas.remove(0);
    r.sidecar.signal("KILL").await?;
    r.operator.signal("KILL").await?;
    let killed = std::time::Instant::now();
    eventually("Ready=False once the replica is gone", TIMEOUT, || async {
        Ok(w.condition("Ready").await?.filter(|(s, _, _)| s == "False"))
    })
    .await?;
    assert!(
        killed.elapsed() < LEASE_TTL,
        "the lost replica showed after {:?}",
        killed.elapsed()
    );
    drop(r);

    // Two runtimes that claim one pod keep replacing each other: Degraded,
    // naming the pod.
    w.replica("v1-1", "v1").await?;
    let mesh = format!("{}/mesh", w.ns);
    let socket = w.dir.path().join("impostor.sock");
    let mut vars = opmesh_tests::tls::MeshTls::shared(w.cp.dir()).env();
    vars.extend([
        ("KUBECONFIG".into(), w.cp.kubeconfig().display().to_string()),
        (env::MANAGER_ADDR.into(), w.manager.addr().to_string()),
        (env::MESH.into(), mesh.clone()),
        (env::POD_NAMESPACE.into(), w.ns.clone()),
        (env::POD_NAME.into(), "v1-1".into()),
        (env::RUNTIME_SOCKET.into(), socket.display().to_string()),
        (env::HEALTH_ADDR.into(), "127.0.0.1:0".into()),
        // The same pod's token: a second runtime in the same pod.
        (
            env::TOKEN_FILE.into(),
            w.dir.path().join("v1-1.token").display().to_string(),
        ),
    ]);
    let impostor = Process::spawn_with_env(
        "impostor-sidecar",
        &w.bins.runtime,
        &[],
        &vars,
        w.dir.path(),
        None,
    )?;
    let impostor_op = Process::spawn_with_env(
        "impostor-operator",
        &w.bins.operator,
        &["run".into()],
        &[
            ("KUBECONFIG".into(), w.cp.kubeconfig().display().to_string()),
            (env::RUNTIME_SOCKET.into(), socket.display().to_string()),
        ],
        w.dir.path(),
        None,
    )?;
    let (_, reason, message) = eventually("Degraded naming the contested pod", TIMEOUT, || async {
        impostor.check_running()?;
        Ok(w.condition("Degraded")
            .await?
            .filter(|(s, r, _)| s == "True" && r == "IdentityConflict"))
    })
    .await?;
    assert_eq!(reason, "IdentityConflict");
    assert!(message.contains("v1-1"), "{message}");
    drop((impostor_op, impostor));
    Ok(())
}

#[tokio::test]
async fn a_rolling_replacement_loses_no_update_and_no_key_waits_a_ttl() -> anyhow::Result<()> {
    let mut w = World::new("rolling").await?;
    w.apply_mesh(
        json!({"weights": [{"subset": "v1", "weight": 100}]}),
        &["v1"],
    )
    .await?;
    w.replica("v1-a", "v1").await?;
    w.replica("v1-b", "v1").await?;
    w.all_ready().await?;
    let ns = w.object_namespace("rolling-data", &[]).await?;
    const N: usize = 20;
    w.apps(&ns, N).await?;

    // Objects keep changing through the whole rollout, with reconciles
    // that take a while.
    let writer = {
        let api: Api<DynamicObject> =
            Api::namespaced_with(w.client.clone(), &ns, &generator_resource());
        tokio::spawn(async move {
            for n in 1u64.. {
                let i = n as usize % N;
                let patch =
                    json!({"spec": {"data": {"n": n.to_string()}, "reconcileMs": (n * 37) % 400}});
                let _ = api
                    .patch(
                        &format!("app-{i}"),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // New pods come up, then each old one goes as a Deployment does: the
    // operator is stopped first (SIGTERM), then its sidecar.
    w.replica("v1-c", "v1").await?;
    w.replica("v1-d", "v1").await?;
    w.all_ready().await?;
    let mut stopped = Vec::new();
    for i in 0..2 {
        let r = &w.replicas[i];
        let at = now_us();
        r.operator.signal("TERM").await?;
        let code = r.operator.wait_exit(TIMEOUT).await;
        assert_eq!(code, Some(Some(0)), "{} did not stop cleanly", r.pod);
        r.sidecar.signal("TERM").await?;
        r.sidecar.wait_exit(TIMEOUT).await;
        stopped.push((r.pod.clone(), at));
    }
    writer.abort();
    let _ = writer.await;

    // Every object changes once more; the new pods reconcile each last
    // generation, one owner at a time.
    let (finals, rs) = w.settle_and_check(&ns).await?;
    // No key waited for a lease: each key an old pod had when its operator
    // was told to stop, another pod reconciled within a TTL of that.
    for (pod, at) in &stopped {
        let runtime = format!("{}/{pod}", w.ns);
        let mut moved = 0;
        for (key, _) in &finals {
            let had = rs
                .iter()
                .filter(|r| &r.key == key && r.start_us < *at)
                .max_by_key(|r| r.start_us)
                .is_some_and(|r| r.runtime == runtime);
            if !had {
                continue;
            }
            let next = rs
                .iter()
                .filter(|r| &r.key == key && r.start_us >= *at && r.runtime != runtime)
                .map(|r| r.start_us)
                .min()
                .ok_or_else(|| anyhow::anyhow!("{key} was never reconciled after {pod} stopped"))?;
            let waited = Duration::from_micros((next - at) as u64);
            assert!(
                waited < LEASE_TTL,
                "{key} waited {waited:?} after {pod} stopped"
            );
            moved += 1;
        }
        assert!(moved > 0, "{pod} held no key when it stopped");
    }
    Ok(())
}
