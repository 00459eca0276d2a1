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
    config.validate().map_err(|e| anyhow::anyhow!(e))?;
    // The health port first: if it is taken, nothing is left behind.
    let health = tokio::net::TcpListener::bind(config.health)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on --health {}: {e}; with several runtimes on one host give each \
                 its own port, or OPMESH_HEALTH_ADDR=127.0.0.1:0 for any free one",
                config.health
            )
        })?;
    tracing::info!(addr = %health.local_addr()?, "health, readiness and metrics");
    // Dropped on every way out of main: the socket file goes with it.
    let (socket, _file) = opmesh_runtime::bind_socket(&config)?;
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
