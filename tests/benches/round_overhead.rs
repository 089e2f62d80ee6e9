//! Release-mode benchmark of the coordinator's round overhead over loopback
//! gRPC: N real agents return a seeded random update of d floats (no
//! training), so what is measured is transport, validation, streaming
//! aggregation and the durable commit.
//!
//! The coordinator runs in a child process so that its peak RSS (VmHWM) is
//! its own. Run: `cargo bench -p fedcart-tests --bench round_overhead`
//! (or with `-- --agents 100 --dim 100000` for one point). `--secagg` runs
//! the same rounds under secure aggregation over gRPC (advertise, share keys,
//! masked input, unmask; complete graph up to 64 agents, SecAgg+ beyond).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::task::ModelSpec;
use fedcart_common::train::LocalData;
use fedcart_coordinator::config::{RunConfig, SecAggSettings, Selection};
use fedcart_coordinator::record::Outcome;

#[derive(Parser)]
struct Args {
    /// Internal: run as the coordinator child process.
    #[arg(long)]
    child: bool,
    /// Number of agents (default: the benchmark grid).
    #[arg(long)]
    agents: Option<usize>,
    /// Update length in floats (default: the benchmark grid).
    #[arg(long)]
    dim: Option<usize>,
    /// Rounds to run; the first is excluded from the mean.
    #[arg(long, default_value_t = 6)]
    rounds: u64,
    /// Run every round under secure aggregation.
    #[arg(long)]
    secagg: bool,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long)]
    bench: bool,
}

fn run_config(agents: usize, dim: usize, rounds: u64, secagg: bool) -> RunConfig {
    RunConfig {
        run_id: format!("bench-{agents}-{dim}"),
        seed: 1,
        rounds,
        model: ModelSpec::Noop { dim },
        sgd: SgdParams::default(),
        selection: Selection {
            fraction: 1.0,
            min_agents: agents,
            max_agents: agents,
            min_available: 0,
        },
        quorum: agents,
        round_timeout_ms: 600_000,
        evaluate: false,
        strategy: Default::default(),
        dp: None,
        secagg: secagg.then_some(SecAggSettings {
            neighbours: None,
            clip: 1.0,
            verify_survivors: false,
            stage_timeout_ms: Some(600_000),
        }),
        max_attempts: fedcart_coordinator::config::DEFAULT_MAX_ATTEMPTS,
        early_stopping: None,
    }
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The coordinator side: serve, print the port, run all rounds, print figures.
async fn child(agents: usize, dim: usize, rounds: u64, secagg: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // Every agent is 127.0.0.1, the plaintext rate-limit key: lift the rate.
    let opts = fedcart_coordinator::server::ServeOptions {
        limits: fedcart_coordinator::limits::Limits::loopback(),
        ..fedcart_coordinator::server::ServeOptions::insecure()
    };
    let running = fedcart_coordinator::server::start_with(
        listener,
        &dir.path().join("bench.redb"),
        run_config(agents, dim, rounds, secagg),
        Duration::from_secs(5),
        opts,
    )
    .await
    .expect("start");
    println!("PORT {}", running.addr.port());
    let shared = running.shared.clone();
    running.wait_finished().await.expect("finish");
    let history = shared.history().expect("history");
    let durations: Vec<f64> = history
        .iter()
        .filter(|r| {
            r.kind == fedcart_common::task::TaskKind::Train && r.outcome == Outcome::Committed
        })
        .skip(1)
        .map(|r| r.duration_ms as f64)
        .collect();
    let mean = durations.iter().sum::<f64>() / durations.len().max(1) as f64;
    println!(
        "RESULT agents={agents} dim={dim} secagg={secagg} ms_per_round={mean:.1} peak_rss_mib={:.0}",
        peak_rss_mib()
    );
}

async fn parent(agents: usize, dim: usize, rounds: u64, secagg: bool) -> String {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--child",
            "--agents",
            &agents.to_string(),
            "--dim",
            &dim.to_string(),
        ])
        .args(["--rounds", &rounds.to_string()])
        .args(secagg.then_some("--secagg"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn coordinator");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port: u16 = loop {
        let line = lines.next().expect("child output").expect("line");
        if let Some(p) = line.strip_prefix("PORT ") {
            break p.parse().expect("port");
        }
    };
    let handles: Vec<_> = (0..agents)
        .map(|k| {
            let data = LocalData {
                merchant_id: format!("m{k:04}"),
                ..Default::default()
            };
            fedcart_tests::spawn_agent(([127, 0, 0, 1], port).into(), data)
        })
        .collect();
    let result = tokio::task::spawn_blocking(move || {
        lines
            .map_while(Result::ok)
            .find(|l| l.starts_with("RESULT"))
            .expect("a result line")
    })
    .await
    .expect("reader");
    child.wait().expect("child exits");
    for h in handles {
        h.stop().await;
    }
    result
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if args.child {
        rt.block_on(child(
            args.agents.unwrap_or(10),
            args.dim.unwrap_or(1000),
            args.rounds,
            args.secagg,
        ));
        return;
    }
    let grid: Vec<(usize, usize)> = match (args.agents, args.dim) {
        (Some(n), Some(d)) => vec![(n, d)],
        _ => vec![
            (10, 100_000),
            (10, 1_000_000),
            (100, 100_000),
            (100, 1_000_000),
        ],
    };
    for (n, d) in grid {
        println!("{}", rt.block_on(parent(n, d, args.rounds, args.secagg)));
    }
}
