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
//! `--tls` serves mutual TLS: every agent has its own certificate from a
//! fresh development CA (`certs init` / `certs issue`), is on the allow-list,
//! and binds its secure-aggregation keys to its certificate. The agents are
//! one fleet (`fedcart_client::fleet`, the code of `fedcart-client fleet`).
//! Besides the mean wall time per round, the result line gives the CPU time
//! per round of the coordinator and of the agents' process (from the first
//! commit to the end), which other jobs on the machine do not inflate.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use fedcart_client::fleet::{self, FleetArgs, FleetData};
use fedcart_common::data::partition::Partitioner;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::task::ModelSpec;
use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::config::{RunConfig, SecAggSettings, Selection};
use fedcart_coordinator::identity::AccessList;
use fedcart_coordinator::record::Outcome;
use fedcart_coordinator::tls::{TlsFiles, Transport};

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
    /// Mutual TLS with one certificate per agent (the production transport).
    #[arg(long)]
    tls: bool,
    /// Internal: the certificate directory the parent made (with `--tls`).
    #[arg(long)]
    pki: Option<std::path::PathBuf>,
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

/// User + system CPU milliseconds of process `pid` (`self` for this one),
/// from `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu_ms(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 10.0
}

/// The coordinator side: serve, print the port, run all rounds, print figures.
async fn child(agents: usize, dim: usize, rounds: u64, secagg: bool, pki: Option<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_given = pki.is_some();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // Every agent is 127.0.0.1, the plaintext rate-limit key: lift the rate.
    // With TLS each agent has its own identity and the default limits apply.
    let opts = match pki {
        Some(pki) => fedcart_coordinator::server::ServeOptions {
            transport: Transport::Tls(TlsFiles::in_dir(pki)),
            ..fedcart_coordinator::server::ServeOptions::insecure()
        },
        None => fedcart_coordinator::server::ServeOptions {
            limits: fedcart_coordinator::limits::Limits::loopback(),
            ..fedcart_coordinator::server::ServeOptions::insecure()
        },
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
    let tls = pki_given;
    let shared = running.shared.clone();
    // CPU of both processes from the first commit to the end: rounds 2.. as
    // the wall-clock mean, and unlike it not inflated by other jobs' load.
    let mut progress = shared.progress();
    let first_commit = tokio::spawn(async move {
        let _ = progress.wait_for(|p| p.version >= 1).await;
        (
            cpu_ms("self"),
            cpu_ms(&std::os::unix::process::parent_id().to_string()),
        )
    });
    running.wait_finished().await.expect("finish");
    let (coord_end, agents_end) = (
        cpu_ms("self"),
        cpu_ms(&std::os::unix::process::parent_id().to_string()),
    );
    let (coord_start, agents_start) = first_commit.await.expect("first commit");
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
    let per_round = |a: f64, b: f64| (b - a) / durations.len().max(1) as f64;
    println!(
        "RESULT agents={agents} dim={dim} secagg={secagg} tls={} ms_per_round={mean:.1} \
         coordinator_cpu_ms_per_round={:.0} agents_cpu_ms_per_round={:.0} peak_rss_mib={:.0}",
        tls,
        per_round(coord_start, coord_end),
        per_round(agents_start, agents_end),
        peak_rss_mib()
    );
}

/// The merchant id of agent `k`, as the fleet names it.
fn merchant(k: usize) -> String {
    format!("m{k}")
}

/// A development CA with one certificate per agent, all on the allow-list.
fn make_pki(agents: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let cd = CertDir::new(dir.path());
    certs::init(&cd, &["localhost".into()]).expect("certs init");
    let mut access = AccessList::default();
    for k in 0..agents {
        certs::issue_kind(&cd, &merchant(k), certs::Kind::Merchant, false).expect("certs issue");
        access.allow.push(merchant(k));
    }
    std::fs::write(TlsFiles::in_dir(dir.path()).access, access.to_toml()).expect("access list");
    dir
}

async fn parent(agents: usize, dim: usize, rounds: u64, secagg: bool, tls: bool) -> String {
    let pki = tls.then(|| make_pki(agents));
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
        .args(
            pki.iter()
                .flat_map(|d| ["--pki".into(), d.path().as_os_str().to_owned()]),
        )
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
    // The agents are a fleet (`fedcart-client fleet`'s code): one real
    // session per merchant, each with its own certificate and connection.
    let args = FleetArgs {
        coordinator: match pki {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        },
        merchants: agents,
        first: 0,
        job_index: None,
        total: None,
        prefix: "m".into(),
        data: FleetData::None,
        partition: Partitioner::Iid,
        seed: 1,
        holdout: 0.2,
        certs: pki.as_ref().map(|d| d.path().to_owned()),
        domain: None,
        exit_when_run_ends: true,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sessions = tokio::spawn(fleet::run(fleet::agents(&args).expect("fleet"), stopped));
    let result = tokio::task::spawn_blocking(move || {
        lines
            .map_while(Result::ok)
            .find(|l| l.starts_with("RESULT"))
            .expect("a result line")
    })
    .await
    .expect("reader");
    child.wait().expect("child exits");
    let _ = stop.send(true);
    sessions
        .await
        .expect("fleet task")
        .expect("every session ends cleanly");
    result
}

fn main() {
    let args = Args::parse();
    // As `fedcart-coordinator` and `fedcart-client` do at start (this binary
    // stands in for both).
    fedcart_common::malloc::tune_for_transfers();
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
            args.pki,
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
        println!(
            "{}",
            rt.block_on(parent(n, d, args.rounds, args.secagg, args.tls))
        );
    }
}
