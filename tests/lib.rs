//! Shared harness for the end-to-end tests: real coordinators on loopback
//! TCP, real agents, and a raw gRPC client for sending bad input on purpose.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedcart_client::agent::Agent;
use fedcart_client::config::{AgentConfig, Backoff, DataConfig};
use fedcart_common::data::split;
use fedcart_common::data::tabular::{Schema, TabularDataset};
use fedcart_common::model::lr::SgdParams;
use fedcart_common::task::{ModelSpec, TaskKind};
use fedcart_common::train::LocalData;
use fedcart_coordinator::config::{RunConfig, Selection};
use fedcart_coordinator::record::{Outcome, RoundRecord};
use fedcart_coordinator::server::{self, Running};
use fedcart_coordinator::service::Shared;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Sends logs to the test's captured output (`RUST_LOG` filters them).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The bundled Telco churn CSV.
pub fn telco_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/telco-churn/Telco-Customer-Churn.csv")
}

/// Telco churn cut into a global held-out set and `n` merchant files.
pub struct TelcoSplit {
    /// Held-out rows for judging the global model.
    pub holdout: TabularDataset,
    /// One CSV file per merchant, in a temporary directory.
    pub files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

/// Holds out 20 % of Telco (stratified) and deals the rest iid into `n` files.
pub fn telco_split(n: usize, seed: u64) -> TelcoSplit {
    let schema = Schema::telco();
    let ds = schema.load_csv(&telco_csv()).expect("bundled Telco loads");
    let (rest, holdout) =
        split::stratified_train_test(ds.y.as_slice().expect("contiguous"), 0.2, seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = split::iid_partition(&rest, n, seed)
        .into_iter()
        .enumerate()
        .map(|(k, rows)| {
            let path = dir.path().join(format!("merchant-{k}.csv"));
            split::write_csv_rows(&telco_csv(), &rows, &path).expect("partition written");
            path
        })
        .collect();
    TelcoSplit {
        holdout: ds.select(&holdout),
        files,
        _dir: dir,
    }
}

/// The agent configuration for merchant `id` holding `file`.
pub fn agent_config(id: &str, addr: std::net::SocketAddr, file: &Path) -> AgentConfig {
    AgentConfig {
        coordinator: format!("http://{addr}"),
        merchant_id: id.into(),
        state_dir: None,
        data: DataConfig {
            churn_csv: Some(file.into()),
            schema: None,
            holdout: 0.2,
            split_seed: 7,
            ratings_csv: None,
            catalogue: None,
            hash_items: true,
            item_names: None,
            delimiter: Default::default(),
            orders_csv: None,
            orders: None,
            churn: Default::default(),
            on_bad_row: Default::default(),
        },
        backoff: Backoff {
            initial_ms: 20,
            max_ms: 500,
        },
        tls: None,
        privacy: Default::default(),
        transfer: Default::default(),
        personalise: None,
    }
}

/// Stores of the bundled grocery log (`data/grocery/orders.csv`), each
/// written to `dir` as its own orders export `orders-m<k>.csv` (header
/// included), in the order given.
pub fn store_exports(dir: &Path, stores: &[&str]) -> Vec<PathBuf> {
    let log = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/grocery/orders.csv");
    let text = std::fs::read_to_string(log).expect("the bundled grocery log");
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    let mut parts = vec![format!("{header}\n"); stores.len()];
    for l in lines {
        let store = l.rsplit(',').next().unwrap_or("");
        if let Some(k) = stores.iter().position(|s| *s == store) {
            parts[k].push_str(l);
            parts[k].push('\n');
        }
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(k, text)| {
            let p = dir.join(format!("orders-m{k}.csv"));
            std::fs::write(&p, text).expect("export written");
            p
        })
        .collect()
}

/// The agent configuration of merchant `id` whose one data source is the
/// grocery-format orders export `export` (no catalogue: hashed item ids),
/// without key binding (plaintext tests).
pub fn orders_agent_config(id: &str, addr: std::net::SocketAddr, export: &Path) -> AgentConfig {
    let mut cfg = agent_config(id, addr, export);
    cfg.data.churn_csv = None;
    cfg.data.orders_csv = Some(export.into());
    cfg.data.orders = Some(fedcart_common::data::orders::OrdersMapping {
        customer: "customer".into(),
        item: Some("item".into()),
        timestamp: "timestamp".into(),
        timestamp_format: Default::default(),
        quantity: Some("quantity".into()),
        amount: "amount".into(),
        amount_is: Default::default(),
        rating: None,
        merchant: None,
        delimiter: Default::default(),
        decimal: Default::default(),
    });
    cfg.privacy = fedcart_client::policy::PrivacyPolicy::without_key_binding();
    cfg
}

/// Moves every tenth training rating of each MF merchant into its
/// validation slice, as the agent's data loader carves one out.
pub fn validate_every_tenth_rating(merchants: &mut [LocalData]) {
    for m in merchants {
        let mf = m.mf.as_mut().expect("MF data");
        let (train, valid): (Vec<_>, Vec<_>) = std::mem::take(&mut mf.train)
            .into_iter()
            .enumerate()
            .partition(|(j, _)| j % 10 != 9);
        mf.train = train.into_iter().map(|(_, r)| r).collect();
        mf.valid = valid.into_iter().map(|(_, r)| r).collect();
    }
}

/// Loads a merchant's data exactly as the agent binary does.
pub fn load_merchant(id: &str, file: &Path) -> LocalData {
    let cfg = agent_config(id, "127.0.0.1:1".parse().expect("addr"), file);
    fedcart_client::data::load(&cfg).expect("merchant data loads")
}

/// A churn LR run over `merchants` agents.
pub fn churn_run(run_id: &str, rounds: u64, merchants: usize, quorum: usize) -> RunConfig {
    RunConfig {
        run_id: run_id.into(),
        seed: 42,
        rounds,
        model: ModelSpec::churn_lr(Schema::telco().num_features()),
        sgd: SgdParams {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            ..Default::default()
        },
        selection: Selection {
            fraction: 1.0,
            min_agents: merchants,
            max_agents: merchants,
            min_available: 0,
        },
        quorum,
        round_timeout_ms: 60_000,
        evaluate: true,
        strategy: Default::default(),
        secagg: None,
        dp: None,
        max_attempts: fedcart_coordinator::config::DEFAULT_MAX_ATTEMPTS,
        early_stopping: None,
    }
}

/// Starts a coordinator on `127.0.0.1:port` (0 = any free port).
pub async fn start_coordinator(store: &Path, run: RunConfig, port: u16) -> Running {
    init_logs();
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind loopback");
    server::start(listener, store, run, Duration::from_millis(500))
        .await
        .expect("coordinator starts")
}

/// A finished federation: the coordinator's state (history, models) and
/// the temporary directory its store lives in.
pub struct Federated {
    /// The coordinator's shared state, after the run finished.
    pub shared: std::sync::Arc<fedcart_coordinator::service::Shared>,
    /// Keeps the store's directory alive as long as `shared` is read.
    pub dir: tempfile::TempDir,
}

/// Runs `run` to the end over loopback gRPC with one real agent per Telco
/// merchant file (`merchant-0`, `merchant-1`, …), then stops the agents.
pub async fn federate_files(files: &[PathBuf], run: RunConfig) -> Federated {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let agents: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(k, f)| spawn_agent(coord.addr, load_merchant(&format!("merchant-{k}"), f)))
        .collect();
    let shared = coord.shared.clone();
    coord.wait_finished().await.expect("run finishes");
    for a in agents {
        a.stop().await;
    }
    Federated { shared, dir }
}

/// A running in-process agent.
pub struct AgentHandle {
    /// Set to true to stop the agent.
    pub stop: watch::Sender<bool>,
    /// The agent task; yields the agent back when it stops.
    pub task: tokio::task::JoinHandle<Agent>,
}

/// Spawns a real plaintext agent for `data` talking to `addr`. It has no
/// certificate, so its policy explicitly takes secure rounds without key
/// binding (`PrivacyPolicy::without_key_binding`); the mTLS tests build
/// their agents with `Agent::with_key_identity`.
pub fn spawn_agent(addr: std::net::SocketAddr, data: LocalData) -> AgentHandle {
    let (stop, rx) = watch::channel(false);
    let mut agent = Agent::new(format!("http://{addr}"), data)
        .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding());
    agent.backoff = Backoff {
        initial_ms: 20,
        max_ms: 500,
    };
    let task = tokio::spawn(async move {
        agent.run(rx).await.expect("agent runs");
        agent
    });
    AgentHandle { stop, task }
}

/// Spawns an already configured agent (TLS, backoff).
pub fn spawn_configured(mut agent: Agent) -> AgentHandle {
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        agent.run(rx).await.expect("agent runs");
        agent
    });
    AgentHandle { stop, task }
}

impl AgentHandle {
    /// Stops the agent and returns it.
    pub async fn stop(self) -> Agent {
        let _ = self.stop.send(true);
        self.task.await.expect("agent task")
    }
}

pub mod raw;

/// `target/<profile>`, where the workspace's binaries sit next to `deps/`,
/// for tests that run the real `fedcart-coordinator` and `fedcart-client`
/// processes. The first call in a test process brings them up to date with
/// the sources (`cargo build --workspace --bins`, the command `.ci/run`
/// builds them with, so it does nothing there): a test must never drive a
/// binary built before the change it tests.
pub fn bin_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_bins).clone()
}

fn build_bins() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--workspace", "--bins"]);
    // What cargo sets for this test process (the package's name, its
    // manifest, …) is not the shell's: build scripts that ask to rerun when
    // such a variable changes (ring's) would rebuild half the tree.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "CARGO_TARGET_TMPDIR"
            || key == "CARGO_RUSTC_CURRENT_DIR"
        {
            build.env_remove(key.as_ref());
        }
    }
    if dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo build");
    assert!(status.success(), "building the binaries failed");
    dir
}

/// Runs `fedcart-client` with `args` to its end, which must be a success;
/// returns what it printed.
pub fn run_client(args: &[&str]) -> String {
    let out = std::process::Command::new(bin_dir().join("fedcart-client"))
        .args(args)
        .output()
        .expect("fedcart-client starts");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real binary running as a child process, its stderr (where the
/// binaries log) read line by line on a thread.
pub struct Process {
    /// The child.
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line read so far.
    pub seen: Vec<String>,
}

impl Process {
    /// Starts `bin` (a name in [`bin_dir`]) with `args`, logging at INFO in
    /// plain text to a pipe.
    pub fn start(bin: &str, args: &[&str]) -> Self {
        Self::start_with_env(bin, args, &[])
    }

    /// [`Process::start`] with `env` set in the child's environment.
    pub fn start_with_env(bin: &str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut child = std::process::Command::new(bin_dir().join(bin))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env_remove("FEDCART_LOG_JSON")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads stderr until a line contains `needle`; panics after `limit` or
    /// when the process ends first.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stderr line with `{needle}` within {limit:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM, as Docker, Kubernetes and systemd stop a service.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the exit (within `limit`, a guard
    /// against a hang), which must be clean (status 0); returns everything
    /// the process wrote to stderr.
    pub fn stop_cleanly(&mut self, limit: Duration) -> String {
        self.terminate();
        let code = self.wait_exit(limit);
        let said = self.seen.join("\n");
        assert_eq!(code, Some(0), "exit status after SIGTERM; stderr:\n{said}");
        said
    }

    /// Waits for the process to exit (killing it after `limit`, a guard
    /// against a hang, not a timing assertion) and reads the rest of its
    /// stderr. Returns the exit code (None when killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        // The reader thread ends when the process closes stderr, i.e. exits.
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "still running after {limit:?}; stderr:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
        self.child.wait().expect("wait").code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `coord`'s run has finished, stops `agents`, and returns the
/// service's shared state (for models) with the run's history.
pub async fn finish(
    coord: Running,
    agents: Vec<AgentHandle>,
) -> (std::sync::Arc<Shared>, Vec<RoundRecord>) {
    let shared = coord.shared.clone();
    coord.wait_finished().await.expect("the run finishes");
    for h in agents {
        h.stop().await;
    }
    let history = shared.history().expect("history readable");
    (shared, history)
}

/// The training records of `history`, each asserted committed with a
/// result from every one of `merchants`.
pub fn committed_trains(history: &[RoundRecord], merchants: usize) -> Vec<&RoundRecord> {
    let trains: Vec<&RoundRecord> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Train)
        .collect();
    for r in &trains {
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        assert_eq!(r.reported.len(), merchants, "{r:?}");
    }
    trains
}
