//! The gRPC driver of the round engine: the `fedcart.v1.Coordinator` service,
//! the registry of connected agents, and the loop that runs tasks.
//!
//! Agents keep a `Join` stream open; the coordinator pushes tasks and
//! keepalive pings over it. A closed stream removes the agent and counts it as
//! dropped for the open task. Uploads are streamed; at most `UPLOAD_SLOTS`
//! payloads are buffered at once, so memory stays O(model size) however many
//! agents report together. A slot is taken only once payload data arrives,
//! each merchant has at most one upload in flight, and an upload that stays
//! silent for the idle timeout is cut, so header-only streams cannot starve
//! honest uploads. When the access list revokes a merchant, its Join stream
//! ends with `PERMISSION_DENIED` and it is dropped from the open task.

pub mod admin;
mod convert;
pub mod hub;
mod rows;
mod secure;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use fedcart_common::federation::update::Update;
use fedcart_common::task::TaskKind;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use futures::Stream;
use tokio::sync::{Semaphore, SemaphorePermit, mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Engine, EngineError, RunStop, Submission, SubmitError};

/// Bytes per model download chunk: well under gRPC's 4 MiB default limit.
pub const MODEL_CHUNK_BYTES: usize = 1 << 20;

/// Largest upload chunk accepted; agents send chunks of this size
/// (`fedcart_client::transfer::UPLOAD_CHUNK_BYTES`), so an update of up to
/// half a million floats is one message.
pub const MAX_UPLOAD_CHUNK_BYTES: usize = 2 << 20;

/// How many update payloads may be buffered at once. Each is validated as a
/// whole before it is folded in (a NaN found late must not leave half an
/// update in the sum), so this bounds the coordinator's memory to a few
/// model sizes.
const UPLOAD_SLOTS: usize = 4;

/// Queue length of each agent's Join stream.
const WORK_QUEUE: usize = 64;

/// Progress notifications for drivers, tests and the status view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Latest committed version.
    pub version: u64,
    /// History records written so far in this process.
    pub records: u64,
    /// Number of connected agents.
    pub agents: usize,
    /// The open task id, if any.
    pub open_task: Option<String>,
    /// True once the run has finished (all rounds, or stopped early).
    pub finished: bool,
    /// Uploads in flight (header accepted, payload not yet folded in).
    pub uploads: usize,
    /// Why the task loop failed, if it did: the coordinator no longer runs
    /// rounds, reports itself not ready and `serve` exits non-zero.
    pub failed: Option<String>,
    /// Why the run stopped before its last round, if it did.
    pub stopped: Option<String>,
}

pub(crate) struct AgentEntry {
    merchant_id: String,
    /// Examples per data family the agent advertised when it joined: it
    /// is selected for the runs whose model one of them serves.
    examples: HashMap<String, u64>,
    /// Serial of the certificate the session joined with (`None` in
    /// plaintext mode): revoking it closes the session.
    serial: Option<String>,
    tx: mpsc::Sender<Result<pb::Work, Status>>,
    /// Ends the Join stream with a status (revocation); dropping it
    /// without sending leaves the stream to end on its own.
    kill: Option<oneshot::Sender<Status>>,
}

/// State shared by the service handlers and the task loop.
pub struct Shared {
    engine: Mutex<Engine>,
    /// The agent sessions, shared by every run of the coordinator.
    agents: Arc<Mutex<HashMap<String, AgentEntry>>>,
    /// Bumped whenever something the task loop waits on changes.
    changed: watch::Sender<u64>,
    progress: watch::Sender<Progress>,
    upload_slots: Semaphore,
    /// Merchants with an upload in flight: one at a time each.
    uploading: Mutex<HashSet<String>>,
    /// Longest silence allowed inside an upload (before the header, between
    /// chunks) before it is cut.
    upload_idle: Duration,
    /// Set when the coordinator shuts down: every Join stream ends.
    closing: Arc<watch::Sender<bool>>,
    /// The secure-aggregation round of the open task, if it is secure.
    secure: Mutex<Option<secure::SecureRound>>,
    /// The little-endian bytes of the last model version downloaded: every
    /// agent of a round downloads the same version, and each chunk sent is a
    /// slice of these shared bytes instead of a fresh conversion per agent.
    model_bytes: Mutex<Option<(u64, Bytes)>>,
    /// The SHA-256 of the latest model versions tasks named or agents held
    /// ([`Shared::digest_of`]), at most [`DIGESTS_KEPT`].
    model_digests: Mutex<BTreeMap<u64, [u8; 32]>>,
    /// The merchants any round of the run selected, read from its history
    /// as records are appended ([`Shared::ever_selected`]).
    selected_ever: Mutex<SelectedEver>,
}

/// The merchants the history's records selected, up to a key.
#[derive(Debug, Default)]
struct SelectedEver {
    /// The first history key not read yet.
    next: u64,
    /// Every merchant a record read so far selected.
    merchants: HashSet<String>,
}

type WorkStream = Pin<Box<dyn Stream<Item = Result<pb::Work, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn new_session_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Shared {
    /// Wraps an opened engine, as one run of a [`hub::Hub`]: the agent
    /// sessions and the closing signal are the hub's; `upload_idle` is the
    /// longest silence allowed inside an upload (see
    /// [`crate::limits::Limits::upload_idle_timeout`]).
    pub(crate) fn with_sessions(
        engine: Engine,
        upload_idle: Duration,
        agents: Arc<Mutex<HashMap<String, AgentEntry>>>,
        closing: Arc<watch::Sender<bool>>,
    ) -> Arc<Self> {
        let progress = Progress {
            version: engine.version(),
            finished: engine.finished(),
            stopped: engine.stopped().map(|s| s.to_string()),
            ..Default::default()
        };
        Arc::new(Self {
            engine: Mutex::new(engine),
            agents,
            changed: watch::channel(0).0,
            progress: watch::channel(progress).0,
            upload_slots: Semaphore::new(UPLOAD_SLOTS),
            uploading: Mutex::new(HashSet::new()),
            upload_idle,
            closing,
            secure: Mutex::new(None),
            model_bytes: Mutex::new(None),
            model_digests: Mutex::new(BTreeMap::new()),
            selected_ever: Mutex::new(SelectedEver::default()),
        })
    }

    /// Whether any round of the run selected `merchant`, reading only the
    /// history records appended since the last call. `Status` decoded the
    /// whole history under the engine's lock on every call, so that any
    /// certified merchant calling it in a loop, even one outside the run,
    /// slowed the run 7–9× (found by a penetration probe).
    fn ever_selected(&self, store: &crate::store::Store, merchant: &str) -> Result<bool, Status> {
        let mut seen = self.selected_ever.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = store
            .history_from(seen.next)
            .map_err(|e| Status::internal(e.to_string()))?;
        for (key, record) in fresh {
            seen.next = key + 1;
            seen.merchants.extend(record.selected);
        }
        Ok(seen.merchants.contains(merchant))
    }

    /// Stops accepting uploads for this run (shutdown).
    fn close_uploads(&self) {
        self.upload_slots.close();
    }

    /// True once the run has ended (all rounds, stopped) or its task loop
    /// failed.
    pub fn ended(&self) -> bool {
        let p = self.progress.borrow();
        p.finished || p.failed.is_some()
    }

    /// Stops the run for an operator (see [`Engine::stop_by_operator`]);
    /// its task loop ends at its next step.
    pub fn stop_by_operator(&self, by: &str) -> Result<(), EngineError> {
        let stopping_secure = self.engine().open_task().is_some_and(|p| p.secure);
        if stopping_secure {
            // The secure session of the abandoned task is dropped unread.
            *self.secure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.engine().stop_by_operator(by)?;
        self.bump();
        Ok(())
    }

    /// The run's phase as `Status` and the runs list show it, with why the
    /// round in hand is being retried, if it is.
    pub fn phase(&self) -> String {
        let phase = self.bare_phase();
        with_retry(&self.engine(), phase)
    }

    /// The run's phase as a merchant may read it: what the run is doing,
    /// without who else is connected, set aside or missing, how many can
    /// serve it, or what other merchants' refused results said (the
    /// operator's phase, [`Shared::summary`], names them).
    pub fn merchant_phase(&self, id: &str) -> String {
        let mut phase = self.phase_with(RunStop::for_merchants);
        let engine = self.engine();
        if let Some(why) = engine.retrying_for_merchants() {
            phase.push_str(&format!("; {why}"));
        }
        // Its own exclusion: the honest end of an accusation read only
        // "waiting for agents" while the run went on without it.
        if engine.proven_forger(id) {
            phase.push_str(&format!(
                "; merchant `{id}` is set aside for the rest of this run: a share its agent \
                 revealed at a secure round's unmask stage was proven forged by the other \
                 holders' shares"
            ));
        } else if engine.set_aside().contains(id) {
            phase.push_str(&format!(
                "; merchant `{id}` is set aside for the rest of this run: a share bundle between \
                 it and another merchant failed authentication in a secure round"
            ));
        } else if let Some(why) = engine.declined().get(id) {
            phase.push_str(&format!(
                "; merchant `{id}` declined this run's tasks ({why}): until its agent joins \
                 again it is drawn only when the other merchants cannot fill a task (restart it \
                 once its data or policy fits the run)"
            ));
        }
        phase
    }

    fn bare_phase(&self) -> String {
        self.phase_with(RunStop::to_string)
    }

    /// What the run is doing, its stop told by `stop`.
    fn phase_with(&self, stop: impl Fn(&RunStop) -> String) -> String {
        let engine = self.engine();
        match (engine.stopped(), engine.finished(), engine.open_task()) {
            // A planned stop still hands the served version out first.
            (Some(s), false, _) => match engine.next_task() {
                Some((v, _)) => {
                    format!(
                        "stopped: {}; handing version {v} out before it ends",
                        stop(s)
                    )
                }
                None => format!("stopped: {}", stop(s)),
            },
            (Some(s), true, _) => format!("stopped: {}", stop(s)),
            (None, true, _) => "finished".into(),
            (None, false, Some(p)) => p.task_id.clone(),
            (None, false, None) => "waiting for agents".into(),
        }
    }

    /// The run's summary for the runs list.
    pub fn summary(&self, entry: &crate::store::RunEntry) -> hub::RunSummary {
        let mut phase = self.bare_phase();
        if let Some(by) = &entry.schedule_ended_by {
            phase.push_str(&format!("; schedule ended by {by}"));
        }
        let eligible = self.eligible();
        let eligible_agents = eligible.len();
        let connected = self.connected();
        let engine = self.engine();
        let run = engine.run();
        let needed = run.selection.min_agents.max(run.selection.min_available);
        if phase == "waiting for agents" {
            // Say why a run with agents connected does not start.
            let family = run.model.data_family();
            let shown = |list: &[&String]| {
                let mut text: Vec<&str> = list.iter().take(5).map(|m| m.as_str()).collect();
                if list.len() > 5 {
                    text.push("…");
                }
                text.join(", ")
            };
            let without: Vec<&String> = connected
                .iter()
                .filter(|m| eligible.binary_search(m).is_err())
                .collect();
            let aside: Vec<&String> = engine
                .set_aside()
                .iter()
                .filter(|m| eligible.binary_search(m).is_ok())
                .collect();
            // Connected merchants that declined the run's tasks for a
            // lasting cause cannot serve it (they were counted as able to
            // while every round aborted on them); they are drawn only when
            // the others cannot fill a task.
            let declining: Vec<(&String, &String)> = engine
                .declined()
                .iter()
                .filter(|(m, _)| {
                    eligible.binary_search(m).is_ok() && !engine.set_aside().contains(*m)
                })
                .collect();
            let can = eligible_agents - aside.len() - declining.len();
            phase = if can >= needed {
                // Enough of them: read between two tasks (or before the
                // first), the loop is starting one; "waiting for agents:
                // 3 of 3 needed" read as a contradiction.
                format!("starting the next task ({can} of {needed} needed can serve it)")
            } else if can + declining.len() >= needed {
                format!(
                    "starting the next task, which merchants declining the run's tasks must fill \
                     ({can} of {needed} needed can serve it)"
                )
            } else {
                format!("waiting for agents: {can} of {needed} needed can serve it")
            };
            if !without.is_empty() {
                phase.push_str(&format!(
                    "; connected without {family} data: {}",
                    shown(&without)
                ));
            }
            if !declining.is_empty() {
                let mut named: Vec<String> = declining
                    .iter()
                    .take(5)
                    .map(|(m, why)| format!("{m} ({why})"))
                    .collect();
                if declining.len() > 5 {
                    named.push("…".into());
                }
                phase.push_str(&format!(
                    "; declining this run's tasks until their agent joins again: {}",
                    named.join(", ")
                ));
            }
            if !aside.is_empty() {
                phase.push_str(&format!(
                    "; set aside for the rest of the run: {}",
                    shown(&aside)
                ));
                // The merchants set aside never come back to this run: said
                // so, the wait read as if their reconnecting would end it.
                if can < needed {
                    phase.push_str(&format!(
                        " (they do not count again: the run goes on only when {} more \
                         merchant{} that can serve it join{}; `runs stop` ends it)",
                        needed - can,
                        if needed - can == 1 { "" } else { "s" },
                        if needed - can == 1 { "s" } else { "" },
                    ));
                }
            }
            // A round retried over exactly the merchants of a sum that may
            // have been unmasked waits for each of them: name those missing.
            if let Some(pinned) = engine.pinned_merchants() {
                let missing: Vec<&String> = pinned
                    .iter()
                    .filter(|m| eligible.binary_search(m).is_err())
                    .collect();
                if !missing.is_empty() {
                    phase = format!(
                        "waiting for {} of the {} merchants of a sum that may have been \
                         unmasked before a restart (the round is retried over exactly them; \
                         `runs stop` ends the run): {}",
                        missing.len(),
                        pinned.len(),
                        shown(&missing)
                    );
                }
            }
        }
        let phase = with_retry(&engine, phase);
        hub::RunSummary {
            run_id: run.run_id.clone(),
            model: run.model.name().to_owned(),
            phase,
            model_version: engine.version(),
            rounds: run.rounds,
            finished: engine.finished(),
            stopped: engine.stopped().map(|s| s.to_string()),
            best_version: served_best(&engine),
            submitted_unix_ms: entry.submitted_unix_ms,
            eligible_agents,
            needed,
            continues: entry.continues.clone(),
            epsilon: engine.ledger().and_then(|l| l.epsilon()),
            delta: engine.ledger().map(|l| l.settings().delta),
        }
    }

    /// Connected merchants whose data serves this run's model: those that
    /// advertised examples of its data family (and, for models that need
    /// no data, and agents that advertised nothing, every one).
    pub fn eligible(&self) -> Vec<String> {
        let family = self.engine().run().model.data_family();
        let mut v: Vec<String> = self
            .agents()
            .values()
            .filter(|a| {
                family == "noop"
                    || a.examples.is_empty()
                    || a.examples.get(family).is_some_and(|n| *n > 0)
            })
            .map(|a| a.merchant_id.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Ends every agent's Join stream, so a graceful shutdown does not wait
    /// for agents to hang up first; if the run has finished, each stream
    /// carries `RunEnded` last.
    pub fn close(&self) {
        // Agents of a finished run learn that it ended, not that the
        // coordinator went away (the task loop may not have told them yet).
        self.announce_end();
        let _ = self.closing.send(true);
        self.agents().clear();
        self.upload_slots.close();
    }

    /// The `RunEnded` message of a finished run (`None` while it runs).
    pub(crate) fn run_ended(&self) -> Option<pb::Work> {
        let engine = self.engine();
        engine.finished().then(|| pb::Work {
            kind: Some(pb::work::Kind::RunEnded(pb::RunEnded {
                run_id: engine.run().run_id.clone(),
                model_version: engine.version(),
                // Every agent receives it: no other merchant's name or
                // refusal in it.
                stopped: engine
                    .stopped()
                    .map(|s| s.for_merchants())
                    .unwrap_or_default(),
                served_version: engine.served_version().unwrap_or(0),
            })),
        })
    }

    /// Tells every connected agent that the run is over, so that agents go
    /// idle instead of treating the coordinator's exit as an outage.
    pub(crate) fn announce_end(&self) {
        let Some(end) = self.run_ended() else {
            return;
        };
        for a in self.agents().values() {
            // A full queue belongs to an agent that is not reading: it will
            // learn of the end when it reconnects.
            let _ = a.tx.try_send(Ok(end.clone()));
        }
    }

    /// Watches the run's progress.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    pub(crate) fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentEntry>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
        let agents = self.agents().len();
        let engine = self.engine();
        let open_task = engine.open_task().map(|p| p.task_id.clone());
        let (version, finished) = (engine.version(), engine.finished());
        let stopped = engine.stopped().map(|s| s.to_string());
        drop(engine);
        self.progress.send_modify(|p| {
            p.agents = agents;
            p.open_task = open_task;
            p.version = version;
            p.finished = finished;
            p.stopped = stopped;
        });
    }

    /// Test seam: every later store write fails, as on a broken disk.
    #[cfg(test)]
    pub(crate) fn fail_store_writes(&self) {
        self.engine()
            .store()
            .fail_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records that the task loop failed with `cause`: progress reports it,
    /// so readiness turns false and `serve` stops.
    pub fn fail(&self, cause: String) {
        self.progress.send_modify(|p| p.failed = Some(cause));
    }

    /// Ends the session of every connected merchant that `refusal` now
    /// refuses (revoked, or removed from the allow-list): its Join stream
    /// ends with `PERMISSION_DENIED` naming the reason, it is counted as
    /// dropped for the open task and is no longer available for selection.
    pub fn close_refused(&self, refusal: impl Fn(&str, Option<&str>) -> Option<&'static str>) {
        let closed = Self::close_sessions(&self.agents, refusal);
        if closed.is_empty() {
            return;
        }
        for merchant in closed {
            self.engine().drop_agent(&merchant);
        }
        self.bump();
    }

    /// Ends the sessions in `agents` that `refusal` refuses, each with
    /// `PERMISSION_DENIED` naming the reason; returns their merchants.
    fn close_sessions(
        agents: &Mutex<HashMap<String, AgentEntry>>,
        refusal: impl Fn(&str, Option<&str>) -> Option<&'static str>,
    ) -> Vec<String> {
        let mut closed = Vec::new();
        agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, a| match refusal(&a.merchant_id, a.serial.as_deref()) {
                Some(why) => {
                    closed.push((a.merchant_id.clone(), why, a.kill.take()));
                    false
                }
                None => true,
            });
        closed
            .into_iter()
            .map(|(merchant, why, kill)| {
                tracing::warn!(%merchant, reason = why, "access withdrawn; closing the merchant's session");
                if let Some(kill) = kill {
                    let _ = kill.send(Status::permission_denied(format!(
                        "merchant `{merchant}` is {why}: session closed by the coordinator"
                    )));
                }
                merchant
            })
            .collect()
    }

    /// Marks an upload from `merchant` as in flight until the guard drops;
    /// refuses a second concurrent one.
    fn begin_upload(&self, merchant: &str) -> Result<UploadGuard<'_>, Status> {
        let fresh = self
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(merchant.to_owned());
        if !fresh {
            return Err(Status::resource_exhausted(format!(
                "an upload from `{merchant}` is already in flight: send one at a time"
            )));
        }
        self.count_uploads();
        Ok(UploadGuard {
            shared: self,
            merchant: merchant.to_owned(),
        })
    }

    fn count_uploads(&self) {
        let n = self
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        self.progress.send_modify(|p| p.uploads = n);
    }

    /// Parameters of a committed version.
    pub fn model(&self, version: u64) -> Result<Option<Arc<Vec<f32>>>, EngineError> {
        self.engine().model(version)
    }

    /// The digest of version `version` a task names
    /// (`TaskAssignment.model_digest`, bound into a secure round's signed
    /// advertisements).
    pub fn model_digest(&self, version: u64) -> Result<[u8; 32], EngineError> {
        if let Some(digest) = self.cached_digest(version) {
            return Ok(digest);
        }
        let model = self
            .model(version)?
            .ok_or_else(|| EngineError::Config(format!("version {version} is not stored")))?;
        Ok(self.digest_of(version, &model))
    }

    fn cached_digest(&self, version: u64) -> Option<[u8; 32]> {
        let digests = self.model_digests.lock().unwrap_or_else(|p| p.into_inner());
        digests.get(&version).copied()
    }

    /// [`Shared::model_digest`] of `model`, version `version`: hashed once
    /// per version (a round's downloads ask for the digests of the few
    /// versions its agents hold).
    fn digest_of(&self, version: u64, model: &[f32]) -> [u8; 32] {
        if let Some(digest) = self.cached_digest(version) {
            return digest;
        }
        // Hashed outside the lock: two first requests may both hash.
        let digest = fedcart_common::federation::update::model_digest(model);
        let mut digests = self.model_digests.lock().unwrap_or_else(|p| p.into_inner());
        digests.insert(version, digest);
        while digests.len() > DIGESTS_KEPT {
            digests.pop_first();
        }
        digest
    }

    /// The little-endian bytes of `model`, version `version`: converted once
    /// per version and then shared by every download of it.
    fn model_bytes(&self, version: u64, model: &[f32]) -> Bytes {
        let cached = || self.model_bytes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, bytes)) = cached().as_ref()
            && *v == version
        {
            return bytes.clone();
        }
        // Converted outside the lock: two first downloads may both convert.
        let bytes = Bytes::from(fedcart_common::federation::update::f32s_to_le(model));
        *cached() = Some((version, bytes.clone()));
        bytes
    }

    /// Every history record in the store, oldest first.
    pub fn history(&self) -> Result<Vec<crate::record::RoundRecord>, crate::store::StoreError> {
        self.engine().store().history()
    }

    /// Why the run stopped before its last round, if it did.
    pub fn stopped(&self) -> Option<RunStop> {
        self.engine().stopped().cloned()
    }

    /// The best version by federated validation so far (the one served),
    /// if the model reports a validation metric.
    pub fn best(&self) -> Option<crate::engine::BestVersion> {
        self.engine().best().cloned()
    }

    /// The feature statistics agreed in the statistics step, if any.
    pub fn standardizer(&self) -> Option<fedcart_common::data::standardize::Standardizer> {
        self.engine().standardizer().cloned()
    }

    /// The run's configuration (rounds, selection, DP budget), for views.
    pub fn run_config(&self) -> crate::config::RunConfig {
        self.engine().run().clone()
    }

    /// Connected merchants.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .agents()
            .values()
            .map(|a| a.merchant_id.clone())
            .collect();
        v.sort();
        v
    }
}

/// An upload in flight; dropping it lets the merchant upload again.
struct UploadGuard<'a> {
    shared: &'a Shared,
    merchant: String,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.merchant);
        self.shared.count_uploads();
    }
}

/// The tonic service over the runs of a [`hub::Hub`].
#[derive(Clone)]
pub struct Service {
    hub: Arc<hub::Hub>,
    /// Last, so it drops after `hub`: see [`Held`].
    _held: Held,
}

/// A token kept as the **last** field of each value that reaches the store
/// and may be owned by tasks the coordinator cannot join (hyper runs each
/// request in a task of its own, holding a clone of the service, and tonic's
/// graceful shutdown waits for connections, not for those): it drops after
/// the value's `Arc`s, and `Running::shutdown` waits until every token is
/// gone, so when it returns no request still holds the store.
pub type Held = mpsc::Sender<()>;

impl Service {
    /// A service handle for `hub`'s runs; `held` is dropped with its last
    /// clone.
    pub fn new(hub: Arc<hub::Hub>, held: Held) -> Self {
        Self { hub, _held: held }
    }

    /// The tonic server wrapper, with message limits suited to chunked transfers.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
            .max_decoding_message_size(MAX_UPLOAD_CHUNK_BYTES + 64 * 1024)
            .max_encoding_message_size(MODEL_CHUNK_BYTES + 64 * 1024)
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    type JoinStream = WorkStream;
    type DownloadModelStream = ChunkStream;

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<WorkStream>, Status> {
        crate::identity::check_claim(request.extensions(), &request.get_ref().merchant_id)?;
        let serial = request
            .extensions()
            .get::<crate::identity::CertSerial>()
            .map(|s| s.0.clone());
        let req = request.into_inner();
        crate::identity::validate_id(&req.merchant_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = mpsc::channel(WORK_QUEUE);
        let (kill, killed) = oneshot::channel::<Status>();
        let session_id = new_session_id();
        // The welcome names the default run; tasks name their own.
        let run_id = self
            .hub
            .primary()
            .map(|s| s.engine().run().run_id.clone())
            .unwrap_or_default();
        let welcome = pb::Work {
            kind: Some(pb::work::Kind::Welcome(pb::Welcome {
                session_id: session_id.clone(),
                run_id,
                ping_interval_ms: self.hub.ping_interval.as_millis() as u64,
            })),
        };
        tx.try_send(Ok(welcome)).expect("fresh queue has room");
        // An agent joining learns at once which runs have ended (the last
        // few: the queue has room for the session's first messages).
        for end in self
            .hub
            .all()
            .iter()
            .rev()
            .filter_map(|s| s.run_ended())
            .take(WORK_QUEUE / 2)
        {
            tx.try_send(Ok(end)).expect("fresh queue has room");
        }
        let examples = crate::limits::check_examples(&req.examples)?;
        let had_session = {
            let mut agents = self.hub.sessions.lock().unwrap_or_else(|p| p.into_inner());
            // A merchant that reconnects replaces its stale session. An agent
            // reconnects only once its own stream ended, so a previous
            // stream still open belongs to another agent of the same
            // merchant: it is closed with a status saying so (the agent
            // stops, rather than taking the session back), not left open
            // without tasks.
            let mut replaced = 0;
            for a in agents.values_mut() {
                if a.merchant_id == req.merchant_id
                    && let Some(kill) = a.kill.take()
                {
                    replaced += 1;
                    let _ = kill.send(Status::already_exists(format!(
                        "merchant `{}` joined again on another connection, which replaces this \
                         session",
                        req.merchant_id
                    )));
                }
            }
            if replaced > 0 {
                tracing::warn!(
                    merchant = %req.merchant_id,
                    "merchant joined again: its previous session is closed (two agents with one \
                     identity, or a reconnect before the old connection timed out)"
                );
            }
            let before = agents.len();
            agents.retain(|_, a| a.merchant_id != req.merchant_id);
            let had_session = agents.len() < before;
            agents.insert(
                session_id.clone(),
                AgentEntry {
                    merchant_id: req.merchant_id.clone(),
                    examples: req.examples.clone(),
                    serial,
                    tx: tx.clone(),
                    kill: Some(kill),
                },
            );
            had_session
        };
        if had_session {
            // The replaced session held the merchant's part of any open
            // task, which the new one never receives: the task stops
            // waiting for it, as when a session ends (its removal later
            // finds the merchant connected and drops nothing). A reconnect
            // before the old connection was noticed dead held a round to
            // its deadline.
            for s in self.hub.all() {
                s.engine().drop_agent(&req.merchant_id);
            }
        }
        // A merchant that declined a run's tasks for a lasting cause may
        // join again with its data or policy changed: selected again.
        for s in self.hub.all() {
            s.engine().readmit(&req.merchant_id);
        }
        tracing::info!(merchant = %req.merchant_id, %examples, "agent joined");
        self.hub.bump_all();

        let hub = Arc::clone(&self.hub);
        let mut closing = self.hub.closing.subscribe();
        if *closing.borrow() {
            return Err(Status::unavailable("the coordinator is shutting down"));
        }
        let pinger = tokio::spawn(async move {
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = closing.changed() => break,
                    _ = tokio::time::sleep(hub.ping_interval) => {
                        seq += 1;
                        let ping = pb::Work { kind: Some(pb::work::Kind::Ping(pb::Ping { sequence: seq })) };
                        // A full queue means the agent is busy training; skip this ping.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Ok(ping)) {
                            break;
                        }
                    }
                }
            }
            hub.remove_session(&session_id);
        });
        // It holds the hub: `Running::shutdown` joins it.
        self.hub.track(pinger);
        // A status sent on `kill` goes out ahead of any queued work and ends
        // the stream (tonic closes a server stream after its first error).
        let killed =
            futures::stream::once(killed).filter_map(|k| std::future::ready(k.ok().map(Err)));
        let work = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(
            futures::stream::select_with_strategy(killed, work, |_: &mut ()| {
                futures::stream::PollNext::Left
            }),
        )))
    }

    async fn download_model(
        &self,
        request: Request<pb::ModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let peer = crate::identity::peer(&request)?;
        let req = request.into_inner();
        let merchant = self.hub.merchant_of(&req.session_id)?;
        crate::identity::check_session(peer.as_ref(), &merchant)?;
        let shared = self.hub.get(&req.run_id)?;
        if req.task_id.is_empty() {
            return served_download(&shared, &merchant, &req);
        }
        let (model, cached, layout) = {
            let engine = shared.engine();
            engine
                .precheck(&merchant, &req.run_id, req.round, &req.task_id)
                .map_err(Status::from)?;
            let plan = engine.open_task().expect("precheck found an open task");
            if plan.model_version != req.model_version {
                return Err(Status::failed_precondition(format!(
                    "task `{}` uses model version {}, not {}",
                    plan.task_id, plan.model_version, req.model_version
                )));
            }
            let layout = plan.spec.model.layout();
            let model = engine
                .model(req.model_version)
                .map_err(|e| Status::internal(e.to_string()))?;
            // The version the agent holds, if this run still has it; rows
            // are sent relative to it.
            let cached = match req.cached_version {
                0 => None,
                v if v == req.model_version => None,
                v => engine
                    .model(v)
                    .map_err(|e| Status::internal(e.to_string()))?,
            };
            (model, cached, layout)
        };
        let model = model
            .ok_or_else(|| Status::not_found(format!("model version {}", req.model_version)))?;
        // Only if the agent's copy is this store's version: a copy of the
        // same number from another history (a store restored from an older
        // backup, or lost and begun again under the same run id) would take
        // the changed rows and be corrupted without a word. The whole model
        // goes then.
        let cached = cached.filter(|c| {
            let same = shared.digest_of(req.cached_version, c).as_slice() == req.cached_digest;
            if !same {
                tracing::warn!(%merchant, task = %req.task_id, cached = req.cached_version,
                    "the agent holds a version of this run's number with other values (the \
                     store was restored from a backup or begun again): sending the whole model");
            }
            same
        });
        if let Some(rows) =
            rows::rows_download(&model, cached.as_ref().map(|c| c.as_slice()), &layout, &req)
        {
            return Ok(Response::new(model_chunks(
                Bytes::from(rows),
                pb::ModelEncoding::Rows,
            )));
        }
        let bytes = shared.model_bytes(req.model_version, &model);
        drop(model);
        Ok(Response::new(model_chunks(bytes, pb::ModelEncoding::F32)))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let peer = crate::identity::peer(&request)?;
        let mut stream = request.into_inner();
        let idle = self.hub.upload_idle();
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| idle_status(idle))?;
        let header = match first? {
            Some(pb::UpdateChunk {
                part: Some(pb::update_chunk::Part::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first upload chunk must be the header",
                ));
            }
            None => return Err(Status::invalid_argument("empty upload")),
        };
        let merchant = self.hub.merchant_of(&header.session_id)?;
        crate::identity::check_session(peer.as_ref(), &merchant)?;
        crate::limits::check_metrics(&header.metrics).inspect_err(|status| {
            tracing::warn!(%merchant, error = status.message(), "upload refused");
        })?;
        let shared = self.hub.get(&header.run_id)?;
        let _in_flight = shared.begin_upload(&merchant)?;
        let (kind, expected_values, expected_weights, secure, layout) = {
            let engine = shared.engine();
            match engine.precheck(&merchant, &header.run_id, header.round, &header.task_id) {
                // A survivor of a secure round that leaves a later stage
                // (it refused to reveal shares): its input stays in the sum,
                // and the stage stops waiting for it now, not at its deadline.
                Err(crate::engine::SubmitError::Duplicate(_))
                    if !header.failure.is_empty()
                        && engine.open_task().is_some_and(|p| p.secure) =>
                {
                    drop(engine);
                    return withdraw_survivor(&shared, &merchant, &header);
                }
                checked => checked.map_err(Status::from)?,
            }
            let plan = engine.open_task().expect("precheck found an open task");
            let spec = &plan.spec;
            (
                spec.kind,
                spec.update_len() as u64,
                spec.update_layout().num_coord_weights as u64,
                plan.secure,
                spec.update_layout(),
            )
        };
        let task_id = header.task_id.clone();
        let declining = !header.failure.is_empty();
        let masked = header.encoding == pb::PayloadEncoding::MaskedU32 as i32;
        let result: Result<Response<pb::SubmitReply>, Status> = async {
            if !header.failure.is_empty() {
                return decline(&shared, &merchant, &header, secure);
            }
            if header.num_values != expected_values || header.num_coord_weights != expected_weights {
                return Err(Status::invalid_argument(format!(
                    "wrong vector length: update has {} values and {} coordinate weights, task `{}` needs {} and {}",
                    header.num_values,
                    header.num_coord_weights,
                    header.task_id,
                    expected_values,
                    expected_weights
                )));
            }
            if header.encoding == pb::PayloadEncoding::MaskedU32 as i32 {
                return secure::submit_masked(&shared, &merchant, header, stream).await;
            }
            if secure {
                // Refused before a byte of the payload is read: under secure
                // aggregation no individual update is ever held in the clear.
                return Err(SubmitError::PlaintextInSecureTask(header.task_id).into());
            }
            let rows = header.encoding == pb::PayloadEncoding::RowsF32 as i32;
            let dense = 4 * (header.num_values + header.num_coord_weights);
            // A row-sparse payload is never larger than every row plus the row
            // list; its exact length is checked when it is decoded.
            let declared = if rows { header.payload_len } else { dense };
            if rows && header.payload_len > dense + 4 * (1 + header.num_coord_weights) {
                return Err(Status::invalid_argument(format!(
                    "payload_len {} is larger than a row-sparse form of {} values can be",
                    header.payload_len, header.num_values
                )));
            }
            if header.payload_len != declared {
                return Err(Status::invalid_argument(format!(
                    "payload_len {} does not match 4 × ({} + {})",
                    header.payload_len, header.num_values, header.num_coord_weights
                )));
            }
            if !rows && header.encoding != pb::PayloadEncoding::F32 as i32 && kind != TaskKind::Evaluate
            {
                return Err(Status::invalid_argument(
                    "this round expects PAYLOAD_ENCODING_F32",
                ));
            }
            let (_slot, payload) = receive_payload(&shared, &mut stream, declared).await?;
            let update = if kind == TaskKind::Evaluate && header.num_values == 0 {
                None
            } else if rows {
                Some(rows::decode_upload(&payload, &header, &layout)?)
            } else {
                Some(
                    Update::from_payload(
                        &payload,
                        header.num_values as usize,
                        header.num_coord_weights as usize,
                        header.weight,
                    )
                    .map_err(|e| Status::out_of_range(e.to_string()))?,
                )
            };
            let sub = Submission {
                update,
                metrics: header.metrics.into_iter().collect::<BTreeMap<_, _>>(),
                weight: header.weight,
                // An agent older than the field: its validation figures
                // pool by its example weight, as they used to.
                validation_weight: header.validation_weight.unwrap_or(header.weight),
                bytes: declared,
            };
            let result = shared.engine().submit(
                &merchant,
                &header.run_id,
                header.round,
                &header.task_id,
                sub,
            );
            shared.bump();
            result.map_err(Status::from)?;
            Ok(Response::new(pb::SubmitReply {
                message: format!("accepted update from `{merchant}`"),
            }))
        }
        .await;
        // A plaintext update refused for its content (not for a broken
        // stream) is the merchant's one update for the task, as when the
        // engine refuses it: recorded, and no other is taken. A masked input
        // refused (nothing of it reached the sum) is logged, and recorded
        // if no later one of the merchant counts. (A malformed failure
        // report is only answered: it carries no update; in a secure task a
        // plaintext upload is only answered too.)
        if let Err(status) = &result
            && !declining
        {
            let content = matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange
            );
            if !secure && content {
                shared
                    .engine()
                    .refuse_upload(&merchant, &task_id, status.message());
                shared.bump();
            } else if secure
                && masked
                && (content || status.code() == tonic::Code::PermissionDenied)
            {
                shared
                    .engine()
                    .note_refused_masked(&merchant, &task_id, status.message());
            }
        }
        result
    }

    async fn sec_agg(
        &self,
        request: Request<pb::SecAggMessage>,
    ) -> Result<Response<pb::SecAggReply>, Status> {
        let peer = crate::identity::peer(&request)?;
        // The certificates this agent presented on its mTLS connection: what
        // the coordinator relays with its key advertisement, never a claim.
        let chain: Vec<Vec<u8>> = request
            .peer_certs()
            .map(|certs| certs.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default();
        let msg = request.into_inner();
        let merchant = self.hub.merchant_of(&msg.session_id)?;
        crate::identity::check_session(peer.as_ref(), &merchant)?;
        let shared = self.hub.get(&msg.run_id)?;
        secure::on_message(&shared, &merchant, chain, msg).map(Response::new)
    }

    /// The run's state. An operator (or anyone in plaintext mode) sees every
    /// merchant of the last round; a merchant sees only itself in it.
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let viewer = crate::identity::viewer(&request);
        let wanted = request.get_ref().run_id.clone();
        let shared = if wanted.is_empty() {
            self.hub
                .primary()
                .ok_or_else(|| Status::not_found("this coordinator hosts no run yet"))?
        } else {
            self.hub.get(&wanted)?
        };
        let mut connected = shared.connected();
        if let crate::identity::Viewer::Merchant(id) = &viewer {
            // Who else is connected is the operator's to see.
            connected.retain(|m| m == id);
        }
        // As `runs list` shows it (with a schedule ended by the operator);
        // a merchant's has no other merchant in it.
        let phase = match &viewer {
            crate::identity::Viewer::Operator => self
                .hub
                .summary(&shared.run_config().run_id)
                .map_or_else(|_| shared.phase(), |s| s.phase),
            crate::identity::Viewer::Merchant(id) => shared.merchant_phase(id),
        };
        let engine = shared.engine();
        // A merchant that is not connected to the run and was never selected
        // for it sees only that it exists (its id is in `run_ids` anyway):
        // its progress, served version and privacy spend are the operator's
        // and its merchants' (an outsider could follow any run).
        if let crate::identity::Viewer::Merchant(id) = &viewer {
            let part = connected.contains(id)
                || engine.open_task().is_some_and(|p| p.selected.contains(id))
                || shared.ever_selected(engine.store(), id)?;
            if !part {
                return Ok(Response::new(pb::StatusReply {
                    run_id: engine.run().run_id.clone(),
                    // "Takes no part" read as "excluded" to a merchant
                    // whose agent had just not joined yet (a new-user
                    // probe): say what the merchant can do.
                    phase: format!(
                        "merchant `{id}` is not connected to this run and has not taken part in \
                         it: its agent takes part once it is running and connected (a run shows \
                         its progress only to its merchants and the operator)"
                    ),
                    run_ids: self.hub.ids(),
                    ..Default::default()
                }));
            }
        }
        let last = engine
            .store()
            .last_history()
            .map_err(|e| Status::internal(e.to_string()))?
            .and_then(|r| match &viewer {
                crate::identity::Viewer::Operator => Some(r),
                // A round's aggregates are for the merchants it selected: an
                // outsider (or one left out) could otherwise follow a run it
                // takes no part in, and with one other merchant in the round
                // subtract its own share from the totals.
                crate::identity::Viewer::Merchant(id) => {
                    r.selected.contains(id).then(|| r.seen_by(id))
                }
            });
        Ok(Response::new(pb::StatusReply {
            run_id: engine.run().run_id.clone(),
            round: engine.open_task().map_or(engine.version(), |p| p.round),
            model_version: engine.version(),
            connected_agents: connected,
            last_round_json: last
                .map(|r| serde_json::to_string(&r).expect("serialisable"))
                .unwrap_or_default(),
            phase,
            run_ids: self.hub.ids(),
            epsilon: engine.ledger().and_then(|l| l.epsilon()),
            delta: engine.ledger().map(|l| l.settings().delta),
            best_version: served_best(&engine),
            best_metric: engine.best().map(|b| b.metric.clone()).unwrap_or_default(),
            // A pooled validation figure is the operator's to see: with its
            // own figure, a merchant could tell another's from it.
            best_value: engine
                .best()
                .filter(|_| matches!(viewer, crate::identity::Viewer::Operator))
                .map(|b| b.value),
        }))
    }
}

/// An agent's report that its local task failed (`UpdateHeader.failure`):
/// it is dropped from the open task now, its reason recorded with the
/// round's rejections (so that a round that keeps aborting names its
/// cause), and a secure round stops waiting for it.
fn decline(
    shared: &Shared,
    merchant: &str,
    header: &pb::UpdateHeader,
    secure: bool,
) -> Result<Response<pb::SubmitReply>, Status> {
    crate::limits::check_failure(header)?;
    tracing::warn!(merchant, task = %header.task_id, reason = %header.failure, "an agent's local task failed");
    {
        let mut engine = shared.engine();
        engine.fail_agent(merchant, header.failure.clone());
        if header.lasting {
            engine.decline_for_run(merchant, header.failure.clone());
        }
    }
    if secure {
        secure::decline(shared, merchant);
        secure::accusation(shared, merchant, &header.failure);
    }
    shared.bump();
    Ok(Response::new(pb::SubmitReply {
        message: format!("dropped from task `{}`", header.task_id),
    }))
}

/// A secure round's survivor leaving a stage after its masked input (it
/// refused the unmask request, or could not answer it): the open stage stops
/// waiting for it and the reason goes with the round's rejections.
fn withdraw_survivor(
    shared: &Shared,
    merchant: &str,
    header: &pb::UpdateHeader,
) -> Result<Response<pb::SubmitReply>, Status> {
    crate::limits::check_failure(header)?;
    tracing::warn!(merchant, task = %header.task_id, reason = %header.failure, "a survivor of the secure round left it");
    shared
        .engine()
        .note_rejection(merchant, header.failure.clone());
    secure::decline(shared, merchant);
    secure::accusation(shared, merchant, &header.failure);
    shared.bump();
    Ok(Response::new(pb::SubmitReply {
        message: format!("left the secure stages of task `{}`", header.task_id),
    }))
}

/// A model's bytes in `encoding` as a chunk stream; dense chunks end on
/// whole f32 values (MODEL_CHUNK_BYTES is a multiple of 4).
fn model_chunks(bytes: Bytes, encoding: pb::ModelEncoding) -> ChunkStream {
    let total_len = bytes.len() as u64;
    let chunks = bytes.len().div_ceil(MODEL_CHUNK_BYTES).max(1);
    Box::pin(futures::stream::iter(0..chunks).map(move |i| {
        let start = i * MODEL_CHUNK_BYTES;
        let end = (start + MODEL_CHUNK_BYTES).min(bytes.len());
        Ok(pb::ModelChunk {
            offset: start as u64,
            total_len,
            data: bytes.slice(start..end),
            encoding: encoding as i32,
        })
    }))
}

/// `DownloadModel` without a task: the version an ended run serves, for a
/// merchant the run selected (one away when the run handed that version out
/// fetches it when it comes back). Anything else is refused by name: a
/// running run hands its models out through its tasks, a failed one serves
/// nothing, and a merchant the run never selected gets none of its models.
fn served_download(
    shared: &Shared,
    merchant: &str,
    req: &pb::ModelRequest,
) -> Result<Response<ChunkStream>, Status> {
    let model = {
        let engine = shared.engine();
        let run_id = &engine.run().run_id;
        // First, so that an outsider learns nothing of the run's state
        // (whether it ended, which version it serves) from the refusal.
        let selected = engine
            .store()
            .history()
            .map_err(|e| Status::internal(e.to_string()))?
            .iter()
            .any(|r| r.selected.iter().any(|m| m == merchant));
        if !selected {
            return Err(Status::permission_denied(format!(
                "merchant `{merchant}` took no part in run `{run_id}`"
            )));
        }
        if !engine.finished() {
            return Err(Status::failed_precondition(format!(
                "run `{run_id}` has not ended: its models are handed out by its tasks"
            )));
        }
        let served = engine.served_version().ok_or_else(|| {
            Status::failed_precondition(format!("run `{run_id}` failed: it serves no version"))
        })?;
        if req.model_version != served {
            return Err(Status::failed_precondition(format!(
                "run `{run_id}` serves version {served}, not version {}",
                req.model_version
            )));
        }
        engine
            .model(served)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("model version {served}")))?
    };
    tracing::info!(merchant, run = %req.run_id, version = req.model_version, "served version fetched after the run ended");
    Ok(Response::new(model_chunks(
        Bytes::from(fedcart_common::federation::update::f32s_to_le(&model)),
        pb::ModelEncoding::F32,
    )))
}

fn idle_status(idle: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "upload idle for {} ms: send the header and the data chunks without pauses",
        idle.as_millis()
    ))
}

/// The next data chunk of an upload (`None` at its end), waiting at most
/// until `deadline`.
async fn next_data(
    stream: &mut Streaming<pb::UpdateChunk>,
    deadline: tokio::time::Instant,
    idle: Duration,
) -> Result<Option<Bytes>, Status> {
    let chunk = tokio::time::timeout_at(deadline, stream.message())
        .await
        .map_err(|_| idle_status(idle))??;
    match chunk {
        None => Ok(None),
        Some(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Data(data)),
        }) => Ok(Some(data)),
        Some(_) => Err(Status::invalid_argument(
            "only data chunks may follow the header",
        )),
    }
}

/// Receives the data chunks that follow an upload header: exactly
/// `declared` bytes, refusing a longer or shorter payload and any non-data
/// chunk. An upload slot is taken only when the first data chunk has
/// arrived (a header-only stream holds none) and is returned with the
/// payload, to be held until the payload is folded in. Each chunk must
/// arrive within the idle timeout, and the whole payload within one idle
/// timeout per 1 MiB chunk (plus one), so a trickle cannot hold a slot.
///
/// A payload that arrives as one chunk (any update up to
/// [`MAX_UPLOAD_CHUNK_BYTES`]) is returned as the decoded message's own
/// bytes, never copied; only a payload of several chunks is assembled. No
/// lock is held while a chunk is awaited: the engine and the secure round
/// are locked only after the payload is complete (a std `MutexGuard` cannot
/// live across an `.await` in these `Send` handlers), and the only wait
/// besides the stream is for an upload slot.
pub(crate) async fn receive_payload<'a>(
    shared: &'a Shared,
    stream: &mut Streaming<pb::UpdateChunk>,
    declared: u64,
) -> Result<(Option<SemaphorePermit<'a>>, Bytes), Status> {
    let idle = shared.upload_idle;
    let mut next = next_data(stream, tokio::time::Instant::now() + idle, idle).await?;
    let slot = match next {
        None => None,
        Some(_) => Some(
            shared
                .upload_slots
                .acquire()
                .await
                .map_err(|_| Status::unavailable("the coordinator is shutting down"))?,
        ),
    };
    let chunks = declared.div_ceil(MODEL_CHUNK_BYTES as u64) + 1;
    let whole =
        tokio::time::Instant::now() + idle.saturating_mul(chunks.min(u32::MAX as u64) as u32);
    let larger = || {
        Status::out_of_range(format!(
            "payload larger than declared: more than {declared} bytes received"
        ))
    };
    let mut first: Option<Bytes> = None;
    let mut assembled: Option<BytesMut> = None;
    while let Some(data) = next {
        let have =
            first.as_ref().map_or(0, Bytes::len) + assembled.as_ref().map_or(0, BytesMut::len);
        if have as u64 + data.len() as u64 > declared {
            return Err(larger());
        }
        match (&mut first, &mut assembled) {
            (None, None) => first = Some(data),
            (Some(_), None) => {
                let mut all = BytesMut::with_capacity(declared as usize);
                all.extend_from_slice(&first.take().expect("matched Some"));
                all.extend_from_slice(&data);
                assembled = Some(all);
            }
            (_, Some(all)) => all.extend_from_slice(&data),
        }
        let deadline = (tokio::time::Instant::now() + idle).min(whole);
        next = next_data(stream, deadline, idle).await?;
    }
    let payload = match (first, assembled) {
        (_, Some(all)) => all.freeze(),
        (Some(one), None) => one,
        (None, None) => Bytes::new(),
    };
    if payload.len() as u64 != declared {
        return Err(Status::out_of_range(format!(
            "payload shorter than declared: {} of {declared} bytes",
            payload.len()
        )));
    }
    Ok((slot, payload))
}

use futures::StreamExt as _;

/// Model digests [`Shared`] keeps: the current version's and those of the
/// few before it that agents away for some rounds still hold.
const DIGESTS_KEPT: usize = 8;

/// Runs tasks until the run finishes or `shutdown` fires: waits for enough
/// agents, opens a task, pushes it, waits for every selected agent or the
/// deadline, then closes it.
pub async fn run_tasks(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), EngineError> {
    let mut changed = shared.changed.subscribe();
    let run_id = shared.engine().run().run_id.clone();
    loop {
        // A finished (or stopped) run reports how it ended even when the
        // shutdown signal came right after.
        if shared.engine().finished() {
            shared.bump();
            shared.announce_end();
            warn_if_unsplit(&shared);
            let stopped = shared.engine().stopped().cloned();
            return match stopped {
                // An exhausted privacy budget or early stopping is a
                // planned end, not a fault.
                Some(stop) if stop.is_planned() => {
                    tracing::warn!(run = %run_id, "run stopped: {stop}");
                    Ok(())
                }
                Some(stop) => {
                    tracing::error!(run = %run_id, "run stopped: {stop}");
                    Err(EngineError::Stopped(stop))
                }
                None => {
                    tracing::info!(run = %run_id, "run finished");
                    Ok(())
                }
            };
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        let available = shared.eligible();
        let started = shared.engine().start_task(&available);
        let plan = match started {
            Ok(plan) => plan,
            // The budget check stopped the run: the loop's top ends it.
            Err(EngineError::Stopped(_)) => continue,
            Err(EngineError::NotEnoughAgents { .. }) => {
                tokio::select! {
                    _ = changed.changed() => continue,
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        };
        let timeout = Duration::from_millis(shared.engine().run().round_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let digest = match plan.model_len {
            0 => Vec::new(),
            _ => shared.model_digest(plan.model_version)?.to_vec(),
        };
        let msg = convert::assignment(
            &run_id,
            &plan,
            unix_ms() + timeout.as_millis() as i64,
            plan.secure,
            digest,
        );
        let targets: Vec<(String, mpsc::Sender<Result<pb::Work, Status>>)> = {
            // One pass over the sessions (a scan per selected merchant was
            // quadratic in the number of agents).
            let agents = shared.agents();
            let by_merchant: HashMap<&str, &mpsc::Sender<Result<pb::Work, Status>>> = agents
                .values()
                .map(|a| (a.merchant_id.as_str(), &a.tx))
                .collect();
            plan.selected
                .iter()
                .filter_map(|m| {
                    by_merchant
                        .get(m.as_str())
                        .map(|tx| (m.clone(), (*tx).clone()))
                })
                .collect()
        };
        for (merchant, tx) in targets {
            let work = pb::Work {
                kind: Some(pb::work::Kind::Task(msg.clone())),
            };
            if tx.try_send(Ok(work)).is_err() {
                shared.engine().drop_agent(&merchant);
            }
        }
        shared.bump();
        if plan.secure
            && secure::run(
                &shared,
                &plan,
                &run_id,
                deadline,
                &mut changed,
                &mut shutdown,
            )
            .await
            .is_err()
        {
            return Ok(());
        }
        // A secure task has run all its stages above; a plaintext one waits here.
        loop {
            if plan.secure || shared.engine().pending() == 0 {
                break;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.changed() => return Ok(()),
            }
        }
        if shared.engine().open_task().is_none() {
            // An operator stopped the run while the task was open.
            continue;
        }
        let record = shared.engine().finish_task()?;
        tracing::info!(task = %record.task_id, outcome = ?record.outcome, reported = record.reported.len(),
            metrics = ?record.metrics, run = %run_id, "task closed");
        shared.progress.send_modify(|p| p.records += 1);
        shared.bump();
        if record.outcome == crate::record::Outcome::Aborted && !shared.engine().finished() {
            // Back off before the next attempt, so that a round that keeps
            // failing fast does not spin (run.max_attempts ends it).
            tokio::select! {
                _ = tokio::time::sleep(retry_backoff(record.attempt)) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// The best version by validation, as long as the run serves it: `None`
/// once the run stopped on a fault, which hands nothing out (each merchant
/// keeps the version it last evaluated). Status and `runs show` said "served
/// version N" of such a run, which no merchant was handed.
fn served_best(engine: &Engine) -> Option<u64> {
    engine
        .served_version()
        .and_then(|_| engine.best().map(|b| b.version))
}

/// First wait after an aborted attempt; it doubles with every attempt.
const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Longest wait between two attempts of a round.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The wait after attempt `attempt` (from 1) of a round aborted.
fn retry_backoff(attempt: u32) -> Duration {
    RETRY_BACKOFF_INITIAL
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(RETRY_BACKOFF_MAX)
}

/// Boosted trees none of which split predict the churn rate alone: the
/// operator is told why and what to change (`Ensemble::unsplit_note`).
fn warn_if_unsplit(shared: &Shared) {
    let engine = shared.engine();
    if let fedcart_common::task::ModelSpec::ChurnGbdt { params, .. } = &engine.run().model
        && let Ok(ens) = fedcart_common::model::gbdt::Ensemble::decode(&engine.global())
        && let Some(note) = ens.unsplit_note(params, None)
    {
        tracing::warn!(run = %engine.run().run_id, "{note}");
    }
}

/// `phase` with why the round in hand is being retried, if it is.
fn with_retry(engine: &Engine, mut phase: String) -> String {
    if let Some(why) = engine.retrying() {
        phase.push_str(&format!("; {why}"));
    }
    phase
}
