//! `fedcart-coordinator`: the platform operator's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedcart_coordinator::config::CoordinatorConfig;
use tracing_subscriber::EnvFilter;

/// The fedcart coordinator: orchestrates federated training rounds across
/// merchants and keeps every model version and round on disk.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "FEDCART_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a federated run over gRPC until it finishes or is interrupted.
    Serve {
        /// The coordinator's TOML configuration (see coordinator/examples/coordinator.toml).
        #[arg(long, env = "FEDCART_COORDINATOR_CONFIG")]
        config: PathBuf,
        /// Override `serve.listen` (env FEDCART_LISTEN).
        #[arg(long, env = "FEDCART_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Override `serve.store` (env FEDCART_STORE).
        #[arg(long, env = "FEDCART_STORE")]
        store: Option<PathBuf>,
    },
    /// Simulate a federation in-process: the real round engine and the real
    /// local training with N virtual merchants. Without flags it runs the demo
    /// (MovieLens MF and Telco churn, 10 merchants) on the bundled data.
    Simulate(fedcart_coordinator::simulate::SimArgs),
}

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    match cli.command {
        Command::Serve {
            config,
            listen,
            store,
        } => {
            let mut cfg = CoordinatorConfig::load(&config)?;
            if let Some(l) = listen {
                cfg.serve.listen = l;
            }
            if let Some(s) = store {
                cfg.serve.store = s;
            }
            let running = fedcart_coordinator::server::start_from_config(&cfg)
                .await
                .with_context(|| format!("starting from {}", config.display()))?;
            tracing::info!(addr = %running.addr, "coordinator listening");
            let mut progress = running.progress.clone();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
                _ = progress.wait_for(|p| p.finished) => tracing::info!("run finished; shutting down"),
            }
            running.shutdown().await
        }
        Command::Simulate(args) => fedcart_coordinator::simulate::main(args),
    }
}
