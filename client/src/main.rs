//! `fedcart-client`: the merchant agent's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedcart_client::{agent::Agent, config::AgentConfig, data};
use tracing_subscriber::EnvFilter;

/// The fedcart merchant agent: trains on this merchant's data and shares only
/// model updates with the platform's coordinator.
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
    /// Join the coordinator and take part in rounds until interrupted.
    Run {
        /// The agent's TOML configuration (see client/examples/merchant.toml).
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
    },
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
        Command::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            let local =
                data::load(&cfg).with_context(|| format!("merchant `{}`", cfg.merchant_id))?;
            let mut agent = Agent::new(cfg.coordinator.clone(), local);
            agent.backoff = cfg.backoff.clone();
            match &cfg.tls {
                Some(t) => agent.tls = Some(t.client_config()?),
                None => tracing::warn!("no `tls` section: connecting in plaintext"),
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = tx.send(true);
            });
            agent.run(rx).await
        }
    }
}
