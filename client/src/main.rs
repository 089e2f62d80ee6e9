//! `fedcart-client`: the merchant agent's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedcart_client::state::StateDir;
use fedcart_client::{agent::Agent, config::AgentConfig, data, recommend};
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
    /// Derive features, churn labels and interactions from an orders export,
    /// and write them (with a summary) for inspection.
    Prepare(Box<fedcart_client::prepare::PrepareArgs>),
    /// Top-K items for one customer, offline from the local state.
    Recommend {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Customer id (as in the ratings file).
        #[arg(long)]
        customer: String,
        /// How many items.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Also recommend items the customer already bought.
        #[arg(long)]
        include_repeats: bool,
        /// Repeat-aware list: blend the customer's own frequent items into
        /// the model's ranking with this weight in [0, 1] (implies repeats).
        #[arg(long)]
        repeat_weight: Option<f32>,
    },
    /// Churn probability per customer as CSV, offline from the local state.
    Score {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Output CSV.
        #[arg(long, default_value = "churn_scores.csv")]
        out: PathBuf,
    },
    /// The federation's customer segment of each customer as CSV
    /// (`customer,segment`), offline from the local state.
    Segments {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Output CSV.
        #[arg(long, default_value = "segments.csv")]
        out: PathBuf,
    },
}

fn state_of(cfg: &AgentConfig) -> anyhow::Result<StateDir> {
    let dir = cfg
        .state_dir
        .as_ref()
        .context("`state_dir` is not configured: the agent keeps no local state")?;
    StateDir::open(dir).with_context(|| format!("opening the state directory {}", dir.display()))
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
            let mut agent =
                Agent::new(cfg.coordinator.clone(), local).with_policy(cfg.privacy.clone());
            if cfg.state_dir.is_some() {
                agent = agent
                    .with_state(state_of(&cfg)?)
                    .context("restoring the private user factors")?;
            }
            agent.backoff = cfg.backoff.clone();
            match &cfg.tls {
                Some(t) => {
                    agent.tls =
                        Some(t.client_config().with_context(|| {
                            format!("the `tls` section of {}", config.display())
                        })?)
                }
                None => tracing::warn!("no `tls` section: connecting in plaintext"),
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = tx.send(true);
            });
            agent
                .run(rx)
                .await
                .with_context(|| format!("agent of coordinator {}", cfg.coordinator))
        }
        Command::Prepare(args) => fedcart_client::prepare::run(&args)
            .with_context(|| format!("preparing {}", args.orders.display())),
        Command::Recommend {
            config,
            customer,
            k,
            include_repeats,
            repeat_weight,
        } => {
            let cfg = AgentConfig::load(&config)?;
            let ratings = cfg
                .data
                .ratings_csv
                .as_ref()
                .context("`data.ratings_csv` is not configured")?;
            let mf = data::load_mf(ratings, &cfg)?;
            let cat = data::catalogue(cfg.data.catalogue.as_ref().expect("checked by load_mf"))?;
            if let Some(w) = repeat_weight
                && !(0.0..=1.0).contains(&w)
            {
                anyhow::bail!("--repeat-weight must be in [0, 1], got {w}");
            }
            let opts = recommend::RecommendOptions {
                k,
                include_repeats,
                repeat_weight,
            };
            let recs = recommend::recommend_with(&state_of(&cfg)?, &mf, &cat, &customer, &opts)
                .with_context(|| format!("recommending for customer `{customer}`"))?;
            for r in recs {
                println!("{}\t{:.4}", r.item, r.score);
            }
            Ok(())
        }
        Command::Score { config, out } => {
            let cfg = AgentConfig::load(&config)?;
            let (csv, schema) = customer_table(&cfg)?;
            let n = recommend::score(&state_of(&cfg)?, &csv, &schema, &out)
                .with_context(|| format!("scoring {}", csv.display()))?;
            println!("wrote {n} churn scores to {}", out.display());
            Ok(())
        }
        Command::Segments { config, out } => {
            let cfg = AgentConfig::load(&config)?;
            let (csv, schema) = customer_table(&cfg)?;
            let n = fedcart_client::segments::segments(&state_of(&cfg)?, &csv, &schema, &out)
                .with_context(|| format!("labelling {}", csv.display()))?;
            println!("wrote {n} customer segments to {}", out.display());
            Ok(())
        }
    }
}

/// The merchant's customer table and its schema (Telco's when none is
/// configured), as `score` and `segments` read it.
fn customer_table(
    cfg: &AgentConfig,
) -> anyhow::Result<(std::path::PathBuf, fedcart_common::data::tabular::Schema)> {
    let csv = cfg
        .data
        .churn_csv
        .clone()
        .context("`data.churn_csv` is not configured")?;
    let schema = cfg
        .data
        .schema
        .clone()
        .unwrap_or_else(fedcart_common::data::tabular::Schema::telco);
    Ok((csv, schema))
}
