//! Shared harness for the end-to-end tests: real coordinators on loopback
//! TCP, real agents, and a raw gRPC client for sending bad input on purpose.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedcart_client::agent::Agent;
use fedcart_client::config::{AgentConfig, Backoff, DataConfig};
use fedcart_common::data::split;
use fedcart_common::data::tabular::{Schema, TabularDataset};
use fedcart_common::model::lr::SgdParams;
use fedcart_common::task::ModelSpec;
use fedcart_common::train::LocalData;
use fedcart_coordinator::config::{RunConfig, Selection};
use fedcart_coordinator::server::{self, Running};
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
        },
        backoff: Backoff {
            initial_ms: 20,
            max_ms: 500,
        },
        tls: None,
        privacy: Default::default(),
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
        model: ModelSpec::ChurnLr {
            num_features: Schema::telco().num_features(),
        },
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

/// Spawns a real agent for `data` talking to `addr`.
pub fn spawn_agent(addr: std::net::SocketAddr, data: LocalData) -> AgentHandle {
    let (stop, rx) = watch::channel(false);
    let mut agent = Agent::new(format!("http://{addr}"), data);
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
