//! Chaos over real processes: a `fedcart-coordinator serve` and four
//! `fedcart-client run` agents on 127.0.0.1 with mutual TLS and secure
//! aggregation, while the test SIGKILLs an agent or the coordinator at each
//! secure-aggregation stage (advertise keys, share keys, masked input,
//! unmask) and starts the victim again.
//!
//! Kill points are log lines, not timers: the coordinator runs with JSON
//! logs and `fedcart_coordinator::service::secure=debug`, and logs
//! "secure-aggregation request sent" with the merchant and stage each time it
//! pushes a stage request. When the line the schedule waits for arrives, the
//! victim is killed at once: an agent killed on its `advertise_keys` request
//! dies while training, on `share_keys` before sharing, on `masked_input`
//! before uploading, and on `unmask` after its masked input was accepted; the
//! coordinator killed on any of them loses the attempt in flight.
//!
//! After the run, from the coordinator's store (redb):
//! - every training round committed exactly once, versions 1..=rounds are
//!   contiguous and read back, and every version the coordinator logged as
//!   committed before a kill is still there (nothing committed is lost);
//! - each committed version equals the in-process FedAvg step
//!   (`run_task` + `SumAccumulator` + `FedAvg`, as
//!   `fedcart_common::federation::reference::federate` does it) from its base
//!   version over exactly the agents the round record lists as reported,
//!   within the secure-aggregation quantisation (1e-5);
//! - after every coordinator restart, agents whose processes were never
//!   killed joined the new coordinator by themselves.
//!
//! An agent killed and restarted at once is back in the coordinator's
//! connected list under the same merchant id before its stage closes; the
//! new process has no session for the round and cannot answer. The
//! coordinator ties each agent's part of a secure round to the session its
//! invitation went to (`service::secure::wait_stage`), so the stage closes
//! with the answers it has instead of at its deadline; the last test pins
//! this with 60 s deadlines (the stage after the kill must open within 10 s).
//!
//! Modes. The default (CI) schedule has eight kills: each stage once with an
//! agent as victim and once with the coordinator, in a seeded order, with the
//! agent victims drawn from the seed; it finishes in well under two minutes on
//! two cores. The long mode repeats the eight in fresh seeded orders:
//!
//! ```text
//! CHAOS_ROUNDS=40 CHAOS_SEED=7 cargo test -p fedcart-tests --test chaos -- --nocapture
//! ```
//!
//! `CHAOS_ROUNDS` is the number of kills (the run has two more training
//! rounds than kills) and `CHAOS_SEED` the schedule's seed (default 42). The
//! binaries are taken from the test executable's directory (`target/debug`);
//! `cargo test --workspace` builds them, and the test builds them itself with
//! `cargo build --bins` when they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::federation::strategy::{FedAvg, Strategy};
use fedcart_common::privacy::secagg::stage_name;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::record::Outcome;
use fedcart_coordinator::store::Store;
use fedcart_coordinator::tls::TlsFiles;

/// Agents in the federation (threshold 3 of 4 on the complete graph).
const AGENTS: usize = 4;
/// Dimension of the model-free task's updates.
const DIM: usize = 300;
const SEED: u64 = 42;
/// The secure-aggregation stages, in protocol order.
const STAGES: [&str; 4] = [
    stage_name::ADVERTISE,
    stage_name::SHARE_KEYS,
    stage_name::MASKED_INPUT,
    stage_name::UNMASK,
];

/// The marker line a reader sends when its process's output ends.
const EXITED: &str = "<exited>";

/// Who dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Agent(usize),
    Coordinator,
}

/// One scheduled kill: `victim` dies when the coordinator sends `stage`
/// (to the victim agent, or to anyone when the victim is the coordinator).
#[derive(Debug, Clone, Copy)]
struct Kill {
    victim: Victim,
    stage: &'static str,
}

/// splitmix64 for the schedule.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `kills` kills: blocks of the eight (victim kind × stage) pairs, each block
/// in a seeded order, agent victims drawn from the seed.
fn schedule(kills: usize, seed: u64) -> Vec<Kill> {
    let mut g = Gen(seed);
    let mut out = Vec::new();
    while out.len() < kills {
        let mut block: Vec<Kill> = STAGES
            .iter()
            .flat_map(|&stage| {
                [
                    Kill {
                        victim: Victim::Agent(0),
                        stage,
                    },
                    Kill {
                        victim: Victim::Coordinator,
                        stage,
                    },
                ]
            })
            .collect();
        for i in (1..block.len()).rev() {
            block.swap(i, (g.next() % (i as u64 + 1)) as usize);
        }
        for k in &mut block {
            if k.victim != Victim::Coordinator {
                k.victim = Victim::Agent((g.next() % AGENTS as u64) as usize);
            }
        }
        out.extend(block);
    }
    out.truncate(kills);
    out
}

/// A log line from one process generation.
struct Line {
    /// `coordinator` or `m0`..`m3`.
    who: String,
    /// Which start of that process (0 = first).
    generation: usize,
    /// The parsed JSON log record (Null when the line is not JSON).
    json: serde_json::Value,
    raw: String,
}

impl Line {
    fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or("")
    }
    fn field(&self, name: &str) -> &str {
        self.json["fields"][name].as_str().unwrap_or("")
    }
}

/// A running process and the threads forwarding its output.
struct Proc {
    child: Child,
}

impl Proc {
    fn kill(&mut self) {
        // Child::kill is SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(mut cmd: Command, who: &str, generation: usize, tx: &Sender<Line>) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {who}: {e}"));
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let streams: [Box<dyn std::io::Read + Send>; 2] = [Box::new(out), Box::new(err)];
    for (index, stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        let who = who.to_string();
        std::thread::spawn(move || {
            let lines = BufReader::new(stream).lines().map_while(Result::ok);
            // After the logs (stderr), a marker line tells the test the
            // process ended; stdout's end is not reported, so the marker
            // never overtakes a log line.
            let marker = (index == 1).then(|| EXITED.to_string());
            for raw in lines.chain(marker) {
                let json = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
                let line = Line {
                    who: who.clone(),
                    generation,
                    json,
                    raw,
                };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    Proc { child }
}

/// `target/debug`, where the workspace's binaries sit (built when missing).
fn bin_dir() -> PathBuf {
    fedcart_tests::bin_dir()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn coordinator_toml(
    dir: &Path,
    port: u16,
    rounds: usize,
    files: &TlsFiles,
    (round_timeout_ms, stage_timeout_ms): (u64, u64),
) -> PathBuf {
    let path = dir.join("coordinator.toml");
    let text = format!(
        r#"[serve]
listen = "127.0.0.1:{port}"
store = "{store}"
ping_interval_ms = 500

[serve.tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
access = "{access}"

[run]
run_id = "chaos"
seed = {SEED}
rounds = {rounds}
quorum = 3
round_timeout_ms = {round_timeout_ms}
evaluate = false
strategy = "fedavg"
model = {{ family = "noop", dim = {DIM} }}
sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}
selection = {{ fraction = 1.0, min_agents = 3, max_agents = {AGENTS} }}

[run.secagg]
clip = 1.0
stage_timeout_ms = {stage_timeout_ms}
"#,
        store = dir.join("coordinator.redb").display(),
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        access = files.access.display(),
    );
    std::fs::write(&path, text).expect("coordinator config written");
    path
}

fn agent_toml(dir: &Path, port: u16, k: usize, pki: &CertDir) -> PathBuf {
    let id = format!("m{k}");
    let path = dir.join(format!("{id}.toml"));
    let csv =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv");
    let text = format!(
        r#"coordinator = "https://localhost:{port}"
merchant_id = "{id}"
state_dir = "{state}"

[data]
churn_csv = "{csv}"
holdout = 0.2

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
domain = "localhost"

[backoff]
initial_ms = 50
max_ms = 500
"#,
        state = dir.join(format!("state-{id}")).display(),
        csv = csv.display(),
        ca = pki.ca_cert().display(),
        cert = pki.cert(&id).display(),
        key = pki.key(&id).display(),
    );
    std::fs::write(&path, text).expect("agent config written");
    path
}

/// The federation under test: its processes, their generations and what the
/// logs said.
struct Cluster {
    bins: PathBuf,
    coordinator_config: PathBuf,
    agent_configs: Vec<PathBuf>,
    tx: Sender<Line>,
    coordinator: Option<Proc>,
    coordinator_generation: usize,
    agents: Vec<Proc>,
    agent_generation: Vec<usize>,
    /// The coordinator generation each agent's current process started under.
    agent_started_under: Vec<usize>,
}

impl Cluster {
    fn start_coordinator(&mut self) {
        let mut cmd = Command::new(self.bins.join("fedcart-coordinator"));
        cmd.arg("--log-json")
            .arg("serve")
            .arg("--config")
            .arg(&self.coordinator_config)
            .env(
                "RUST_LOG",
                "info,fedcart_coordinator::service::secure=debug",
            );
        self.coordinator = Some(spawn(
            cmd,
            "coordinator",
            self.coordinator_generation,
            &self.tx,
        ));
    }

    fn start_agent(&mut self, k: usize) {
        let mut cmd = Command::new(self.bins.join("fedcart-client"));
        cmd.arg("--log-json")
            .arg("run")
            .arg("--config")
            .arg(&self.agent_configs[k])
            .env("RUST_LOG", "info");
        let p = spawn(cmd, &format!("m{k}"), self.agent_generation[k], &self.tx);
        if k < self.agents.len() {
            self.agents[k] = p;
        } else {
            self.agents.push(p);
        }
    }

    fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill();
        }
    }

    fn restart_coordinator(&mut self) {
        self.coordinator_generation += 1;
        self.start_coordinator();
    }

    fn kill_agent_and_restart(&mut self, k: usize) {
        self.agents[k].kill();
        self.agent_generation[k] += 1;
        self.agent_started_under[k] = self.coordinator_generation;
        self.start_agent(k);
    }
}

/// A development CA, configurations, and a started coordinator and agents
/// (deadlines in milliseconds); the directory holds the store and state.
fn start_cluster(
    rounds: usize,
    round_timeout_ms: u64,
    stage_timeout_ms: u64,
) -> (tempfile::TempDir, Cluster, Receiver<Line>) {
    let bins = bin_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let pki = CertDir::new(&pki_dir);
    certs::init(&pki, &["localhost".into()]).expect("development CA");
    let files = TlsFiles::in_dir(&pki_dir);
    for k in 0..AGENTS {
        certs::issue(&pki, &format!("m{k}")).expect("agent certificate");
        certs::allow(&files.access, &format!("m{k}")).expect("allowed");
    }
    let port = free_port();
    let (tx, rx): (Sender<Line>, Receiver<Line>) = mpsc::channel();
    let deadlines = (round_timeout_ms, stage_timeout_ms);
    let mut cluster = Cluster {
        bins,
        coordinator_config: coordinator_toml(dir.path(), port, rounds, &files, deadlines),
        agent_configs: (0..AGENTS)
            .map(|k| agent_toml(dir.path(), port, k, &pki))
            .collect(),
        tx,
        coordinator: None,
        coordinator_generation: 0,
        agents: Vec::new(),
        agent_generation: vec![0; AGENTS],
        agent_started_under: vec![0; AGENTS],
    };
    cluster.start_coordinator();
    for k in 0..AGENTS {
        cluster.start_agent(k);
    }
    (dir, cluster, rx)
}

/// The in-process reference for one round: FedAvg from `base` over the
/// updates `run_task` gives each of `reported` for `round`.
fn reference_step(base: &[f32], reported: &[String], round: u64) -> Vec<f32> {
    let model = ModelSpec::Noop { dim: DIM };
    let spec = TaskSpec {
        kind: TaskKind::Train,
        model: model.clone(),
        sgd: Default::default(),
        seed: SEED,
        round,
        standardizer: None,
        dp: None,
        best_version: None,
    };
    let layout = model.layout();
    let mut acc = SumAccumulator::new(base.len(), layout.num_coord_weights);
    for id in reported {
        let mut data = LocalData {
            merchant_id: id.clone(),
            ..Default::default()
        };
        let out = run_task(&spec, base, &mut data).expect("noop task");
        acc.add(&out.update.expect("an update"))
            .expect("update fits");
    }
    let mut fedavg = FedAvg;
    fedavg.apply(base, &acc.mean_delta(&layout))
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn kills_at_every_secure_aggregation_stage_lose_nothing_and_commit_each_round_once() {
    let kills = env_or("CHAOS_ROUNDS", 8) as usize;
    let seed = env_or("CHAOS_SEED", 42);
    let plan = schedule(kills, seed);
    let rounds = kills + 2;
    let (dir, mut cluster, rx) = start_cluster(rounds, 10_000, 5_000);
    // Generous per kill; a CI run takes a fraction of it.
    let deadline = Instant::now() + Duration::from_secs(60 + 15 * kills as u64);

    let mut tail: Vec<String> = Vec::new();
    let mut next = 0;
    let mut done = Vec::new();
    let mut logged_commits = BTreeSet::new();
    // Rounds whose coordinator was killed once the unmask requests were
    // leaving, with the merchants the stored marker names.
    let mut pinned: Vec<(u64, BTreeSet<String>)> = Vec::new();
    // Coordinator generation → merchants that joined it.
    let mut joined: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let started = Instant::now();
    let finished = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break false;
        };
        tail.push(format!("[{}#{}] {}", line.who, line.generation, line.raw));
        if line.who != "coordinator" || line.generation != cluster.coordinator_generation {
            // Agents' lines and a dead coordinator's last lines are kept for
            // the report only (its logged commits still count below).
            if line.who == "coordinator" && line.message() == "version committed" {
                logged_commits.insert(line.json["fields"]["version"].as_u64().unwrap_or(0));
            }
            continue;
        }
        if line.raw == EXITED {
            // The current coordinator ended without being killed: it crashed,
            // or it finished without a "run finished" line we recognise.
            break false;
        }
        match line.message() {
            "version committed" => {
                logged_commits.insert(line.json["fields"]["version"].as_u64().unwrap_or(0));
            }
            "agent joined" => {
                joined
                    .entry(cluster.coordinator_generation)
                    .or_default()
                    .insert(line.field("merchant").to_string());
            }
            // The service's line, or the binary's when it starts finished.
            "run finished" | "run finished; shutting down" => break true,
            "secure-aggregation request sent" if next < plan.len() => {
                let kill = plan[next];
                let stage = line.field("stage");
                let merchant = line.field("merchant");
                let hit = stage == kill.stage
                    && match kill.victim {
                        Victim::Coordinator => true,
                        Victim::Agent(k) => merchant == format!("m{k}"),
                    };
                if hit {
                    let task = line.field("task").to_string();
                    match kill.victim {
                        Victim::Coordinator => {
                            cluster.kill_coordinator();
                            if kill.stage == stage_name::UNMASK {
                                pinned.push(unmask_marker(dir.path(), &task));
                            }
                            cluster.restart_coordinator();
                        }
                        Victim::Agent(k) => cluster.kill_agent_and_restart(k),
                    }
                    eprintln!(
                        "chaos: kill {next}: {:?} at {} of {task} ({:.1} s)",
                        kill.victim,
                        kill.stage,
                        started.elapsed().as_secs_f64()
                    );
                    done.push((kill, task));
                    next += 1;
                }
            }
            _ => {}
        }
    };
    let elapsed = started.elapsed();
    let report = |what: &str| -> String {
        let last = |coordinator: bool, n: usize| -> String {
            let lines: Vec<&String> = tail
                .iter()
                .filter(|l| l.starts_with("[coordinator") == coordinator)
                .collect();
            let from = lines.len().saturating_sub(n);
            lines[from..]
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "{what}\nkills done: {done:?}\nlast coordinator lines:\n{}\nlast agent lines:\n{}",
            last(true, 40),
            last(false, 12)
        )
    };
    assert!(
        finished,
        "{}",
        report(&format!(
            "the coordinator exited by itself, or the run did not finish within {:?}",
            deadline - started
        ))
    );
    assert_eq!(
        next,
        plan.len(),
        "{}",
        report("the run finished before every scheduled kill happened")
    );
    // Everything is committed before "run finished": stop the processes.
    if let Some(mut c) = cluster.coordinator.take() {
        c.kill();
    }
    for a in &mut cluster.agents {
        a.kill();
    }
    eprintln!(
        "chaos: {} kills, {rounds} rounds in {:.1} s; commits logged {logged_commits:?}",
        done.len(),
        elapsed.as_secs_f64()
    );

    // Agent processes that lived through a coordinator restart joined the
    // last coordinator by themselves (nobody restarted them).
    let last = cluster.coordinator_generation;
    for k in 0..AGENTS {
        if cluster.agent_started_under[k] < last {
            let seen = joined.get(&last).cloned().unwrap_or_default();
            assert!(
                seen.contains(&format!("m{k}")),
                "{}",
                report(&format!(
                    "m{k} (started under coordinator #{}) did not reconnect to coordinator #{last}: {seen:?}",
                    cluster.agent_started_under[k]
                ))
            );
        }
    }
    eprintln!("chaos: joins per coordinator start: {joined:?}");

    let store = Store::open(&dir.path().join("coordinator.redb")).expect("store opens");
    let history = store.history().expect("history");
    let trains: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Train)
        .collect();
    let mut committed: BTreeMap<u64, Vec<&_>> = BTreeMap::new();
    for r in trains.iter().filter(|r| r.outcome == Outcome::Committed) {
        committed.entry(r.round).or_default().push(*r);
    }
    for (round, records) in &committed {
        assert_eq!(
            records.len(),
            1,
            "round {round} committed {} times: {records:?}",
            records.len()
        );
    }
    let want: Vec<u64> = (1..=rounds as u64).collect();
    assert_eq!(
        committed.keys().copied().collect::<Vec<_>>(),
        want,
        "committed rounds; history {history:?}"
    );
    assert_eq!(
        store.latest_version().expect("version"),
        Some(rounds as u64)
    );
    for v in &logged_commits {
        assert!(
            *v >= 1 && *v <= rounds as u64,
            "logged commit {v} is not in the store's versions 1..={rounds}"
        );
    }
    let mut worst = 0.0f32;
    for (round, records) in &committed {
        let r = records[0];
        assert_eq!(r.base_version, round - 1, "round {round} base: {r:?}");
        let base = store
            .model(r.base_version)
            .expect("read")
            .unwrap_or_else(|| panic!("version {} reads back", r.base_version));
        let model = store
            .model(*round)
            .expect("read")
            .unwrap_or_else(|| panic!("version {round} reads back"));
        assert!(r.reported.len() >= 3, "round {round}: {r:?}");
        let expected = reference_step(&base, &r.reported, *round);
        let d = model
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            d <= 1e-5,
            "version {round} differs from the reference over {:?} by {d}",
            r.reported
        );
        worst = worst.max(d);
    }
    // A coordinator killed while its unmask requests were leaving may have
    // seen that sum: the round committed over exactly the same merchants
    // (another set would let the two sums' difference show an update).
    for (round, survivors) in &pinned {
        let r = committed[round][0];
        let reported: BTreeSet<String> = r.reported.iter().cloned().collect();
        assert_eq!(
            &reported, survivors,
            "round {round} was being unmasked over {survivors:?} when the coordinator was \
             killed, and committed over {reported:?}"
        );
    }
    let aborted = trains
        .iter()
        .filter(|r| r.outcome == Outcome::Aborted)
        .count();
    eprintln!(
        "chaos: {} train records ({aborted} aborted), every version within {worst:e} of the \
         reference; rounds retried over the merchants of a possibly unmasked sum: {pinned:?}",
        trains.len()
    );
}

/// The round and merchants of the unmask marker the (killed) coordinator
/// stored before its unmask requests for `task` left.
fn unmask_marker(dir: &Path, task: &str) -> (u64, BTreeSet<String>) {
    let store = Store::open(&dir.join("coordinator.redb")).expect("store opens");
    let bytes = store
        .meta("unmasking")
        .expect("meta reads")
        .unwrap_or_else(|| panic!("no unmask marker stored before {task}'s unmask requests"));
    let marker: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON marker");
    assert_eq!(marker["task_id"], task, "marker {marker}");
    let round = marker["round"].as_u64().expect("round");
    let survivors = marker["survivors"]
        .as_array()
        .expect("survivors")
        .iter()
        .map(|m| m.as_str().expect("names").to_string())
        .collect();
    (round, survivors)
}

/// Was flaky, about 1 run in 4: it waited for m1's invitation, but a round
/// starts once `min_agents` (3) of the 4 have joined, and when m1 joined
/// last it was not selected and no invitation for it ever came. The agent
/// killed is now whichever is invited first.
#[test]
fn a_killed_and_restarted_agent_does_not_hold_its_stage_open_until_the_deadline() {
    // Deadlines far longer than a stage needs: the stage after the kill must
    // open because the stage closed with the answers it had, not by timeout.
    let (_dir, mut cluster, rx) = start_cluster(1, 60_000, 30_000);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut killed_at: Option<Instant> = None;
    let mut killed = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("coordinator lines within 120 s");
        if line.who != "coordinator" || line.generation != 0 {
            continue;
        }
        if line.message() != "secure-aggregation request sent" {
            continue;
        }
        match (killed_at, line.field("stage")) {
            (None, stage) if stage == stage_name::ADVERTISE => {
                let merchant = line.field("merchant");
                let k: usize = merchant
                    .strip_prefix('m')
                    .and_then(|k| k.parse().ok())
                    .unwrap_or_else(|| panic!("merchant ids are m<k>, got `{merchant}`"));
                cluster.kill_agent_and_restart(k);
                killed_at = Some(Instant::now());
                killed = merchant.to_string();
            }
            (Some(t), stage) if stage == stage_name::SHARE_KEYS => {
                let waited = t.elapsed();
                assert!(
                    waited < Duration::from_secs(10),
                    "the advertise_keys stage stayed open {waited:?} after {killed} was killed (deadline 60 s)"
                );
                return;
            }
            _ => {}
        }
    }
}
