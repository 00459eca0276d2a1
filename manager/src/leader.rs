//! Leader election through a Kubernetes Lease, with kube-lease-manager.

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::{config::Config, task::Task};

/// Starts competing for the Lease named in `config`; `leading` follows
/// whether this manager holds it. Dropping the returned task stops
/// competing.
pub(crate) async fn elect(
    client: Client,
    config: &Config,
    leading: watch::Sender<bool>,
) -> anyhow::Result<Task> {
    let identity = if config.identity.is_empty() {
        format!("opmesh-manager-{}", std::process::id())
    } else {
        config.identity.clone()
    };
    // Renew a third of the way before expiry, at least a second.
    let grace = (config.leader_lease_seconds / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(&identity)
        .with_duration(config.leader_lease_seconds)
        .with_grace(grace)
        .build()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot use Lease {}/{} for --leader-election: {e}",
                config.lease_namespace,
                config.lease_name
            )
        })?;
    let (mut state, task) = manager.watch().await;
    tracing::info!(identity = %identity, lease = %config.lease_name, "competing for the lead");
    Ok(Task::spawn(async move {
        loop {
            let now = *state.borrow_and_update();
            if leading.send_replace(now) != now {
                tracing::info!(leading = now, "leadership changed");
            }
            if state.changed().await.is_err() {
                tracing::error!("leader election stopped");
                leading.send_replace(false);
                break;
            }
        }
        drop(state);
        let _ = task.await;
    }))
}
