//! The round engine: selection, collection, aggregation and commit.
//!
//! The engine knows nothing about gRPC or threads. A driver (the gRPC service
//! in `service`, or the in-process simulator) asks it for the next task,
//! delivers results with [`Engine::submit`], reports disconnects with
//! [`Engine::drop_agent`], and closes the task with [`Engine::finish_task`]
//! when everyone answered or the deadline passed.
//!
//! Updates are folded into a running sum as they arrive, so memory is
//! O(model size) for streaming strategies. A task commits only with a quorum
//! of results; otherwise it aborts, nothing changes, and the same round is
//! attempted again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fedcart_common::data::standardize::Standardizer;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::federation::strategy::Strategy;
use fedcart_common::federation::update::{Update, UpdateError};
use fedcart_common::task::{TaskKind, TaskSpec};
use rand::seq::SliceRandom;
use thiserror::Error;

use crate::config::RunConfig;
use crate::ledger::Ledger;
use crate::record::{Outcome, RoundRecord, kind_name};
use crate::store::{Commit, Store, StoreError};

/// Errors of the engine itself (not of a single submission).
#[derive(Debug, Error)]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store holds a different run than the configuration asks for.
    #[error("store {path} holds run `{stored}`, the configuration asks for `{configured}`")]
    RunMismatch {
        /// The store file.
        path: String,
        /// Run id in the store.
        stored: String,
        /// Run id configured.
        configured: String,
    },
    /// A task is already open.
    #[error("task {0} is still open")]
    TaskOpen(String),
    /// No task is open.
    #[error("no task is open")]
    NoTask,
    /// Not enough agents are connected to start a task.
    #[error("{available} agents available, at least {needed} needed")]
    NotEnoughAgents {
        /// Agents available.
        available: usize,
        /// Agents needed.
        needed: usize,
    },
    /// The run has finished.
    #[error("the run has finished")]
    Finished,
    /// The stored or configured run is invalid.
    #[error("invalid run configuration: {0}")]
    Config(String),
    /// A differential-privacy computation failed.
    #[error("differential privacy: {0}")]
    Privacy(#[from] fedcart_common::privacy::dp::DpError),
}

/// Why one submission was refused. Each maps to a specific gRPC status.
#[derive(Debug, Error, PartialEq)]
pub enum SubmitError {
    /// The message names another run.
    #[error("run `{got}` is not this coordinator's run `{expected}`")]
    WrongRun {
        /// This coordinator's run.
        expected: String,
        /// The run named.
        got: String,
    },
    /// The round/task is not the open one (closed, stale or from the future).
    #[error("round {round} task `{task_id}` is not open (open: {open})")]
    Closed {
        /// The round named.
        round: u64,
        /// The task named.
        task_id: String,
        /// What is open instead.
        open: String,
    },
    /// The agent was not selected for this task.
    #[error("agent `{0}` was not selected for this task")]
    NotSelected(String),
    /// The agent already delivered a result for this task.
    #[error("agent `{0}` already submitted for this task")]
    Duplicate(String),
    /// The agent was counted as dropped (disconnected or late).
    #[error("agent `{0}` was marked as dropped for this task")]
    Dropped(String),
    /// The update itself is invalid.
    #[error("invalid update: {0}")]
    Invalid(#[from] UpdateError),
    /// A metric is not a finite number.
    #[error("metric `{0}` is not finite")]
    BadMetric(String),
    /// A plaintext update was sent for a task under secure aggregation.
    #[error("task `{0}` uses secure aggregation: plaintext updates are refused")]
    PlaintextInSecureTask(String),
    /// A secure sum was handed over for a task that is not secure, or twice.
    #[error("task `{0}` does not expect a secure sum")]
    UnexpectedSecureSum(String),
}

pub use crate::task::TaskPlan;

/// A result delivered by an agent.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// The update (None for evaluation tasks).
    pub update: Option<Update>,
    /// Local metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Example weight.
    pub weight: f64,
    /// Payload bytes received (for accounting).
    pub bytes: u64,
}

enum Accumulation {
    Sum(SumAccumulator),
    Individual(Vec<Update>),
}

struct OpenTask {
    plan: TaskPlan,
    selected: BTreeSet<String>,
    reported: BTreeSet<String>,
    dropped: BTreeSet<String>,
    rejected: Vec<(String, String)>,
    acc: Accumulation,
    metric_sums: BTreeMap<String, f64>,
    metric_weight: f64,
    started: Instant,
    started_unix_ms: i64,
    bytes_in: u64,
    /// Survivors of secure aggregation, once the driver handed over the sum.
    secure_survivors: Option<BTreeSet<String>>,
    /// Distinct agents available when the task started (the DP population).
    population: usize,
    /// Why secure aggregation failed, if it did: the task then aborts.
    secure_abort: Option<String>,
}

/// The coordinator's round engine over a durable store.
pub struct Engine {
    store: Store,
    run: RunConfig,
    strategy: Box<dyn Strategy>,
    version: u64,
    global: Arc<Vec<f32>>,
    standardizer: Option<Standardizer>,
    pending_eval: bool,
    /// Attempts so far of each (round, kind name).
    attempts: BTreeMap<(u64, &'static str), u32>,
    open: Option<OpenTask>,
    /// Differential privacy of the run, when configured.
    ledger: Option<Ledger>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Engine {
    /// Opens (or resumes) the run in `store`.
    ///
    /// A new store gets the configuration and version 0. A store that already
    /// holds this run resumes from its last committed version with the stored
    /// configuration; a task that was in flight when the coordinator stopped
    /// is simply attempted again.
    pub fn open(store: Store, configured: RunConfig) -> Result<Self, EngineError> {
        let run = match store.meta_json::<RunConfig>("run_config")? {
            Some(stored) if stored.run_id != configured.run_id => {
                return Err(EngineError::RunMismatch {
                    path: store.path().display().to_string(),
                    stored: stored.run_id,
                    configured: configured.run_id,
                });
            }
            Some(stored) => {
                if stored != configured {
                    tracing::warn!(run = %stored.run_id, "configuration differs from the stored run; resuming with the stored one");
                }
                stored
            }
            None => {
                let json = serde_json::to_value(&configured).expect("config serialises");
                store.put_meta_json(&[("run_config", json)])?;
                configured
            }
        };
        store.init_model(&run.model.initial_params(run.seed))?;
        let version = store.latest_version()?.unwrap_or(0);
        let global = store.model(version)?.ok_or_else(|| StoreError::Corrupt {
            path: store.path().into(),
            what: format!("latest version {version} is missing"),
        })?;
        let mut strategy = run.strategy.build();
        strategy.restore(&store.strategy_state()?);
        let standardizer = store.meta_json::<Standardizer>("standardizer")?;
        let history = store.history()?;
        let mut attempts = BTreeMap::new();
        for r in &history {
            *attempts.entry((r.round, kind_name(r.kind))).or_insert(0) += 1;
        }
        let ledger = run
            .dp
            .as_ref()
            .map(|dp| Ledger::open(dp, &run, &history))
            .transpose()
            .map_err(EngineError::Config)?;
        let pending_eval = run.evaluate
            && version > 0
            && !history
                .iter()
                .any(|r| r.kind == TaskKind::Evaluate && r.round == version);
        Ok(Self {
            store,
            run,
            strategy,
            version,
            global: Arc::new(global),
            standardizer,
            pending_eval,
            attempts,
            open: None,
            ledger,
        })
    }

    /// The run configuration in force.
    pub fn run(&self) -> &RunConfig {
        &self.run
    }

    /// The latest committed version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The latest committed parameters.
    pub fn global(&self) -> Arc<Vec<f32>> {
        Arc::clone(&self.global)
    }

    /// The store (read access for status and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The privacy ledger (clip, noise multiplier, ε so far), when the run
    /// has differential privacy.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// The agreed feature statistics, if any.
    pub fn standardizer(&self) -> Option<&Standardizer> {
        self.standardizer.as_ref()
    }

    /// Parameters of `version`: from memory if current, else from the store.
    pub fn model(&self, version: u64) -> Result<Option<Arc<Vec<f32>>>, EngineError> {
        if version == self.version {
            return Ok(Some(self.global()));
        }
        Ok(self.store.model(version)?.map(Arc::new))
    }

    /// True when all rounds are committed and evaluated.
    pub fn finished(&self) -> bool {
        self.next_kind().is_none()
    }

    /// The open task, if any.
    pub fn open_task(&self) -> Option<&TaskPlan> {
        self.open.as_ref().map(|o| &o.plan)
    }

    /// The round and kind of the task [`Engine::start_task`] would open next
    /// (None when finished); drivers use it to pick whom to offer it to.
    pub fn next_task(&self) -> Option<(u64, TaskKind)> {
        self.next_kind()
    }

    fn next_kind(&self) -> Option<(u64, TaskKind)> {
        if self.run.model.stats_len() > 0 && self.standardizer.is_none() {
            Some((0, TaskKind::Stats))
        } else if self.pending_eval {
            Some((self.version, TaskKind::Evaluate))
        } else if self.version < self.run.rounds {
            Some((self.version + 1, TaskKind::Train))
        } else {
            None
        }
    }

    /// Selects agents among `available` and opens the next task.
    pub fn start_task(&mut self, available: &[String]) -> Result<TaskPlan, EngineError> {
        if let Some(open) = &self.open {
            return Err(EngineError::TaskOpen(open.plan.task_id.clone()));
        }
        let (round, kind) = self.next_kind().ok_or(EngineError::Finished)?;
        let sel = &self.run.selection;
        let needed = sel.min_agents.max(sel.min_available);
        if available.len() < needed {
            return Err(EngineError::NotEnoughAgents {
                available: available.len(),
                needed,
            });
        }
        let kind_name = kind_name(kind);
        let attempt = self.attempts.get(&(round, kind_name)).copied().unwrap_or(0) + 1;
        let task_id = format!("r{round}a{attempt}-{kind_name}");
        let want = ((available.len() as f64 * sel.fraction).ceil() as usize)
            .clamp(sel.min_agents, sel.max_agents)
            .min(available.len());
        let mut pool: Vec<String> = available.to_vec();
        pool.sort();
        pool.dedup();
        let population = pool.len();
        pool.shuffle(&mut fedcart_common::seed::rng(
            self.run.seed,
            &["select", &task_id],
        ));
        let mut selected: Vec<String> = pool.into_iter().take(want).collect();
        selected.sort();

        let spec = TaskSpec {
            kind,
            model: self.run.model.clone(),
            sgd: self.run.sgd.clone(),
            seed: self.run.seed,
            round,
            standardizer: self.standardizer.clone(),
            dp: match (&self.ledger, kind) {
                (Some(l), TaskKind::Train) => Some(l.task(selected.len(), self.global.len())?),
                _ => None,
            },
        };
        let needs_model = kind != TaskKind::Stats;
        let secure = self.run.secagg.is_some() && kind != TaskKind::Evaluate;
        let plan = TaskPlan {
            secure,
            round,
            attempt,
            task_id,
            model_version: self.version,
            model_len: if needs_model {
                self.global.len() as u64
            } else {
                0
            },
            selected: selected.clone(),
            spec,
        };
        let acc = if kind == TaskKind::Train && self.strategy.needs_individual_updates() {
            Accumulation::Individual(Vec::new())
        } else {
            let layout = plan.spec.update_layout();
            Accumulation::Sum(SumAccumulator::new(
                plan.spec.update_len(),
                layout.num_coord_weights,
            ))
        };
        self.open = Some(OpenTask {
            plan: plan.clone(),
            selected: selected.into_iter().collect(),
            reported: BTreeSet::new(),
            dropped: BTreeSet::new(),
            rejected: Vec::new(),
            acc,
            metric_sums: BTreeMap::new(),
            metric_weight: 0.0,
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            bytes_in: 0,
            secure_survivors: None,
            population,
            secure_abort: None,
        });
        tracing::info!(task = %plan.task_id, selected = plan.selected.len(), "task started");
        Ok(plan)
    }

    /// The cheap checks that need no payload: run, task, selection, duplicates.
    /// Drivers call it before reading a large upload.
    pub fn precheck(
        &self,
        agent: &str,
        run_id: &str,
        round: u64,
        task_id: &str,
    ) -> Result<(), SubmitError> {
        if run_id != self.run.run_id {
            return Err(SubmitError::WrongRun {
                expected: self.run.run_id.clone(),
                got: run_id.into(),
            });
        }
        let Some(open) = &self.open else {
            return Err(SubmitError::Closed {
                round,
                task_id: task_id.into(),
                open: "nothing".into(),
            });
        };
        if open.plan.round != round || open.plan.task_id != task_id {
            return Err(SubmitError::Closed {
                round,
                task_id: task_id.into(),
                open: format!("round {} task `{}`", open.plan.round, open.plan.task_id),
            });
        }
        if !open.selected.contains(agent) {
            return Err(SubmitError::NotSelected(agent.into()));
        }
        if open.reported.contains(agent) {
            return Err(SubmitError::Duplicate(agent.into()));
        }
        if open.dropped.contains(agent) {
            return Err(SubmitError::Dropped(agent.into()));
        }
        Ok(())
    }

    /// Accepts one result, folding its update into the round's aggregate.
    /// A rejected result is recorded and leaves the aggregate untouched.
    pub fn submit(
        &mut self,
        agent: &str,
        run_id: &str,
        round: u64,
        task_id: &str,
        sub: Submission,
    ) -> Result<(), SubmitError> {
        self.precheck(agent, run_id, round, task_id)?;
        let open = self.open.as_mut().expect("precheck found an open task");
        let result = Self::accept(open, &sub);
        match &result {
            Ok(()) => {
                open.reported.insert(agent.to_string());
                open.bytes_in += sub.bytes;
            }
            Err(e) => {
                tracing::warn!(agent, task = task_id, error = %e, "update rejected");
                open.rejected.push((agent.to_string(), e.to_string()));
            }
        }
        result
    }

    /// Accepts a batch of results, in order, with the same checks and the
    /// same outcome as calling [`Engine::submit`] for each, but checks and
    /// folds the updates on the current rayon pool (the simulator's). The
    /// fold is bit-identical to one-by-one submission (see
    /// `SumAccumulator::add_many`), so results do not depend on the thread
    /// count. Updates refused for a NaN/Inf value are found in the fold pass
    /// and recorded as rejected after the batch's other refusals.
    pub fn submit_many(
        &mut self,
        run_id: &str,
        round: u64,
        task_id: &str,
        subs: Vec<(String, Submission)>,
    ) -> Vec<Result<(), SubmitError>> {
        use rayon::prelude::*;
        let (streaming, mut shape) = match &self.open {
            Some(open) => {
                let (len, layout) = (open.plan.spec.update_len(), open.plan.spec.update_layout());
                let streaming = matches!(open.acc, Accumulation::Sum(_));
                let shape: Vec<_> = subs
                    .par_iter()
                    .map(|(_, s)| {
                        s.update.as_ref().map(|u| match streaming {
                            true => u.validate_shape(len, &layout),
                            false => u.validate(len, &layout),
                        })
                    })
                    .collect();
                (streaming, shape)
            }
            None => (false, Vec::new()),
        };
        let mut results = Vec::with_capacity(subs.len());
        let mut accepted = Vec::new();
        for (i, (agent, sub)) in subs.into_iter().enumerate() {
            if let Err(e) = self.precheck(&agent, run_id, round, task_id) {
                results.push(Err(e));
                continue;
            }
            let open = self.open.as_mut().expect("precheck found an open task");
            let pre = shape[i].take();
            match Self::check(open, &sub, |_| pre.unwrap_or(Ok(()))) {
                Ok(()) => {
                    open.reported.insert(agent.clone());
                    accepted.push((i, agent, sub));
                    results.push(Ok(()));
                }
                Err(e) => {
                    tracing::warn!(agent, task = task_id, error = %e, "update rejected");
                    open.rejected.push((agent, e.to_string()));
                    results.push(Err(e));
                }
            }
        }
        let Some(open) = self.open.as_mut() else {
            return results;
        };
        let mut non_finite = vec![false; accepted.len()];
        if let (true, Accumulation::Sum(acc)) = (streaming, &mut open.acc) {
            let (owners, refs): (Vec<usize>, Vec<&Update>) = accepted
                .iter()
                .enumerate()
                .filter_map(|(j, (_, _, s))| s.update.as_ref().map(|u| (j, u)))
                .unzip();
            for k in acc.add_many(&refs).expect("lengths were validated") {
                non_finite[owners[k]] = true;
            }
        }
        for ((i, agent, sub), bad) in accepted.into_iter().zip(non_finite) {
            if bad {
                let values = &sub.update.as_ref().expect("only updates are folded").values;
                let index =
                    fedcart_common::federation::update::first_non_finite(values).unwrap_or(0);
                let e = SubmitError::from(UpdateError::NotFinite {
                    index,
                    value: values[index],
                });
                tracing::warn!(agent, task = task_id, error = %e, "update rejected");
                open.reported.remove(&agent);
                open.rejected.push((agent, e.to_string()));
                results[i] = Err(e);
                continue;
            }
            open.bytes_in += sub.bytes;
            Self::add_metrics(open, &sub);
            if let Accumulation::Individual(list) = &mut open.acc {
                list.extend(sub.update);
            }
        }
        results
    }

    fn accept(open: &mut OpenTask, sub: &Submission) -> Result<(), SubmitError> {
        let (len, layout) = (open.plan.spec.update_len(), open.plan.spec.update_layout());
        Self::check(open, sub, |u| u.validate(len, &layout))?;
        if let Some(u) = &sub.update {
            match &mut open.acc {
                Accumulation::Sum(acc) => acc.add(u)?,
                Accumulation::Individual(list) => list.push(u.clone()),
            }
        }
        Self::add_metrics(open, sub);
        Ok(())
    }

    /// Every check of one result, without folding it; `validate` checks the
    /// update itself (lengths, finiteness, weights).
    fn check(
        open: &OpenTask,
        sub: &Submission,
        validate: impl FnOnce(&Update) -> Result<(), UpdateError>,
    ) -> Result<(), SubmitError> {
        if let Some((k, _)) = sub.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(SubmitError::BadMetric(k.clone()));
        }
        if !(sub.weight.is_finite() && sub.weight >= 0.0) {
            return Err(UpdateError::BadWeight(sub.weight).into());
        }
        let spec = &open.plan.spec;
        if open.plan.secure && sub.update.is_some() {
            return Err(SubmitError::PlaintextInSecureTask(
                open.plan.task_id.clone(),
            ));
        }
        match (&sub.update, spec.kind) {
            (None, TaskKind::Evaluate) => {}
            (None, _) if open.plan.secure => {}
            (Some(u), TaskKind::Train | TaskKind::Stats) => validate(u)?,
            (Some(u), TaskKind::Evaluate) => {
                return Err(UpdateError::WrongLength {
                    expected: 0,
                    got: u.values.len(),
                }
                .into());
            }
            (None, _) => {
                return Err(UpdateError::WrongLength {
                    expected: spec.update_len(),
                    got: 0,
                }
                .into());
            }
        }
        Ok(())
    }

    fn add_metrics(open: &mut OpenTask, sub: &Submission) {
        for (k, v) in &sub.metrics {
            *open.metric_sums.entry(k.clone()).or_default() += v * sub.weight;
        }
        open.metric_weight += sub.weight;
    }

    /// Hands over the unmasked sum of a secure task and the agents whose
    /// inputs it contains. The engine never sees an individual update of a
    /// secure task: only this sum.
    pub fn set_secure_sum(
        &mut self,
        survivors: &[String],
        sum: SumAccumulator,
    ) -> Result<(), SubmitError> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| SubmitError::UnexpectedSecureSum("none".into()))?;
        if !open.plan.secure || open.secure_survivors.is_some() {
            return Err(SubmitError::UnexpectedSecureSum(open.plan.task_id.clone()));
        }
        let len = open.plan.spec.update_len();
        let ncw = open.plan.spec.update_layout().num_coord_weights;
        if sum.sum_values().len() != len {
            return Err(UpdateError::WrongLength {
                expected: len,
                got: sum.sum_values().len(),
            }
            .into());
        }
        if sum.num_coord_weights() != ncw {
            return Err(UpdateError::WrongWeightLength {
                expected: ncw,
                got: sum.num_coord_weights(),
            }
            .into());
        }
        let survivors: BTreeSet<String> = survivors
            .iter()
            .filter(|s| open.selected.contains(*s))
            .cloned()
            .collect();
        open.acc = Accumulation::Sum(sum);
        open.secure_survivors = Some(survivors);
        Ok(())
    }

    /// Records that secure aggregation of the open task failed (too few
    /// survivors, unrecoverable shares): the task aborts with `reason` in its
    /// round record, and nothing of the masked sum reaches the engine.
    pub fn abort_secure(&mut self, reason: String) {
        if let Some(open) = &mut self.open
            && open.plan.secure
        {
            open.secure_abort = Some(reason);
        }
    }

    /// Counts a selected agent that disconnected as dropped for the open task.
    pub fn drop_agent(&mut self, agent: &str) {
        if let Some(open) = &mut self.open
            && open.selected.contains(agent)
            && !open.reported.contains(agent)
            && open.dropped.insert(agent.to_string())
        {
            tracing::info!(agent, task = %open.plan.task_id, "agent dropped");
        }
    }

    /// Selected agents that have neither reported nor dropped.
    pub fn pending(&self) -> usize {
        self.open
            .as_ref()
            .map_or(0, |o| o.selected.len() - o.reported.len() - o.dropped.len())
    }

    /// Closes the open task: commits with a quorum, otherwise aborts.
    pub fn finish_task(&mut self) -> Result<RoundRecord, EngineError> {
        let open = self.open.take().ok_or(EngineError::NoTask)?;
        let kind = open.plan.spec.kind;
        let kind_str = kind_name(kind);
        *self
            .attempts
            .entry((open.plan.round, kind_str))
            .or_insert(0) += 1;
        let quorum = if kind == TaskKind::Evaluate {
            1
        } else {
            self.run.quorum
        };
        // Under secure aggregation only agents inside the unmasked sum count.
        let contributors: BTreeSet<String> = match (&open.secure_survivors, open.plan.secure) {
            (Some(s), _) => s.clone(),
            (None, true) => BTreeSet::new(),
            (None, false) => open.reported.clone(),
        };
        let reported = contributors.len();
        let metrics: BTreeMap<String, f64> = if open.metric_weight > 0.0 {
            open.metric_sums
                .iter()
                .map(|(k, v)| (k.clone(), v / open.metric_weight))
                .collect()
        } else {
            BTreeMap::new()
        };
        let mut record = RoundRecord {
            round: open.plan.round,
            attempt: open.plan.attempt,
            task_id: open.plan.task_id.clone(),
            kind,
            outcome: Outcome::Aborted,
            base_version: open.plan.model_version,
            selected: open.selected.iter().cloned().collect(),
            reported: contributors.iter().cloned().collect(),
            dropped: open.selected.difference(&contributors).cloned().collect(),
            rejected: open.rejected.clone(),
            metrics,
            examples: open.metric_weight,
            started_unix_ms: open.started_unix_ms,
            duration_ms: open.started.elapsed().as_millis() as u64,
            bytes_in: open.bytes_in,
            abort_reason: None,
            privacy: None,
        };
        if reported < quorum || open.secure_abort.is_some() {
            record.abort_reason = Some(match &open.secure_abort {
                Some(reason) => format!("secure aggregation: {reason}"),
                None => format!("{reported} results, quorum is {quorum}"),
            });
            tracing::warn!(task = %record.task_id, reported, quorum, "task aborted");
            if kind == TaskKind::Evaluate {
                self.pending_eval = false;
            }
            self.store.append_history(&record)?;
            return Ok(record);
        }
        match kind {
            TaskKind::Stats => {
                let Accumulation::Sum(acc) = &open.acc else {
                    unreachable!("stats tasks sum")
                };
                let moments = acc.mean_delta(&Default::default());
                let st = Standardizer::from_moments(&moments);
                record.outcome = Outcome::Committed;
                let json = serde_json::to_value(&st).expect("serialisable");
                self.store
                    .append_history_with_meta(&record, &[("standardizer", json)])?;
                self.standardizer = Some(st);
            }
            TaskKind::Evaluate => {
                record.outcome = Outcome::Committed;
                self.store.append_history(&record)?;
                self.pending_eval = false;
            }
            TaskKind::Train => {
                let layout = open.plan.spec.update_layout();
                let mut ledger = self.ledger.clone();
                let next = match (&open.acc, &mut ledger) {
                    (Accumulation::Sum(acc), Some(l)) => {
                        let (step, privacy) =
                            l.release(acc, &open.plan, open.population, reported, self.run.seed)?;
                        record.privacy = Some(privacy);
                        self.strategy.apply(&self.global, &step)
                    }
                    (Accumulation::Sum(acc), None) => {
                        self.strategy.apply(&self.global, &acc.mean_delta(&layout))
                    }
                    (Accumulation::Individual(list), _) => {
                        self.strategy
                            .aggregate_individual(&self.global, list, &layout)
                    }
                };
                if let Some(i) = next.iter().position(|v| !v.is_finite()) {
                    record.abort_reason = Some(format!("aggregate value {i} is not finite"));
                    record.privacy = None;
                    self.store.append_history(&record)?;
                    return Ok(record);
                }
                record.outcome = Outcome::Committed;
                let version = self.version + 1;
                self.store.commit(Commit {
                    version,
                    params: &next,
                    record: &record,
                    strategy_state: &self.strategy.state(),
                })?;
                self.version = version;
                self.global = Arc::new(next);
                self.ledger = ledger;
                self.pending_eval = self.run.evaluate;
                tracing::info!(version, reported, "version committed");
            }
        }
        Ok(record)
    }
}
