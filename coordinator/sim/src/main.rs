//! `fedcart-sim`: the researchers' simulator as a command. A thin clap front
//! end over [`fedcart_sim::run_command`].

use clap::Parser;
use fedcart_sim::SimArgs;
use tracing_subscriber::EnvFilter;

/// Simulate a federation in-process: the real round engine and the real
/// local training with N virtual merchants. Without flags it runs the demo
/// (MovieLens MF and Telco churn, 10 merchants) on the bundled data.
#[derive(Parser)]
#[command(name = "fedcart-sim", version, about)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "FEDCART_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    args: Box<SimArgs>,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    fedcart_sim::run_command(*cli.args)
}
