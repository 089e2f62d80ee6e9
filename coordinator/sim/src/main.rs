//! `fedcart-sim`: the researchers' simulator as a command. A thin clap front
//! end over [`fedcart_sim::run_command`].

use std::io::IsTerminal;

use clap::Parser;
use fedcart_coordinator::cli;
use fedcart_sim::{Format, SimArgs};

/// Simulate a federation in-process: the real round engine and the real
/// local training with N virtual merchants. Without flags it runs the demo
/// (MovieLens MF and Telco churn, 10 merchants) on the bundled data.
///
/// Output: a progress bar on stderr (on a terminal, without -q), then the
/// summary table on stdout, or one JSON document with --format json. Logs go
/// to stderr, warnings only by default (-v: INFO).
#[derive(Parser)]
#[command(
    name = "fedcart-sim",
    version,
    about,
    after_help = cli::LOGGING_HELP,
    allow_negative_numbers = true
)]
struct Cli {
    #[command(flatten)]
    log: cli::LogArgs,
    /// What stdout gets: the summary `table`, or `json` for scripts (`| jq .`).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(flatten)]
    args: Box<SimArgs>,
}

fn main() -> std::process::ExitCode {
    let cli: Cli = fedcart_common::cli::parse();
    // The progress bar replaces the per-round INFO lines: warnings only
    // unless -v.
    cli.log.init("warn");
    let progress = cli.log.quiet == 0 && std::io::stderr().is_terminal();
    match fedcart_sim::run_command(*cli.args, cli.format, progress) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
