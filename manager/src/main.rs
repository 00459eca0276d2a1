//! The `opmesh-manager` binary: `run` the manager, or print the `crd`.

use clap::{Parser, Subcommand};
use opmesh_manager::Config;

/// The opmesh manager.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the manager (uses KUBECONFIG or the in-cluster config).
    Run(Box<Config>),
    /// Print the OperatorMesh CRD as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", opmesh_manager::crd::crd_yaml()?);
            Ok(())
        }
        Command::Run(config) => {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach the Kubernetes API ({e}); set KUBECONFIG or run in a cluster"
                )
            })?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --listen {}: {e}", config.listen))?;
            opmesh_manager::run(*config, client, listener, shutdown_signal()).await
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
