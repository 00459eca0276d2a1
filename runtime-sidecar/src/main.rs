//! The `opmesh-runtime` binary.

use clap::Parser as _;
use opmesh_runtime::Config;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let config = Config::parse();
    let socket = opmesh_runtime::bind_socket(&config)?;
    let health = tokio::net::TcpListener::bind(config.health)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --health {}: {e}", config.health))?;
    opmesh_runtime::run(config, socket, health, shutdown_signal()).await
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
