//! The merchant agent's session loop: join, receive pushed tasks, download
//! the global model, train locally, upload the update.
//!
//! Lifecycle ([`Agent::run`]): a permanent error (see
//! [`AgentError::is_permanent`]) ends it with that error; a transient one
//! (coordinator unreachable or restarting) is logged once as a warning and
//! retried quietly with capped exponential backoff and jitter. One session
//! serves every run the coordinator hosts whose model the merchant's data
//! serves (each task names its run). When the coordinator announces that a
//! run has ended, the agent logs it once and stays connected for the other
//! runs and the next ones; when the coordinator then goes away it
//! reconnects quietly. Each finished task is one INFO line with its local
//! metrics.

mod error;
mod personal;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fedcart_common::task::TaskSpec;
use fedcart_common::train::{LocalData, TrainError, run_task};
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

/// The largest HTTP/2 DATA frame the agent accepts (its SETTINGS_MAX_FRAME_SIZE),
/// as the coordinator's `server::MAX_FRAME_BYTES`: a model download comes in
/// 256 KiB frames instead of HTTP/2's default 16 KiB, 16× fewer writes on the
/// coordinator's side and fewer wake-ups on the agent's.
///
/// It must stay below 0x15_03_00 bytes: an agent that speaks plaintext
/// HTTP/2 to a TLS port reads the server's TLS alert (`15 03 0x …`) as a
/// frame header of that length, and only a frame too large to accept tells
/// it to use https:// (`error::transport_fix`).
pub const MAX_FRAME_BYTES: u32 = 256 << 10;
const _: () = assert!(
    MAX_FRAME_BYTES >= 16 << 10 && MAX_FRAME_BYTES < 0x15_03_00,
    "HTTP/2's range, and a TLS alert read as a frame header must be too large"
);

pub use error::{AgentError, Chain, state_fix};

use crate::config::Backoff;
use crate::state::StateError;
use crate::transfer::{RowDownload, download_rows, upload_as};
use fedcart_common::federation::sparse::RowPrecision;

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Our own shutdown signal fired.
    Shutdown,
    /// A run this agent worked for ended and it exits with it
    /// ([`Agent::exit_on_run_end`]).
    RunEnded,
}

/// The agent: local data plus how to reach the coordinator.
pub struct Agent {
    /// Coordinator URL.
    pub coordinator: String,
    /// The merchant's local data and private state.
    pub data: LocalData,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// Counts of completed tasks, for logs and tests.
    pub tasks_done: u64,
    /// Sessions opened (welcomes received), for logs and tests.
    pub sessions: u64,
    /// Mutual TLS; `None` speaks plaintext (only to an `--insecure` coordinator).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Durable local state; `None` keeps everything in memory.
    pub state: Option<crate::state::StateDir>,
    /// Told about every pushed task before the agent works on it; `None` (the
    /// default, and every production agent) accepts every task. See
    /// [`TaskObserver`].
    pub observer: Option<Arc<dyn TaskObserver>>,
    /// Return from [`Agent::run`] once the coordinator announces the end of
    /// its run instead of idling until the next one (`fleet
    /// --exit-when-run-ends`, batch jobs); `false` for `run`.
    pub exit_on_run_end: bool,
    /// The update of a secure task, held until its masked input is asked for.
    secure: crate::secure::SecureTasks,
    /// What the lifecycle has logged (outages, runs joined and ended).
    lifecycle: Lifecycle,
    /// Precision this merchant asks for downloaded factor rows
    /// (`transfer.download_precision`); exact by default.
    pub download_precision: RowPrecision,
    /// Row-sparse transfers of row-structured models (`transfer.rows`, on by
    /// default): touched rows up, changed rows down.
    pub row_transfers: bool,
    /// The last model of a row-structured run (matrix factorisation) this
    /// agent downloaded: later downloads fetch only the rows changed since.
    held: Option<HeldModel>,
    /// The data files read at start, with their length and modification
    /// time then ([`Agent::from_config`]): the agent reads them once.
    sources: Vec<(std::path::PathBuf, Option<FileStamp>)>,
    /// The recommender's interactions when item ids are hashed into the
    /// run's rows: re-mapped when a task's model has another row count.
    interactions: Option<crate::data::Interactions>,
    /// The row count `data.mf` is mapped into (hashed item ids).
    mf_rows: usize,
    /// The run whose private user factors `data.mf.state` holds (`None`:
    /// not known yet; the first MF run to ask takes them).
    users_of: Option<String>,
    /// The user factors of the other MF runs this agent takes part in: each
    /// run trains its own user side, as if it were the merchant's only run.
    parked_users: HashMap<String, fedcart_common::model::mf::UserState>,
    /// Personalisation of the recommender when its run ends
    /// (`[personalise]`); needs a state directory. `None`: off.
    pub personalise: Option<crate::config::PersonaliseConfig>,
    /// The state directory's lock, held for the agent's life
    /// ([`StateDir::lock_for_agent`](crate::state::StateDir::lock_for_agent)).
    state_lock: Option<std::fs::File>,
}

/// Why [`Agent::from_config`] could not build the agent.
#[derive(Debug, thiserror::Error)]
pub enum FromConfigError {
    /// The merchant's data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The state directory could not be opened or read.
    #[error(transparent)]
    State(#[from] StateError),
    /// `privacy.max_epsilon` without a state directory to keep its ledger in.
    #[error(
        "`privacy.max_epsilon` needs `state_dir`: the agent keeps its privacy ledger there, \
         across restarts and runs"
    )]
    BudgetWithoutState,
}

impl FromConfigError {
    /// What to do about a damaged or unwritable state directory, as
    /// [`AgentError::what_to_fix`] says it once the agent runs (a start on
    /// a truncated user-factor file named only the parser's position).
    pub fn what_to_fix(&self) -> Option<String> {
        match self {
            Self::State(e) => Some(error::state_fix(e)),
            _ => None,
        }
    }
}

/// A file's length and modification time, to tell that it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// A downloaded model version, kept for row-sparse downloads.
struct HeldModel {
    run_id: String,
    version: u64,
    /// The digest its task named (`TaskAssignment.model_digest`): a version
    /// of the same number from another history of the run has another.
    digest: Vec<u8>,
    model: Vec<f32>,
}

/// What an agent does with a pushed task, as a [`TaskObserver`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskDecision {
    /// Work on the task as usual.
    Accept,
    /// Leave the task unanswered the way a merchant whose machine went away
    /// does: the session ends and the agent reconnects with backoff, so the
    /// coordinator counts it as a dropout.
    Abandon,
}

/// A seam for embedders of the agent (tests, fleet tools, the simulator's
/// gRPC transport): watches each pushed task and may make the agent abandon
/// it, e.g. to inject dropouts reproducibly.
pub trait TaskObserver: Send + Sync {
    /// Called with each pushed task's id, before its model is downloaded.
    fn on_task(&self, task_id: &str) -> TaskDecision;
}

impl Agent {
    /// The run, version and values of the row-structured model this agent
    /// holds for row-sparse downloads (the last it downloaded), if any.
    pub fn held_model(&self) -> Option<(&str, u64, &[f32])> {
        self.held
            .as_ref()
            .map(|h| (h.run_id.as_str(), h.version, h.model.as_slice()))
    }

    /// Keeps state in `state`, restoring the private user factors saved there.
    pub fn with_state(mut self, state: crate::state::StateDir) -> Result<Self, StateError> {
        if let (Some(mf), Some(users)) = (&mut self.data.mf, state.load_users()?) {
            // Saved together with the model of the run they belong to: its
            // meta says which (the parameters are not needed, and a damaged
            // parameter file must not keep the agent from starting: the
            // coordinator hands the model out again).
            let owner = state
                .read_json::<crate::state::GlobalMeta>("global-mf.json")?
                .map(|meta| meta.run_id);
            // The top-level copy is saved when a version is served; the
            // run's own after every task. A restart mid-run resumed from
            // the served version's users, which could be 36 rounds old.
            let users = match &owner {
                Some(run) => state.run(run)?.load_users()?.unwrap_or(users),
                None => users,
            };
            // Row i of the saved state is the customer it names, whatever
            // the export gained or lost since.
            // Said when customers came or went: after any refresh the
            // export's order never equals the saved one again, and the line
            // came at every start (found by an operator probe).
            let same_customers = users.users.len() == mf.users.len() && {
                let now: std::collections::HashSet<&str> =
                    mf.users.iter().map(String::as_str).collect();
                users.users.iter().all(|u| now.contains(u.as_str()))
            };
            if mf.adopt_user_order(&users.users) && !same_customers {
                tracing::info!(
                    saved = users.users.len(),
                    now = mf.users.len(),
                    "the export's customers changed since the user factors were saved: \
                     matched by customer id"
                );
            }
            mf.state = users;
            self.users_of = owner;
        }
        self.state = Some(state);
        Ok(self)
    }

    /// An agent for `data` that talks to `coordinator`.
    pub fn new(coordinator: impl Into<String>, data: LocalData) -> Self {
        Self {
            coordinator: coordinator.into(),
            data,
            backoff: Backoff::default(),
            tasks_done: 0,
            sessions: 0,
            tls: None,
            state: None,
            observer: None,
            exit_on_run_end: false,
            secure: Default::default(),
            lifecycle: Lifecycle::default(),
            download_precision: RowPrecision::F32,
            row_transfers: true,
            held: None,
            sources: Vec::new(),
            interactions: None,
            mf_rows: 0,
            users_of: None,
            parked_users: HashMap::new(),
            personalise: None,
            state_lock: None,
        }
    }

    /// An agent for the merchant configuration `cfg`, as `fedcart-client
    /// run` starts it without TLS: its data read (the orders export once),
    /// hashed item ids mapped into the rows of the recommender it holds, its
    /// private state restored, its privacy policy, backoff and transfer
    /// settings applied.
    pub fn from_config(cfg: &crate::config::AgentConfig) -> Result<Self, FromConfigError> {
        if cfg.privacy.max_epsilon.is_some() && cfg.state_dir.is_none() {
            return Err(FromConfigError::BudgetWithoutState);
        }
        let state = match &cfg.state_dir {
            Some(dir) => Some(crate::state::StateDir::open(dir)?),
            None => None,
        };
        // Before anything is read from it: a second agent on the same
        // directory would double-spend the ledger and race on its files.
        let state_lock = state.as_ref().map(|s| s.lock_for_agent()).transpose()?;
        let rows = match &state {
            Some(s) => s.mf_rows()?,
            None => None,
        }
        .unwrap_or(crate::data::HASHED_ROWS_BEFORE_A_TASK);
        let (local, interactions) = crate::data::load_all(cfg, rows)?;
        let mut agent = Agent::new(cfg.coordinator.clone(), local).with_policy(cfg.privacy.clone());
        if let Some(i) = interactions {
            agent = agent.with_hashed_items(i, rows);
        }
        if let Some(state) = state {
            if let Some(cap) = cfg.privacy.max_epsilon {
                let budget =
                    crate::budget::Budget::open(state.clone(), cap, cfg.privacy.epsilon_delta)?;
                if let Some(taken) = budget.restored() {
                    tracing::warn!("{taken}");
                }
                agent.secure.set_budget(budget);
            }
            agent = agent.with_state(state)?;
        }
        agent.backoff = cfg.backoff.clone();
        agent.download_precision = cfg.transfer.download_precision;
        agent.row_transfers = cfg.transfer.rows;
        agent.personalise = cfg.personalise.clone();
        agent.state_lock = state_lock;
        agent.sources = [
            &cfg.data.orders_csv,
            &cfg.data.churn_csv,
            &cfg.data.ratings_csv,
            &cfg.data.catalogue,
        ]
        .into_iter()
        .flatten()
        .map(|p| (p.clone(), FileStamp::of(p)))
        .collect();
        Ok(agent)
    }

    /// The data files that changed since the agent read them, once per run
    /// (`run_id`): the agent trains on its data as read at start, and a
    /// merchant that replaced its export (a weekly refresh) had every later
    /// run, scheduled retraining included, train on the old one without a
    /// word (found by an operator probe).
    fn changed_sources(&mut self, run_id: &str) -> Vec<&std::path::Path> {
        if !self.lifecycle.sources_checked.insert(run_id.to_owned()) {
            return Vec::new();
        }
        self.sources
            .iter()
            .filter(|(p, read)| FileStamp::of(p) != *read)
            .map(|(p, _)| p.as_path())
            .collect()
    }

    /// Gives `data.mf` the private user factors of `run` (see
    /// `parked_users`), parking the other run's.
    fn users_for(&mut self, run: &str) -> Result<(), StateError> {
        let Some(mf) = &mut self.data.mf else {
            return Ok(());
        };
        match &self.users_of {
            Some(owner) if owner == run => {}
            Some(owner) => {
                // Parked here, else saved in the run's state by an earlier
                // life of this agent.
                // A saved file that does not read is named, not replaced
                // in silence by fresh factors.
                let mut mine = match self.parked_users.remove(run) {
                    Some(parked) => parked,
                    None => match &self.state {
                        Some(state) => state.run(run)?.load_users()?.unwrap_or_default(),
                        None => Default::default(),
                    },
                };
                // Saved by an earlier life of this agent over another list
                // of customers: its rows cannot be matched to this one's.
                if !mine.users.is_empty()
                    && mf.users.get(..mine.users.len()) != Some(&mine.users[..])
                {
                    tracing::warn!(
                        run,
                        "the run's saved user factors are for another list of customers: \
                         they start afresh"
                    );
                    mine = Default::default();
                }
                let theirs = std::mem::replace(&mut mf.state, mine);
                self.parked_users.insert(owner.clone(), theirs);
                self.users_of = Some(run.to_owned());
            }
            None => self.users_of = Some(run.to_owned()),
        }
        Ok(())
    }

    /// Item ids of `data.mf` hashed into `rows` rows: before an MF task
    /// whose model has another row count, the agent maps `interactions`
    /// into that many (its user factors start afresh then).
    pub fn with_hashed_items(
        mut self,
        interactions: crate::data::Interactions,
        rows: usize,
    ) -> Self {
        if interactions.hashed() {
            self.interactions = Some(interactions);
            self.mf_rows = rows;
        }
        self
    }

    /// Re-maps hashed item ids for a task's model (see
    /// [`Agent::with_hashed_items`]).
    fn map_items_for(&mut self, spec: &TaskSpec) -> Result<(), crate::data::DataError> {
        let (Some(inter), Some(shape)) = (&self.interactions, spec.model.mf_shape()) else {
            return Ok(());
        };
        if shape.num_items != self.mf_rows {
            // A catalogue of another length is refused (the task declined):
            // its rows would land on other items' rows of this run.
            let items = inter.items_for_run(shape.num_items)?;
            tracing::info!(
                rows = shape.num_items,
                "item ids hashed into the run's item rows"
            );
            if let Some(note) = items.collision_note() {
                tracing::warn!("{note}");
            }
            // The users keep their factors, matched by id as on restore.
            let users = self.data.mf.take().map(|m| m.state).unwrap_or_default();
            let mut mf = inter.mf(&items);
            mf.adopt_user_order(&users.users);
            mf.state = users;
            self.data.mf = Some(mf);
            self.mf_rows = shape.num_items;
        }
        Ok(())
    }

    /// Checks every task against `policy` (see [`crate::policy`]).
    pub fn with_policy(mut self, policy: crate::policy::PrivacyPolicy) -> Self {
        self.secure.set_policy(policy);
        self
    }

    /// Charges every distributed-DP round this agent sends an update in to
    /// `budget`, refusing those that would pass its cap (see
    /// [`crate::budget`]); `from_config` opens it from `privacy.max_epsilon`.
    pub fn with_budget(mut self, budget: crate::budget::Budget) -> Self {
        self.secure.set_budget(budget);
        self
    }

    /// Binds this agent's secure-aggregation keys to its certificate and
    /// checks its peers' (see [`crate::secure`]); required for secure rounds
    /// unless the policy's `require_key_binding` is off.
    pub fn with_key_identity(mut self, identity: crate::tls::KeyIdentity) -> Self {
        self.secure.set_identity(identity);
        self
    }

    /// Runs sessions until `shutdown` becomes true (then `Ok`) or a
    /// permanent error occurs (then that error, see
    /// [`AgentError::is_permanent`]). Transient failures are retried with
    /// exponential backoff from `backoff.initial_ms` to `backoff.max_ms`,
    /// each wait drawn between half and all of its nominal length; the first
    /// failure of an outage is logged as a warning, the retries at debug
    /// level. After the coordinator announced the end of its run the agent
    /// waits for the next run, retrying at the longest interval.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let initial = Duration::from_millis(self.backoff.initial_ms);
        let longest = Duration::from_millis(self.backoff.max_ms.max(self.backoff.initial_ms));
        let mut wait = initial;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let done_before = self.tasks_done;
            let span = tracing::info_span!("session", merchant = %self.data.merchant_id);
            match self.session(&mut shutdown).instrument(span).await {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::RunEnded) => return Ok(()),
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    if self.tasks_done > done_before || self.lifecycle.joined {
                        wait = initial;
                    }
                    self.lifecycle.failed(&e, &self.coordinator, longest);
                }
            }
            self.lifecycle.joined = false;
            let jittered = wait.mul_f64(rand::random_range(0.5..=1.0));
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            wait = (wait * 2).min(longest);
        }
    }

    async fn connect(&self) -> Result<CoordinatorClient<Channel>, AgentError> {
        let mut endpoint = Endpoint::from_shared(self.coordinator.clone()).map_err(|source| {
            AgentError::BadUrl {
                url: self.coordinator.clone(),
                source,
            }
        })?;
        let mismatch = |why| AgentError::UrlMismatch {
            url: self.coordinator.clone(),
            why,
            fix: None,
        };
        match (endpoint.uri().scheme_str(), &self.tls) {
            (Some("https"), Some(_)) | (Some("http"), None) => {}
            (Some("http"), Some(_)) => {
                return Err(AgentError::UrlMismatch {
                    url: self.coordinator.clone(),
                    why: "http:// would send the TLS identity's traffic in plaintext",
                    fix: Some(
                        "write the address as https://HOST:PORT; for a coordinator run with \
                         --insecure (plaintext, no identities), remove the `[tls]` section instead",
                    ),
                });
            }
            (Some("https"), None) => {
                return Err(AgentError::UrlMismatch {
                    url: self.coordinator.clone(),
                    why: "https:// needs this merchant's TLS identity, and none is configured",
                    fix: Some(
                        "add the `[tls]` section (ca, cert, key: `certs issue --kit` writes \
                         them; `fedcart-client fleet` takes --certs DIR), or write http:// for a \
                         coordinator run with --insecure",
                    ),
                });
            }
            (None, _) => return Err(mismatch("no scheme: write https://HOST:PORT")),
            (Some(_), _) => return Err(mismatch("the scheme must be https:// (or http://)")),
        }
        if endpoint.uri().host().is_none_or(str::is_empty) {
            return Err(mismatch("no host"));
        }
        // A port outside 1–65535 parses as a URI but can never connect: it
        // would be retried quietly for ever.
        let port = endpoint
            .uri()
            .authority()
            .and_then(|a| a.as_str().rsplit_once(':'))
            .map(|(_, p)| p)
            .filter(|p| !p.contains(']'));
        if let Some(port) = port
            && !port.parse::<u16>().is_ok_and(|p| p > 0)
        {
            return Err(mismatch("the port must be a number from 1 to 65535"));
        }
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(AgentError::Tls)?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect()
            .await
            .map_err(|source| AgentError::Connect {
                url: self.coordinator.clone(),
                source,
            })?;
        Ok(CoordinatorClient::new(channel).max_decoding_message_size(4 << 20))
    }

    /// One session: join and serve tasks until the stream breaks.
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, AgentError> {
        let mut client = self.connect().await?;
        let examples = self
            .secure
            .policy()
            .advertised_examples(self.data.examples());
        let join = pb::JoinRequest {
            merchant_id: self.data.merchant_id.clone(),
            examples,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut work = client
            .join(join)
            .await
            .map_err(AgentError::Join)?
            .into_inner();
        let first = work.message().await.map_err(AgentError::Welcome)?;
        let Some(pb::Work {
            kind: Some(pb::work::Kind::Welcome(welcome)),
        }) = first
        else {
            return Err(AgentError::NoWelcome);
        };
        self.sessions += 1;
        self.lifecycle.joined(&welcome.run_id, &self.coordinator);
        // Three missed pings mean the connection is dead even if TCP has not noticed.
        let silence = Duration::from_millis(welcome.ping_interval_ms.max(100) * 3);
        loop {
            let next = tokio::select! {
                m = tokio::time::timeout(silence, work.message()) => m,
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            };
            let msg = match next {
                Err(_) => return Err(AgentError::Silence(silence)),
                Ok(Err(status)) => return Err(AgentError::Stream(status)),
                Ok(Ok(None)) => return Err(AgentError::StreamClosed),
                Ok(Ok(Some(m))) => m,
            };
            match msg.kind {
                Some(pb::work::Kind::Task(task)) => {
                    if self
                        .observer
                        .as_ref()
                        .is_some_and(|o| o.on_task(&task.task_id) == TaskDecision::Abandon)
                    {
                        return Err(AgentError::Abandoned {
                            task_id: task.task_id,
                        });
                    }
                    // A shutdown leaves the task unanswered (the coordinator
                    // counts a dropout) rather than waiting for training.
                    self.lifecycle.working(&task.run_id);
                    tokio::select! {
                        r = self.handle_task(&mut client, &welcome.session_id, task) => match r {
                            // The task closed while the agent worked on it
                            // (the operator stopped the run, or the round
                            // timed out or was retried): it is dropped and
                            // the session goes on. Ending the session logged
                            // an outage and dropped the agent from the task
                            // it was about to be sent.
                            Err(AgentError::Transfer(e)) if e.task_closed().is_some() => {
                                if let Some((task_id, status)) = e.task_closed() {
                                    tracing::info!(task = %task_id, reason = status.message(),
                                        "the task closed before this agent's part of it; dropped");
                                }
                                continue;
                            }
                            // The coordinator refused the update itself (a
                            // value or length it does not accept): the round
                            // goes on without it, and so does the session.
                            Err(AgentError::Transfer(e)) if e.update_refused().is_some() => {
                                if let Some((task_id, status)) = e.update_refused() {
                                    tracing::warn!(task = %task_id, reason = status.message(),
                                        "the coordinator refused this agent's update; the round goes on without it (if every update is refused, the agent and the coordinator may run different fedcart versions)");
                                }
                            }
                            r => r?,
                        },
                        _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                    }
                    self.tasks_done += 1;
                }
                // The session stays open for the coordinator's other runs,
                // unless this agent exits with the run it worked for (fleet).
                Some(pb::work::Kind::RunEnded(end)) => {
                    // A secure round the run ended during leaves its
                    // update and session keys held: dropped now.
                    self.secure.forget(&end.run_id);
                    let held = self
                        .state
                        .as_ref()
                        .and_then(|s| s.held_version(&end.run_id));
                    self.lifecycle.run_ended(&end);
                    self.publish_served(&end);
                    if let Some(held) = held
                        && end.served_version > 0
                        && held != end.served_version
                    {
                        self.fetch_served(&mut client, &welcome.session_id, &end, held)
                            .await;
                    }
                    self.personalise_after(&end.run_id).await?;
                    if self.exit_on_run_end && self.tasks_done > 0 {
                        return Ok(SessionEnd::RunEnded);
                    }
                }
                Some(pb::work::Kind::Ping(_)) | None => {}
                Some(pb::work::Kind::Welcome(_)) => return Err(AgentError::SecondWelcome),
                Some(pb::work::Kind::Secagg(req)) => {
                    self.secure
                        .handle(&mut client, &welcome.session_id, req)
                        .await?;
                }
            }
        }
    }

    async fn handle_task(
        &mut self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        task: pb::TaskAssignment,
    ) -> Result<(), AgentError> {
        let spec: TaskSpec =
            serde_json::from_slice(&task.spec_json).map_err(|source| AgentError::Spec {
                task_id: task.task_id.clone(),
                source,
            })?;
        if let Err(v) = self.secure.check_task(&spec, task.secure_aggregation) {
            // Nothing is downloaded, trained or sent but the refusal: the
            // coordinator counts this agent as dropped from the task.
            tracing::warn!(
                task = %task.task_id,
                setting = %format_args!("privacy.{}", v.setting),
                task_value = %v.task,
                policy_value = %v.policy,
                "{v}"
            );
            // Declining evaluations leaves the merchant in the training.
            let lasting = if v.setting == "allow_evaluation" {
                Lasting::No
            } else {
                Lasting::Yes
            };
            self.decline(
                client,
                session_id,
                &task,
                &crate::transfer::declined_by_policy(v.setting),
                lasting,
            )
            .await;
            return Ok(());
        }
        if let Err(e) = self.map_items_for(&spec) {
            tracing::error!(task = %task.task_id, error = %e, "cannot map item ids into the run's rows");
            self.decline(
                client,
                session_id,
                &task,
                crate::transfer::UNMAPPED_ITEMS,
                Lasting::Yes,
            )
            .await;
            return Ok(());
        }
        if spec.model.mf_shape().is_some() {
            self.users_for(&task.run_id)?;
        }
        let layout = spec.model.layout();
        let update_layout = spec.update_layout();
        let has_rows = self.row_transfers && layout.has_rows();
        let held = self.held.as_ref().filter(|h| {
            has_rows && h.run_id == task.run_id && h.model.len() as u64 == task.model_len
        });
        // A secure round's model is fetched exact and checked against the
        // digest the agent signs with its round keys (a coordinator serving
        // this merchant other bytes under the version its peers train from
        // is refused by them, not trained on here).
        let check = task.secure_aggregation && !task.model_digest.is_empty();
        let precision = if check {
            RowPrecision::F32
        } else {
            self.download_precision
        };
        let mut global = match held {
            _ if task.model_len == 0 => Vec::new(),
            // The version this agent already holds: nothing to download.
            Some(h) if h.version == task.model_version && h.digest == task.model_digest => {
                h.model.clone()
            }
            _ => {
                let rows = has_rows.then(|| RowDownload {
                    layout: &layout,
                    held: held.map(|h| (h.version, h.digest.as_slice(), h.model.as_slice())),
                    precision,
                });
                download_rows(client, session_id, &task, rows).await?
            }
        };
        if check && !global.is_empty() && !crate::transfer::is_named_model(&task, &global) {
            // The held copy was rounded (`download_precision`) or is not
            // what the coordinator took it for: the whole model, once.
            global = download_rows(client, session_id, &task, None).await?;
            if !crate::transfer::is_named_model(&task, &global) {
                return Err(crate::transfer::TransferError::Digest {
                    task_id: task.task_id.clone(),
                }
                .into());
            }
        }
        if has_rows && !global.is_empty() {
            self.held = Some(HeldModel {
                run_id: task.run_id.clone(),
                version: task.model_version,
                digest: task.model_digest.clone(),
                model: global.clone(),
            });
        }
        let model_name = spec.model.name().to_string();
        let seed = spec.seed;
        let dp = spec.dp.clone();
        let kind = spec.kind;
        let out = self.run_locally(&task, spec, global).await?;
        match out {
            // No held-out row: empty histograms at weight 0, which the
            // coordinator refuses as an update (the refusal then read as a
            // lost coordinator, at every evaluation). Declined; the cause
            // and its fix were said when the data loaded.
            Ok(out)
                if kind == fedcart_common::task::TaskKind::Evaluate
                    && out.weight == 0.0
                    && out.update.is_some() =>
            {
                tracing::debug!(task = %task.task_id,
                    "evaluation declined: no held-out customer (said when the data loaded)");
                // Its training tasks go on: not lasting.
                self.decline(client, session_id, &task, NO_HELD_OUT, Lasting::No)
                    .await;
                Ok(())
            }
            // Under secure aggregation the update waits for the protocol's
            // masked-input stage (see `secure`); nothing is sent in the clear.
            Ok(out) if task.secure_aggregation => {
                self.secure
                    .hold(&task, seed, &self.data.merchant_id, dp, out);
                Ok(())
            }
            Ok(out) => Ok(upload_as(
                client,
                session_id,
                &task,
                &out,
                has_rows.then_some(&update_layout),
            )
            .await?),
            // Every later task of this run would fail the same way, but the
            // agent's other runs need not: it declines, says what does not
            // fit and what to change, and stays.
            Err(
                source @ (TrainError::NoData(_)
                | TrainError::FeatureWidth { .. }
                | TrainError::ItemOutOfRange { .. }),
            ) => {
                let reason = source.public_reason();
                let e = AgentError::Incompatible {
                    task_id: task.task_id.clone(),
                    model: model_name,
                    source,
                };
                // Once per run: the coordinator retries the task, and each
                // retry logged the same error (7 lines in 6 s).
                if self.lifecycle.declined.insert(task.run_id.clone()) {
                    tracing::error!(
                        run = %task.run_id,
                        error = %crate::agent::Chain(&e),
                        fix = e.what_to_fix().unwrap_or_default(),
                        "this merchant's data does not fit the run's model: its tasks are declined"
                    );
                } else {
                    tracing::debug!(run = %task.run_id, task = %task.task_id,
                        "task declined: the data does not fit the run's model (said above)");
                }
                self.decline(client, session_id, &task, reason, Lasting::Yes)
                    .await;
                Ok(())
            }
            Err(e) => {
                // Only the failure's kind is sent, so that the coordinator
                // drops us from the task now rather than at its deadline.
                tracing::error!(task = %task.task_id, error = %e, "local task failed");
                self.decline(client, session_id, &task, e.public_reason(), Lasting::No)
                    .await;
                Ok(())
            }
        }
    }

    /// A merchant away when its run handed the served version out holds
    /// version `held` of the run instead: it fetches the served version now
    /// and evaluates it on its own data, as the hand-out would have (an MF
    /// agent fits its users to it), so that `score` and `recommend` answer
    /// from the version the run serves. Best effort: on failure the merchant
    /// keeps the version it holds, and the log says why.
    async fn fetch_served(
        &mut self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        end: &pb::RunEnded,
        held: u64,
    ) {
        let served = end.served_version;
        // Said before anything is awaited: the line follows the run's end.
        tracing::info!(run = %end.run_id, held, served,
            "this merchant holds version {held} of the run, not version {served}, which the run \
             serves: it missed the evaluation that handed that version out (it was away, or that \
             task failed here); fetching version {served}");
        match self.adopt_served(client, session_id, end).await {
            Ok(()) => tracing::info!(run = %end.run_id, served,
                "version {served} fetched and evaluated here: `score` and `recommend` answer from it"),
            Err(why) => tracing::warn!(run = %end.run_id, held, served,
                "fetching version {served} failed ({why}): this merchant keeps version {held} until \
                 a later run hands it a model"),
        }
    }

    async fn adopt_served(
        &mut self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        end: &pb::RunEnded,
    ) -> Result<(), String> {
        let state = self.state.as_ref().ok_or("no state directory")?;
        let run = state.run(&end.run_id).map_err(|e| e.to_string())?;
        let (meta, held) = run
            .latest_global()
            .map_err(|e| e.to_string())?
            .ok_or("no model of the run is stored")?;
        let served = end.served_version;
        // The task the hand-out would have sent: the served version's
        // evaluation, which keeps the user side fitted to it.
        let spec = TaskSpec {
            kind: fedcart_common::task::TaskKind::Evaluate,
            round: served,
            best_version: Some(served),
            dp: None,
            ..meta.spec
        };
        self.map_items_for(&spec).map_err(|e| e.to_string())?;
        if spec.model.mf_shape().is_some() {
            self.users_for(&end.run_id).map_err(|e| e.to_string())?;
        }
        let task = pb::TaskAssignment {
            run_id: end.run_id.clone(),
            round: served,
            task_id: String::new(),
            kind: pb::TaskKind::Evaluate as i32,
            model_version: served,
            model_len: held.len() as u64,
            spec_json: Vec::new(),
            deadline_unix_ms: 0,
            secure_aggregation: false,
            hands_out: true,
            // Fetched whole, from no held copy: nothing to check it against.
            model_digest: Vec::new(),
        };
        let global = crate::transfer::download(client, session_id, &task)
            .await
            .map_err(|e| Chain(&e).to_string())?;
        match self.run_locally(&task, spec, global).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(Chain(&e).to_string()),
        }
    }

    /// Runs `task` locally on `global` with `spec` and keeps what the state
    /// directory holds of it: the model in the run's own directory, then the
    /// user side and the metrics; at the top (what `score`, `recommend` and
    /// `serve` answer from) only a version the run serves ([`Publish`]).
    async fn run_locally(
        &mut self,
        task: &pb::TaskAssignment,
        spec: TaskSpec,
        global: Vec<f32>,
    ) -> Result<Result<fedcart_common::train::TaskOutput, TrainError>, AgentError> {
        let publish = Publish::of(task, &spec);
        let meta = crate::state::GlobalMeta {
            run_id: task.run_id.clone(),
            version: task.model_version,
            spec: spec.clone(),
            sha256: None,
        };
        if let Some(state) = &self.state
            && !global.is_empty()
        {
            let run = state.run(&task.run_id)?;
            if let (Publish::IfSelected, Some(best)) = (publish, spec.best_version) {
                // The version evaluated before this one may have become the
                // best: it is served now.
                keep_displaced(state, &task.run_id, spec.model.state_key());
                state.adopt(&run.candidate()?, &task.run_id, best)?;
            }
            run.save_global(&meta, &global)?;
        }
        let family = spec.model.data_family();
        let spec_is_mf = spec.model.mf_shape().is_some();
        let kind = spec.kind;
        // Under differential privacy the example count is private (see
        // `fedcart_common::privacy::dp::clip`): the clear-text header of a
        // training or evaluation result carries weight 1, not the row count
        // (and validation weight 1, not the validation rows).
        // The statistics step still needs its row counts (they are its sum's
        // denominator) and sends them under its own protection.
        let hide_count = spec.dp.is_some() && spec.kind != fedcart_common::task::TaskKind::Stats;
        let changed = self.changed_sources(&task.run_id);
        if !changed.is_empty() {
            let files: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
            tracing::warn!(
                run = %task.run_id,
                files = %files.join(", "),
                "the data changed since this agent read it at start: this run trains on the data \
                 as read then; restart the agent to train on the new data"
            );
        }
        // Features the federation's statistics never saw the like of are
        // clamped by the standardiser (a customer with an amount of 1e14
        // wrecked a running churn model): said once per run.
        if kind == fedcart_common::task::TaskKind::Train
            && let (Some(scaler), Some(churn)) = (&spec.standardizer, &self.data.churn)
            && churn.train.x.ncols() == scaler.mean.len()
            && self.lifecycle.clamp_checked.insert(task.run_id.clone())
        {
            let (_, clamped) = scaler.transform_counting(&churn.train.x);
            if clamped > 0 {
                tracing::warn!(
                    run = %task.run_id,
                    clamped,
                    bound = scaler.bound().unwrap_or(f32::INFINITY),
                    "feature values of this merchant's customers lie further from the federation's \
                     mean than any customer of the run's statistics step did (the data changed \
                     after it, or this merchant joined later): they are clamped at the bound, in \
                     standard deviations, so that they cannot dominate the update; check the \
                     data for absurd values (an amount of 1e14, say)"
                );
            }
        }
        let data = std::mem::take(&mut self.data);
        let (data, out, global) = tokio::task::spawn_blocking(move || {
            let mut data = data;
            let out = run_task(&spec, &global, &mut data);
            (data, out, global)
        })
        .await
        .map_err(AgentError::TaskPanicked)?;
        self.data = data;
        let out = out.map(|mut out| {
            if hide_count {
                out.weight = 1.0;
                out.validation_weight = 1.0;
            }
            out
        });
        if let (Some(state), Ok(out)) = (&self.state, &out) {
            // The run's own directory keeps everything; the top what goes
            // with the model it holds; a candidate its evaluation's.
            let run = state.run(&task.run_id)?;
            let mut dirs = vec![run.clone()];
            // Only a task that ran: a declined one (data of another width,
            // say) leaves the served model alone.
            let keeps = match publish {
                Publish::Now => {
                    keep_displaced(state, &task.run_id, meta.spec.model.state_key());
                    Some(state.clone())
                }
                Publish::IfSelected => Some(run.candidate()?),
                Publish::Never => None,
            };
            if let Some(dir) = keeps.filter(|_| !global.is_empty()) {
                dir.save_global(&meta, &global)?;
                dirs.push(dir);
            }
            for dir in dirs {
                if let Some(mf) = &self.data.mf
                    && spec_is_mf
                {
                    dir.save_users(&mf.state)?;
                }
                dir.save_metrics(family, &out.metrics)?;
            }
        }
        if let Ok(out) = &out
            && !task.task_id.is_empty()
        {
            tracing::info!(
                run = %task.run_id,
                task = %task.task_id,
                kind = ?kind,
                version = task.model_version,
                weight = out.weight,
                metrics = %Metrics(&out.metrics),
                "{}",
                // A secure task's update still has the protocol's stages to
                // pass (and this agent's policy to meet) before it leaves.
                if task.secure_aggregation {
                    "task computed; its update waits for the secure round"
                } else {
                    "task done"
                }
            );
        }
        Ok(out)
    }

    /// When run `end` ends serving the version this agent evaluated last
    /// (no later evaluation named it the best), that version goes to the
    /// top now, unless the top holds another run's model by then
    /// (`StateDir::publish_served`). When it failed (it serves nothing),
    /// the models its best so far displaced at the top go back there
    /// (`StateDir::give_back`). Best effort: a state that cannot be written
    /// is logged and the top keeps the version it holds.
    fn publish_served(&self, end: &pb::RunEnded) {
        let Some(state) = &self.state else {
            return;
        };
        if end.served_version == 0 && !end.stopped.is_empty() {
            match state.give_back(&end.run_id) {
                Ok(back) if !back.is_empty() => {
                    tracing::info!(run = %end.run_id,
                        "the run failed and serves nothing: `score`, `recommend` and `serve` \
                         answer again from {}, which its best version so far had replaced",
                        back.join(" and "));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(run = %end.run_id, error = %Chain(&e),
                    "the run failed, and the model its best version so far replaced could not be put back"),
            }
            return;
        }
        if end.served_version == 0 || state.held_version(&end.run_id).is_none() {
            return;
        }
        if let Err(e) = state.publish_served(&end.run_id, end.served_version) {
            tracing::warn!(run = %end.run_id, served = end.served_version, error = %Chain(&e),
                "could not put the served version where `score` and `recommend` read");
        }
    }

    /// Tells the coordinator this agent drops out of `task`, with a fixed,
    /// data-free `reason`, so that the round need not wait for its
    /// deadline, and whether every later task of the run would fail the
    /// same way (then the coordinator stops selecting it for the run until
    /// it joins again). Best effort: a refusal (the task closed meanwhile)
    /// or a broken connection is logged; the coordinator then counts the
    /// agent as missing, as before.
    async fn decline(
        &self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        task: &pb::TaskAssignment,
        reason: &str,
        lasting: Lasting,
    ) {
        let named = (task.run_id.as_str(), task.round, task.task_id.as_str());
        let lasting = matches!(lasting, Lasting::Yes);
        if let Err(e) =
            crate::transfer::report_failure(client, session_id, named, reason, lasting).await
        {
            tracing::warn!(task = %task.task_id, error = %e, "the coordinator was not told");
        }
    }
}

/// Whether a declined task's cause lasts for the run (see
/// [`crate::transfer::report_failure`]).
enum Lasting {
    /// Every later task of the run would fail the same way: the data does
    /// not fit the model, the policy refuses the run, the items do not map.
    Yes,
    /// This task only (a diverged training, no held-out row to evaluate).
    No,
}

/// The reason an agent gives for an evaluation it declines because it
/// holds no held-out row.
pub const NO_HELD_OUT: &str = "no held-out rows to evaluate on";

/// Metrics as `name=value` pairs for a log line.
struct Metrics<'a>(&'a std::collections::BTreeMap<String, f64>);

impl std::fmt::Display for Metrics<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{k}={v:.4}")?;
        }
        Ok(())
    }
}

/// Whether a task's model goes to the top of the state directory, where
/// `score`, `recommend` and `serve` read: during a run only a version
/// selection chose does, so a merchant is not served a version on trial
/// (every task's version went there: the latest trained one during a run,
/// then the best again at its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// The evaluation that hands the run's model out (`hands_out`: of the
    /// last version, which the serving of the best replaces at once if it
    /// is not the best), the first evaluation of a run (it becomes the best),
    /// or one of a run that selects nothing.
    Now,
    /// The evaluation of a version after the best: kept as the run's
    /// candidate until the next evaluation (its `best_version`) or the
    /// run's end (`RunEnded::served_version`) names it.
    IfSelected,
    /// Training and statistics tasks, and the untrained version 0.
    Never,
}

impl Publish {
    fn of(task: &pb::TaskAssignment, spec: &TaskSpec) -> Self {
        if task.model_version == 0 || spec.kind != fedcart_common::task::TaskKind::Evaluate {
            return Publish::Never;
        }
        match spec.best_version {
            Some(best) if best != task.model_version && !task.hands_out => Publish::IfSelected,
            _ => Publish::Now,
        }
    }
}

/// Keeps the model run `run_id` is about to replace at the top under state
/// key `key` (`StateDir::keep_displaced`). Best effort: a top that cannot be
/// read (damaged) is replaced all the same, as before.
fn keep_displaced(state: &crate::state::StateDir, run_id: &str, key: &str) {
    if let Err(e) = state.keep_displaced(run_id, key) {
        tracing::warn!(run = %run_id, error = %Chain(&e),
            "could not keep the model this run replaces at the top (a failed run puts it back)");
    }
}

/// What the lifecycle has said, so that each event is logged once: an
/// outage as one warning (its retries at debug level), a run joined or ended
/// as one INFO line.
#[derive(Debug, Default)]
struct Lifecycle {
    /// The current session got its welcome.
    joined: bool,
    /// Failed attempts since the last successful join, if any.
    outage: Option<u64>,
    /// A session of this process ever got its welcome.
    ever_joined: bool,
    /// The runs whose end the coordinator announced.
    ended: std::collections::BTreeSet<String>,
    /// Runs this agent was welcomed to or given tasks of, and whose end it
    /// has not heard: while one is open, losing the coordinator is an
    /// outage, whatever other runs ended.
    open: std::collections::BTreeSet<String>,
    /// The outage in progress was logged as a warning (not as the quiet
    /// wait after every run ended).
    warned: bool,
    /// Runs whose standardiser this merchant's features were checked
    /// against (once each: the data does not change while the agent runs).
    clamp_checked: std::collections::BTreeSet<String>,
    /// Runs whose model this merchant's data does not fit, said once each.
    declined: std::collections::BTreeSet<String>,
    /// Runs whose tasks found the data files as read, or said they changed.
    sources_checked: std::collections::BTreeSet<String>,
}

impl Lifecycle {
    fn joined(&mut self, run_id: &str, url: &str) {
        self.joined = true;
        self.ever_joined = true;
        let outage = self.outage.take();
        let warned = std::mem::take(&mut self.warned);
        match outage {
            // An outage logged as a warning is said to be over.
            Some(attempts) if warned => {
                tracing::info!(run = %run_id, coordinator = %url, attempts, "reconnected")
            }
            _ if self.ended.contains(run_id) => {
                tracing::debug!(run = %run_id, "joined the finished run again");
            }
            Some(attempts) => {
                tracing::info!(run = %run_id, coordinator = %url, attempts, "reconnected")
            }
            None => tracing::info!(run = %run_id, coordinator = %url, "joined"),
        }
        self.working(run_id);
    }

    /// Notes that the agent works for `run_id` (welcomed to it or given
    /// one of its tasks), unless its end was announced.
    fn working(&mut self, run_id: &str) {
        if !self.ended.contains(run_id) {
            self.open.insert(run_id.to_owned());
        }
    }

    /// Logs that a run this agent worked for ended; whether it did (a new
    /// merchant hears of every finished run in the store, which are not its
    /// news: they are logged at debug level).
    fn run_ended(&mut self, end: &pb::RunEnded) -> bool {
        let worked = self.open.remove(&end.run_id);
        if !self.ended.insert(end.run_id.clone()) {
            return false;
        }
        if !worked {
            tracing::debug!(run = %end.run_id, "a run this agent took no part in has ended");
            return false;
        }
        // 0: the run failed (nothing was handed out), or an older
        // coordinator that does not say.
        let served = (end.served_version > 0).then_some(end.served_version);
        if end.stopped.is_empty() {
            tracing::info!(run = %end.run_id, version = end.model_version, served,
                "the run has finished; waiting for the next run");
        } else {
            tracing::info!(run = %end.run_id, version = end.model_version, served,
                stopped = %end.stopped, "the run has stopped; waiting for the next run");
        }
        true
    }

    fn failed(&mut self, e: &AgentError, url: &str, longest: Duration) {
        let attempts = self.outage.get_or_insert(0);
        *attempts += 1;
        if *attempts > 1 {
            tracing::debug!(error = %Chain(e), "coordinator unavailable; retrying");
            return;
        }
        match self.outage_kind() {
            // A coordinator whose runs ended may exit on purpose: not a
            // warning, but said once, so that a waiting agent's log shows
            // why nothing happens.
            Outage::AfterRunsEnded => tracing::info!(coordinator = %url, error = %Chain(e),
                "the coordinator is unreachable since the runs this agent worked for ended; retrying quietly (every {longest:?} at most) until it is back"),
            // Never connected: not "lost", and the likely fix is named.
            Outage::NeverJoined => {
                let why = error::unreachable_cause(e).unwrap_or("it did not answer");
                tracing::warn!(coordinator = %url, error = %Chain(e),
                    "cannot reach the coordinator: {why}; retrying quietly (every {longest:?} at most) until it answers");
                self.warned = true;
            }
            Outage::Lost => {
                tracing::warn!(coordinator = %url, error = %Chain(e),
                    "lost the coordinator; retrying quietly (every {longest:?} at most) until it is back");
                self.warned = true;
            }
        }
    }

    /// How an outage starting now is told: quietly only when some run
    /// ended and none the agent works for is still open (a stopped or
    /// finished run elsewhere in the store said "since the run ended" in
    /// the middle of another run).
    fn outage_kind(&self) -> Outage {
        if !self.ended.is_empty() && self.open.is_empty() {
            Outage::AfterRunsEnded
        } else if !self.ever_joined {
            Outage::NeverJoined
        } else {
            Outage::Lost
        }
    }
}

/// How [`Lifecycle::failed`] tells an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Every run the agent worked for ended: the coordinator may have exited
    /// on purpose.
    AfterRunsEnded,
    /// No session of this process ever got its welcome.
    NeverJoined,
    /// The coordinator went away with a run open.
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{GlobalMeta, StateDir};
    use fedcart_common::model::mf::{MfData, UserState};
    use fedcart_common::model::sgd::SgdParams;
    use fedcart_common::task::{ModelSpec, TaskKind};

    /// Losing the coordinator is told quietly ("since the runs … ended")
    /// only when no run the agent works for is open: a stopped or finished
    /// run elsewhere in the store made a restart in the middle of another
    /// run read as the run having ended, and "reconnected" never followed.
    #[test]
    fn an_outage_is_quiet_only_once_every_run_the_agent_works_for_ended() {
        let ended = |run: &str| pb::RunEnded {
            run_id: run.into(),
            model_version: 3,
            stopped: String::new(),
            served_version: 3,
        };
        let mut life = Lifecycle::default();
        assert_eq!(life.outage_kind(), Outage::NeverJoined);
        // Welcomed to a run that finished long ago, as the store says
        // right after the welcome, then given tasks of another.
        life.joined("churn-1", "https://c");
        assert!(
            life.run_ended(&ended("churn-1")),
            "its own run's end is said"
        );
        assert_eq!(life.outage_kind(), Outage::AfterRunsEnded);
        life.working("long-1");
        assert_eq!(life.outage_kind(), Outage::Lost);
        // Another run's end changes nothing (and is not logged as news);
        // its own does.
        assert!(!life.run_ended(&ended("r-other")));
        assert_eq!(life.outage_kind(), Outage::Lost);
        assert!(life.run_ended(&ended("long-1")));
        assert_eq!(life.outage_kind(), Outage::AfterRunsEnded);
        // A task of an ended run (its hand-out) does not reopen it.
        life.working("long-1");
        assert_eq!(life.outage_kind(), Outage::AfterRunsEnded);
    }

    /// The top-level user factors are saved when a version is served, the
    /// run's own after every task: a restart mid-run resumed from the
    /// served version's (36 rounds old in a probe), and a run's file that
    /// did not read was replaced by fresh factors without a word.
    #[test]
    fn a_restart_mid_run_resumes_the_runs_own_user_factors() {
        let dir = tempfile::tempdir().unwrap();
        let top = StateDir::open(dir.path()).unwrap();
        let meta = GlobalMeta {
            run_id: "rec".into(),
            version: 1,
            spec: TaskSpec {
                kind: TaskKind::Evaluate,
                model: ModelSpec::MfImplicit {
                    num_items: 4,
                    factors: 2,
                    hyper: Default::default(),
                },
                sgd: SgdParams::default(),
                seed: 1,
                round: 1,
                standardizer: None,
                dp: None,
                best_version: Some(1),
            },
            sha256: None,
        };
        top.save_global(&meta, &[0.0; 8]).unwrap();
        let users = |seed| UserState {
            k: 2,
            seed,
            users: vec!["a".into()],
            ..Default::default()
        };
        top.save_users(&users(1)).unwrap();
        top.run("rec").unwrap().save_users(&users(37)).unwrap();
        let data = || LocalData {
            mf: Some(MfData {
                users: vec!["a".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let agent = Agent::new("http://127.0.0.1:1", data())
            .with_state(StateDir::open(dir.path()).unwrap())
            .unwrap();
        assert_eq!(agent.data.mf.as_ref().unwrap().state.seed, 37);
        assert_eq!(agent.users_of.as_deref(), Some("rec"));
        let damaged = dir.path().join("runs/rec/mf-users.json");
        std::fs::write(&damaged, "{\"k\": 2, \"se").unwrap();
        let e = Agent::new("http://127.0.0.1:1", data())
            .with_state(StateDir::open(dir.path()).unwrap())
            .err()
            .expect("a damaged file is named");
        assert!(e.to_string().contains("mf-users.json"), "{e}");
        let e = AgentError::State(e);
        assert!(e.is_permanent());
        assert!(
            e.what_to_fix().unwrap().contains("damaged or unreadable"),
            "{e}"
        );
    }

    /// A data file replaced while the agent runs is named once per run: the
    /// agent trains on the data as read at start.
    #[test]
    fn a_data_file_changed_since_the_start_is_named_once_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("orders.csv");
        std::fs::write(&export, "customer,item\na,1\n").unwrap();
        let mut agent = Agent::new("http://127.0.0.1:1", LocalData::default());
        agent.sources = vec![(export.clone(), FileStamp::of(&export))];
        assert!(agent.changed_sources("r1").is_empty());
        std::fs::write(&export, "customer,item\na,1\nb,2\n").unwrap();
        assert!(
            agent.changed_sources("r1").is_empty(),
            "checked once per run"
        );
        assert_eq!(agent.changed_sources("r2"), [export.as_path()]);
        assert!(agent.changed_sources("r2").is_empty());
        std::fs::remove_file(&export).unwrap();
        assert_eq!(agent.changed_sources("r3"), [export.as_path()]);
    }
}
