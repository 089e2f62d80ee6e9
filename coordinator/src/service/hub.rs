//! The runs one coordinator hosts: a registry of per-run [`Shared`] states
//! (each an [`Engine`] over its own sub-tree of the one store) and the agent
//! sessions they all share.
//!
//! An agent joins once; its `Join` stream carries the work of every run its
//! data can serve (every message names its run). Each run has its own task
//! loop ([`super::run_tasks`]); a run that ends leaves the others and the
//! sessions alone, and stays listed with its versions and history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tonic::Status;

use super::{AgentEntry, Shared};
use crate::config::{RunConfig, Schedule};
use crate::engine::{Engine, EngineError};
use crate::store::{RunEntry, StoreError, StoreFile};

/// Why a run could not be submitted, found or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A run with this id exists already (finished runs stay in the store).
    #[error("run `{0}` exists already in this coordinator's store: choose another run_id")]
    Exists(String),
    /// No run has this id.
    #[error("no run `{run}` on this coordinator (runs: {known})")]
    Unknown {
        /// The id asked for.
        run: String,
        /// The ids there are, comma-separated.
        known: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run could not be opened.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<HubError> for Status {
    fn from(e: HubError) -> Self {
        let msg = e.to_string();
        match e {
            HubError::Exists(_) => Status::already_exists(msg),
            HubError::Unknown { .. } => Status::not_found(msg),
            HubError::Store(_) | HubError::Engine(_) => Status::internal(msg),
        }
    }
}

/// Starts a run's task loop; given by the server, which owns the loops'
/// lifetimes.
pub type Starter = Arc<dyn Fn(Arc<Shared>) + Send + Sync>;

/// One hosted run.
struct Hosted {
    entry: RunEntry,
    shared: Arc<Shared>,
}

/// A run as `runs list/show`, `/api/status` and the dashboard show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// The run's id.
    pub run_id: String,
    /// Model family.
    pub model: String,
    /// "waiting for agents", the open task, "finished" or "stopped: …".
    pub phase: String,
    /// Latest committed version (round X of `rounds`).
    pub model_version: u64,
    /// Training rounds the run has.
    pub rounds: u64,
    /// True once it ended (all rounds, or stopped).
    pub finished: bool,
    /// Why it stopped before its last round, if it did.
    pub stopped: Option<String>,
    /// The version merchants are served, once one was evaluated.
    pub best_version: Option<u64>,
    /// When it was submitted (ms since the Unix epoch; 0 if unknown).
    pub submitted_unix_ms: i64,
    /// Connected merchants whose data serves its model.
    pub eligible_agents: usize,
    /// Merchants a task needs before it starts.
    pub needed: usize,
    /// The run it continues from (scheduled retraining), if any.
    pub continues: Option<String>,
    /// With differential privacy: ε spent so far (after its first released
    /// round) and the δ it holds at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// δ of `epsilon`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

/// Every run of one coordinator, and the sessions they share.
pub struct Hub {
    file: StoreFile,
    runs: Mutex<Vec<Hosted>>,
    /// The run `serve --config` submitted (the default of `Status`).
    primary: Mutex<Option<String>>,
    pub(super) sessions: Arc<Mutex<HashMap<String, AgentEntry>>>,
    pub(super) closing: Arc<watch::Sender<bool>>,
    pub(super) ping_interval: Duration,
    upload_idle: Duration,
    /// Bumped when a run is added or ends.
    runs_changed: watch::Sender<u64>,
    /// Scheduled instances waiting for their time.
    pending: AtomicUsize,
    /// Held while a schedule is checked and its next instance registered,
    /// or the schedule ended: `runs stop` and a due instance never both win.
    schedules: Mutex<()>,
    /// The tasks waiting out a schedule, and each Join stream's keep-alive
    /// task: a shutdown joins them, so that their reference to the hub (and
    /// its store) is gone when it returns.
    waiters: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Task loops running (a loop counts until its run's next instance,
    /// if any, is scheduled).
    active: AtomicUsize,
    /// Starts task loops, and the shutdown signal scheduled waits end on
    /// (set once by the server).
    starter: OnceLock<(Starter, watch::Receiver<bool>)>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Hub {
    /// Opens every run registered in `file` (finished ones too, for their
    /// views); the caller starts the task loops of those not finished.
    pub fn open(
        file: StoreFile,
        ping_interval: Duration,
        upload_idle: Duration,
    ) -> Result<Arc<Self>, HubError> {
        let hub = Arc::new(Self {
            file,
            runs: Mutex::new(Vec::new()),
            primary: Mutex::new(None),
            sessions: Arc::default(),
            closing: Arc::new(watch::channel(false).0),
            ping_interval,
            upload_idle,
            runs_changed: watch::channel(0).0,
            pending: AtomicUsize::new(0),
            schedules: Mutex::new(()),
            waiters: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            starter: OnceLock::new(),
        });
        for entry in hub.file.runs()? {
            let store = hub.file.run(&entry)?;
            // Registered, but the submission stopped before the run's
            // configuration was written (the coordinator killed in between):
            // nothing of it was committed, and resuming it failed the whole
            // store for good. It leaves the registry, saying so.
            if store
                .meta_json::<serde_json::Value>("run_config")?
                .is_none()
            {
                tracing::warn!(run = %entry.run_id,
                    "a submitted run that never started (the coordinator stopped before its \
                     configuration was stored; nothing of it was committed) is taken out of \
                     the store's registry: submit it again");
                hub.file.unregister(&entry.run_id)?;
                continue;
            }
            // A stored run the engine refuses (one that predates a check,
            // such as a model too large to allocate) is left out with an
            // error naming it; the store keeps it, and the other runs are
            // served.
            match Engine::resume(store) {
                Ok(engine) => {
                    hub.add(entry, engine);
                }
                Err(EngineError::Config(reason)) => {
                    tracing::error!(run = %entry.run_id, %reason, "stored run left out: it cannot be opened");
                }
                // A damaged record of one run (its history, its stop, its
                // best version) kept the coordinator from starting for every
                // run. That run is left out and named; the store keeps its
                // bytes for a restore, and the other runs are served. Damage
                // to what every run shares (the registry, the file's pages)
                // still stops the start.
                Err(EngineError::Store(e @ StoreError::Corrupt { .. })) => {
                    tracing::error!(run = %entry.run_id, reason = %e,
                        "stored run left out: one of its records is damaged; the other runs are \
                         served");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(hub)
    }

    fn add(&self, entry: RunEntry, engine: Engine) -> Arc<Shared> {
        let shared = Shared::with_sessions(
            engine,
            self.upload_idle,
            Arc::clone(&self.sessions),
            Arc::clone(&self.closing),
        );
        self.hosted().push(Hosted {
            entry,
            shared: Arc::clone(&shared),
        });
        self.runs_changed.send_modify(|v| *v += 1);
        shared
    }

    fn hosted(&self) -> std::sync::MutexGuard<'_, Vec<Hosted>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits `run` (with its retraining `schedule`, if any): a new run
    /// gets its sub-tree and version 0; `resume` accepts an id the store
    /// holds already (then the stored run goes on, as `serve --config` has
    /// always done), otherwise it is refused. Returns the run's state and
    /// whether it is new.
    pub fn submit(
        &self,
        run: RunConfig,
        resume: bool,
        schedule: Option<Schedule>,
    ) -> Result<(Arc<Shared>, bool), HubError> {
        let hosted = self
            .hosted()
            .iter()
            .find(|h| h.entry.run_id == run.run_id)
            .map(|h| Arc::clone(&h.shared));
        if let Some(shared) = hosted {
            if resume {
                // Compared without the runs' lock held.
                crate::engine::warn_if_changed(&shared.run_config(), &run);
                return Ok((shared, false));
            }
            return Err(HubError::Exists(run.run_id));
        }
        let entry = self
            .file
            .register(&run.run_id, now_ms(), None, schedule, 1)?;
        let engine = Engine::open(self.file.run(&entry)?, run)?;
        tracing::info!(run = %entry.run_id, "run submitted");
        Ok((self.add(entry, engine), true))
    }

    /// Sets how task loops start and the shutdown signal; called once by
    /// the server before any loop starts.
    pub fn set_starter(&self, starter: Starter, shutdown: watch::Receiver<bool>) {
        let _ = self.starter.set((starter, shutdown));
    }

    /// A run's task loop ended: when it finished (or stopped early on
    /// its validation metric) and its schedule allows another instance not
    /// yet submitted, that instance starts `schedule.every` later from this
    /// one's served version. A restart restarts the wait.
    pub fn after_end(self: &Arc<Self>, run_id: &str) {
        let Some((starter, shutdown)) = self.starter.get().cloned() else {
            return;
        };
        let Some((entry, shared)) = self
            .hosted()
            .iter()
            .find(|h| h.entry.run_id == run_id)
            .map(|h| (h.entry.clone(), Arc::clone(&h.shared)))
        else {
            return;
        };
        let clean = matches!(
            shared.stopped(),
            None | Some(crate::engine::RunStop::EarlyStopped { .. })
        );
        let next_id = entry.next_id();
        if !shared.engine().finished() || !clean || !entry.repeats() {
            return;
        }
        if self.get(&next_id).is_ok() {
            // Started before a restart: nothing to do. Taken by a run the
            // operator submitted under that id: the schedule cannot go on.
            if self.entry(&next_id).continues.as_deref() != Some(run_id) {
                tracing::error!(run = %run_id, next = %next_id,
                    "scheduled retraining: the next instance's id is taken by another run, so \
                     the schedule ends; submit the run again under another id to go on");
            }
            return;
        }
        let every = Duration::from_millis(entry.schedule.as_ref().map_or(0, |s| s.every_ms));
        self.pending.fetch_add(1, Ordering::SeqCst);
        let hub = Arc::clone(self);
        tracing::info!(run = %run_id, next = %next_id, ?every, "scheduled retraining: next instance waits");
        let mut changed = self.runs_changed.subscribe();
        let waiter = tokio::spawn(async move {
            let mut shutdown = shutdown;
            let ended = |hub: &Hub| !hub.entry(&entry.run_id).repeats();
            let due = tokio::select! {
                _ = tokio::time::sleep(every) => true,
                _ = shutdown.wait_for(|v| *v) => false,
                // The operator ended the schedule (`runs stop`).
                _ = changed.wait_for(|_| ended(&hub)) => false,
            };
            if due {
                let next = {
                    let _schedules = hub.schedules.lock().unwrap_or_else(|p| p.into_inner());
                    (!ended(&hub)).then(|| hub.submit_next(&entry, &shared, next_id))
                };
                match next {
                    Some(Ok(next)) => starter(next),
                    Some(Err(e)) => tracing::error!(run = %entry.run_id, error = %e,
                        "scheduled retraining: the next instance could not start"),
                    None => {}
                }
            }
            hub.pending.fetch_sub(1, Ordering::SeqCst);
            hub.notify();
        });
        self.track(waiter);
    }

    /// Keeps `task`, which holds the hub, for [`Hub::join_waiters`].
    pub(crate) fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.retain(|w| !w.is_finished());
        waiters.push(task);
    }

    /// Waits for the tasks waiting out a schedule and the keep-alive tasks
    /// to end (after the shutdown signal and [`Hub::close`], which end them).
    pub async fn join_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiters {
            let _ = w.await;
        }
    }

    /// Submits the instance after `prev`: its configuration with the new
    /// id, version 0 the previous instance's served version.
    fn submit_next(
        &self,
        prev: &RunEntry,
        shared: &Shared,
        next_id: String,
    ) -> Result<Arc<Shared>, HubError> {
        // An id registered meanwhile (the operator submitted a run under
        // it while this one waited) is another run: opening it again ran
        // two engines on one run's tables.
        if self.file.runs()?.iter().any(|e| e.run_id == next_id) {
            return Err(HubError::Exists(next_id));
        }
        let mut run = shared.run_config();
        run.run_id = next_id;
        let (served, initial) = {
            let engine = shared.engine();
            let served = engine.best().map_or(engine.version(), |b| b.version);
            (served, engine.model(served)?)
        };
        let initial = initial.map(|m| m.as_ref().clone());
        let entry = self.file.register(
            &run.run_id,
            now_ms(),
            Some(prev.run_id.clone()),
            prev.schedule.clone(),
            prev.instance + 1,
        )?;
        let engine = Engine::open_from(self.file.run(&entry)?, run, initial)?;
        tracing::info!(run = %entry.run_id, from = %prev.run_id, version = served,
            "scheduled retraining: next instance submitted");
        Ok(self.add(entry, engine))
    }

    /// Marks `run_id` as the run `Status` describes by default.
    pub fn set_primary(&self, run_id: &str) {
        *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = Some(run_id.to_owned());
    }

    /// The run `Status` describes without a run id: the primary run, else
    /// the latest submitted.
    pub fn primary(&self) -> Option<Arc<Shared>> {
        let primary = self
            .primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let hosted = self.hosted();
        hosted
            .iter()
            .find(|h| Some(&h.entry.run_id) == primary.as_ref())
            .or_else(|| hosted.last())
            .map(|h| Arc::clone(&h.shared))
    }

    /// The run `run_id`.
    pub fn get(&self, run_id: &str) -> Result<Arc<Shared>, HubError> {
        let hosted = self.hosted();
        hosted
            .iter()
            .find(|h| h.entry.run_id == run_id)
            .map(|h| Arc::clone(&h.shared))
            .ok_or_else(|| HubError::Unknown {
                run: run_id.chars().take(140).collect(),
                known: hosted
                    .iter()
                    .map(|h| h.entry.run_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every run's state, in submission order.
    pub fn all(&self) -> Vec<Arc<Shared>> {
        self.hosted()
            .iter()
            .map(|h| Arc::clone(&h.shared))
            .collect()
    }

    /// Every run with its id, in submission order.
    pub fn runs(&self) -> Vec<(String, Arc<Shared>)> {
        self.hosted()
            .iter()
            .map(|h| (h.entry.run_id.clone(), Arc::clone(&h.shared)))
            .collect()
    }

    /// The run registry as stored (what a restart reads), in key order.
    pub fn stored_entries(&self) -> Result<Vec<RunEntry>, StoreError> {
        self.file.runs()
    }

    /// Ids of every run, in submission order.
    pub fn ids(&self) -> Vec<String> {
        self.hosted()
            .iter()
            .map(|h| h.entry.run_id.clone())
            .collect()
    }

    /// Summaries of every run, in submission order.
    pub fn summaries(&self) -> Vec<RunSummary> {
        let hosted: Vec<(RunEntry, Arc<Shared>)> = self
            .hosted()
            .iter()
            .map(|h| (h.entry.clone(), Arc::clone(&h.shared)))
            .collect();
        hosted.into_iter().map(|(e, s)| s.summary(&e)).collect()
    }

    /// The summary of `run_id`.
    pub fn summary(&self, run_id: &str) -> Result<RunSummary, HubError> {
        let shared = self.get(run_id)?;
        Ok(shared.summary(&self.entry(run_id)))
    }

    /// Stops `run_id` for operator `by` (see [`Engine::stop_by_operator`]).
    /// A run that already finished while its schedule waits to start the
    /// next instance has that schedule ended instead: the wait is cut
    /// short and no instance follows, across restarts too.
    pub fn stop(&self, run_id: &str, by: &str) -> Result<RunSummary, HubError> {
        let shared = self.get(run_id)?;
        if shared.engine().finished() {
            let _schedules = self.schedules.lock().unwrap_or_else(|p| p.into_inner());
            let entry = self.entry(run_id);
            if entry.repeats() && self.get(&entry.next_id()).is_err() {
                let ended = self.file.end_schedule(&entry, by)?;
                if let Some(h) = self.hosted().iter_mut().find(|h| h.entry.run_id == run_id) {
                    h.entry = ended;
                }
                self.runs_changed.send_modify(|v| *v += 1);
                tracing::warn!(run = %run_id, operator = %by, next = %entry.next_id(),
                    "schedule ended by the operator: no further instance starts");
            }
            return self.summary(run_id);
        }
        shared.stop_by_operator(by)?;
        tracing::warn!(run = %run_id, operator = %by, "run stopped by the operator");
        self.summary(run_id)
    }

    /// The registry entry of a hosted run.
    fn entry(&self, run_id: &str) -> RunEntry {
        self.hosted()
            .iter()
            .find(|h| h.entry.run_id == run_id)
            .map(|h| h.entry.clone())
            .expect("a hosted run; runs are never removed")
    }

    /// True when every hosted run has ended and no scheduled instance is
    /// waiting to start.
    pub fn all_ended(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
            && self.active.load(Ordering::SeqCst) == 0
            && self.hosted().iter().all(|h| h.shared.ended())
    }

    /// A task loop starts (see [`Hub::loop_ended`]).
    pub fn loop_started(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    /// A task loop ended, after [`Hub::after_end`] scheduled what follows.
    pub fn loop_ended(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.notify();
    }

    /// Waits until every hosted run has ended (a run submitted meanwhile is
    /// waited for too).
    pub async fn wait_all_ended(&self) {
        let mut changed = self.runs_changed.subscribe();
        loop {
            if self.all_ended() {
                return;
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Tells [`Hub::wait_all_ended`] that a run's state changed.
    pub fn notify(&self) {
        self.runs_changed.send_modify(|v| *v += 1);
    }

    /// The first run that failed, if any: its cause.
    pub fn failed(&self) -> Option<String> {
        self.hosted()
            .iter()
            .find_map(|h| h.shared.progress().borrow().failed.clone())
    }

    /// Graceful stop: every run announces its end if it finished, every
    /// session ends, uploads are refused.
    pub fn close(&self) {
        for s in self.all() {
            s.announce_end();
            s.close_uploads();
        }
        let _ = self.closing.send(true);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Longest silence allowed inside an upload.
    pub(super) fn upload_idle(&self) -> Duration {
        self.upload_idle
    }

    /// The merchant of a session.
    pub(super) fn merchant_of(&self, session_id: &str) -> Result<String, Status> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session_id)
            .map(|a| a.merchant_id.clone())
            .ok_or_else(|| {
                Status::unauthenticated(format!("unknown session `{session_id}`: join first"))
            })
    }

    /// A session ended: the merchant (unless connected again) is dropped
    /// from every run's open task.
    pub(super) fn remove_session(&self, session_id: &str) {
        let removed = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let removed = sessions.remove(session_id);
            removed.map(|e| {
                let still = sessions.values().any(|a| a.merchant_id == e.merchant_id);
                (e.merchant_id, still)
            })
        };
        let Some((merchant, still_connected)) = removed else {
            return;
        };
        tracing::info!(%merchant, "agent left");
        for s in self.all() {
            if !still_connected {
                s.engine().drop_agent(&merchant);
            }
            s.bump();
        }
    }

    /// Ends the sessions `refusal` now refuses (see
    /// [`Shared::close_refused`]), in every run.
    pub fn close_refused(&self, refusal: impl Fn(&str, Option<&str>) -> Option<&'static str>) {
        let closed = Shared::close_sessions(&self.sessions, refusal);
        if closed.is_empty() {
            return;
        }
        for s in self.all() {
            for m in &closed {
                s.engine().drop_agent(m);
            }
            s.bump();
        }
    }

    /// Something every run's task loop may wait on changed (an agent joined).
    pub(super) fn bump_all(&self) {
        for s in self.all() {
            s.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcart_common::task::ModelSpec;

    /// A stored run the engine now refuses (a model too large to allocate,
    /// stored before the check) no longer keeps the coordinator from
    /// starting: it is left out, and the other runs are served.
    #[test]
    fn a_stored_run_that_cannot_be_opened_is_left_out_and_the_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let run = |id: &str| {
            let cfg = dir.path().join("coordinator.toml");
            std::fs::write(&cfg, include_str!("../../examples/coordinator.toml")).unwrap();
            let mut run = crate::config::CoordinatorConfig::load(&cfg).unwrap().run;
            run.run_id = id.into();
            run
        };
        let good = run("good");
        let mut bad = run("bad");
        {
            let file = StoreFile::open(&path).unwrap();
            let entry = file.register("good", 1, None, None, 1).unwrap();
            Engine::open(file.run(&entry).unwrap(), good).unwrap();
            let entry = file.register("bad", 2, None, None, 1).unwrap();
            bad.model = ModelSpec::MfImplicit {
                num_items: 4_000_000_000,
                factors: 64,
                hyper: Default::default(),
            };
            let json = serde_json::to_value(&bad).unwrap();
            file.run(&entry)
                .unwrap()
                .put_meta_json(&[("run_config", json)])
                .unwrap();
        }
        let file = StoreFile::open(&path).unwrap();
        let hub = Hub::open(file, Duration::from_secs(10), Duration::from_secs(10)).unwrap();
        assert_eq!(hub.ids(), ["good"]);
    }

    /// One finished run's damaged record (here its stop) kept the
    /// coordinator from starting for every run. That run is left out, the
    /// others are served, and the damaged run's id cannot be taken by a new
    /// submission: it still refuses, naming the damage.
    #[test]
    fn a_run_with_a_damaged_record_is_left_out_and_the_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let cfg = dir.path().join("coordinator.toml");
        std::fs::write(&cfg, include_str!("../../examples/coordinator.toml")).unwrap();
        let base = crate::config::CoordinatorConfig::load(&cfg).unwrap().run;
        let named = |id: &str| {
            let mut run = base.clone();
            run.run_id = id.into();
            run
        };
        {
            let file = StoreFile::open(&path).unwrap();
            for (order, id) in ["first", "damaged", "last"].into_iter().enumerate() {
                let entry = file.register(id, order as i64 + 1, None, None, 1).unwrap();
                Engine::open(file.run(&entry).unwrap(), named(id)).unwrap();
            }
            let entry = file.register("damaged", 2, None, None, 1).unwrap();
            file.run(&entry)
                .unwrap()
                .put_meta_json(&[("stopped", serde_json::json!("not a stop"))])
                .unwrap();
        }
        let file = StoreFile::open(&path).unwrap();
        let hub = Hub::open(file, Duration::from_secs(10), Duration::from_secs(10)).unwrap();
        assert_eq!(hub.ids(), ["first", "last"]);
        let Err(refused) = hub.submit(named("damaged"), false, None) else {
            panic!("the damaged run's id was taken by a new submission");
        };
        let shown = refused.to_string();
        assert!(shown.contains("corrupt meta `stopped`"), "{shown}");
        assert!(shown.contains(&path.display().to_string()), "{shown}");
        assert_eq!(hub.ids(), ["first", "last"]);
    }

    /// A coordinator killed between registering a submitted run and storing
    /// its configuration left a store it never opened again ("a registered
    /// run without its configuration"). Such a run, with nothing committed,
    /// leaves the registry; the others are served, and the id can be
    /// submitted again.
    #[test]
    fn a_run_registered_without_its_configuration_leaves_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let cfg = dir.path().join("coordinator.toml");
        std::fs::write(&cfg, include_str!("../../examples/coordinator.toml")).unwrap();
        let mut good = crate::config::CoordinatorConfig::load(&cfg).unwrap().run;
        good.run_id = "good".into();
        {
            let file = StoreFile::open(&path).unwrap();
            let entry = file.register("good", 1, None, None, 1).unwrap();
            Engine::open(file.run(&entry).unwrap(), good.clone()).unwrap();
            // Killed right after this.
            file.register("g44", 2, None, None, 1).unwrap();
        }
        let file = StoreFile::open(&path).unwrap();
        let hub = Hub::open(file, Duration::from_secs(10), Duration::from_secs(10)).unwrap();
        assert_eq!(hub.ids(), ["good"]);
        let mut again = good;
        again.run_id = "g44".into();
        let (_, new) = hub.submit(again, false, None).unwrap();
        assert!(new);
        assert_eq!(hub.ids(), ["good", "g44"]);
    }

    /// The operator submitted `wk.2` while `wk`'s next instance waited:
    /// the instance opened a second engine on that run's tables (two task
    /// loops, and the finished run stored as stopped). It is refused.
    #[test]
    fn a_scheduled_instance_whose_id_was_taken_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("coordinator.toml");
        std::fs::write(&cfg, include_str!("../../examples/coordinator.toml")).unwrap();
        let mut run = crate::config::CoordinatorConfig::load(&cfg).unwrap().run;
        run.run_id = "wk".into();
        let file = StoreFile::open(&dir.path().join("c.redb")).unwrap();
        let hub = Hub::open(file, Duration::from_secs(10), Duration::from_secs(10)).unwrap();
        let schedule = Schedule {
            every_ms: 8_000,
            repeat: Some(1),
        };
        let (first, _) = hub.submit(run.clone(), false, Some(schedule)).unwrap();
        let mut operators = run;
        operators.run_id = "wk.2".into();
        hub.submit(operators, false, None).unwrap();
        let entry = hub.entry("wk");
        assert_eq!(entry.next_id(), "wk.2");
        let e = hub
            .submit_next(&entry, &first, entry.next_id())
            .err()
            .expect("the id is taken");
        assert!(matches!(e, HubError::Exists(ref id) if id == "wk.2"), "{e}");
        assert_eq!(hub.ids(), ["wk", "wk.2"]);
    }
}
