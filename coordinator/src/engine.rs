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
//!
//! The work is split along its seams: `plan` picks the next task and its
//! agents, `collect` checks and folds the results, `commit` closes the task.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fedcart_common::data::standardize::Standardizer;
use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::federation::strategy::Strategy;
use fedcart_common::federation::update::{Update, UpdateError};
use fedcart_common::metrics::FigureWeights;
use fedcart_common::task::TaskKind;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::RunConfig;
use crate::ledger::{Ledger, NoiseSource};
use crate::record::{Outcome, RoundRecord, kind_name};
use crate::store::{Store, StoreError};

pub use selection::MerchantEvaluation;

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
    /// The run stopped before its last round (see [`RunStop`]).
    #[error("the run stopped: {0}")]
    Stopped(RunStop),
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
    /// The agent's update for this task was refused: one update per task,
    /// so that a round record's refusal is never followed by an accepted
    /// update from the same merchant.
    #[error("agent `{0}`'s update for this task was refused: it may send no other")]
    AlreadyRefused(String),
    /// The update itself is invalid.
    #[error("invalid update: {0}")]
    Invalid(#[from] UpdateError),
    /// A metric is not a finite number.
    #[error("metric `{0}` is not finite")]
    BadMetric(String),
    /// A metric times the weight, summed with the others', leaves f64: one
    /// agent's figures would make the round's mean infinite.
    #[error("metric `{0}` weighted by the update's weight overflows the round's sum")]
    MetricOverflow(String),
    /// A value of an evaluation vector (a churn model's per-class score
    /// histogram) that is not a count.
    #[error("evaluation histogram bin {index} holds {value}: not a count")]
    NotAHistogramCount {
        /// Position of the value.
        index: usize,
        /// The value sent.
        value: f32,
    },
    /// Statistics (`Σx`, `Σx²` over its rows) no rows can have: a sum of
    /// squares below the square of the sum over the rows.
    #[error(
        "statistics of feature {feature} no rows can have: mean {mean:.6e} and mean square \
         {square:.6e} give a negative variance"
    )]
    ImpossibleStatistics {
        /// The feature.
        feature: usize,
        /// Its mean over the merchant's rows.
        mean: f64,
        /// Its mean square.
        square: f64,
    },

    /// An evaluation whose held-out histogram does not count the held-out
    /// rows its result is weighted by (each row is in it once): a merchant
    /// claiming a billion rows in its histograms at weight 1 chose the
    /// version every merchant was served.
    #[error(
        "evaluation histograms count {counted} held-out rows, and the result is weighted by \
         {weight}: each held-out row is counted once"
    )]
    HistogramTotal {
        /// The held-out histogram's total.
        counted: f64,
        /// The result's weight.
        weight: f64,
    },
    /// A plaintext update was sent for a task under secure aggregation.
    #[error("task `{0}` uses secure aggregation: plaintext updates are refused")]
    PlaintextInSecureTask(String),
    /// An analysis's update holds a value that is not a count (see
    /// `Analysis::first_bad_value`).
    #[error(
        "value {index} of the update is {value}: not a count between 0 and the weight {weight}"
    )]
    NotACount {
        /// Position of the value.
        index: usize,
        /// The value sent.
        value: f32,
        /// The update's weight (the merchant's baskets).
        weight: f64,
    },
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
    /// Example weight: of the update, and of every metric but the
    /// validation ones.
    pub weight: f64,
    /// Weight of the validation metrics (`val_*`): the agent's validation
    /// rows ([`FigureWeights`](fedcart_common::metrics::FigureWeights)).
    pub validation_weight: f64,
    /// Payload bytes received (for accounting).
    pub bytes: u64,
}

impl Submission {
    /// The weights the submission's metrics pool with.
    pub fn figure_weights(&self) -> FigureWeights {
        FigureWeights {
            examples: self.weight,
            validation: self.validation_weight,
        }
    }
}

enum Accumulation {
    Sum(SumAccumulator),
    Individual(Vec<Update>),
}

struct OpenTask {
    plan: TaskPlan,
    /// An evaluation that selected a sample of the available merchants
    /// (recorded as `RoundRecord::sampled`).
    sampled: bool,
    selected: BTreeSet<String>,
    reported: BTreeSet<String>,
    dropped: BTreeSet<String>,
    rejected: Vec<(String, String)>,
    /// Agents whose update was refused (also in `dropped`, so the task does
    /// not wait for them); `rejected` says why, within its cap.
    refused: BTreeSet<String>,
    /// Masked inputs refused before anything of them reached the sum (a
    /// wrong length, a frame naming another agent), per merchant, the first
    /// reason: recorded in `rejected` at the close for a merchant whose
    /// masked input never counted ([`Engine::note_refused_masked`]).
    masked_refusals: BTreeMap<String, String>,
    acc: Accumulation,
    /// Per metric: the weighted sum of the figures reported and the weight
    /// of the agents that reported it (a figure undefined on an agent's
    /// rows, such as recall without a churner, is left out, not a 0).
    metric_sums: BTreeMap<String, (f64, f64)>,
    /// The total weights of the agents' figures so far.
    metric_weight: FigureWeights,
    /// Each agent's figures and weights as accepted: the record's means are
    /// summed from these in agent order, not in the order results arrived
    /// (floating-point sums depend on it), so a replay over gRPC gives the
    /// same record to the last bit.
    metric_parts: BTreeMap<String, (BTreeMap<String, f64>, FigureWeights)>,
    /// An evaluation's parts, merchant by merchant, for model selection.
    evaluations: BTreeMap<String, MerchantEvaluation>,
    started: Instant,
    started_unix_ms: i64,
    bytes_in: u64,
    /// Survivors of secure aggregation, once the driver handed over the sum.
    secure_survivors: Option<BTreeSet<String>>,
    /// What secure aggregation's clip cut from that sum.
    secure_clipped: Option<crate::record::ClippedRecord>,
    /// Why secure aggregation failed, if it did: the task then aborts.
    secure_abort: Option<String>,
    /// When secure aggregation failed after unmasking (the sum was seen):
    /// the survivors whose inputs it held. The run then stops.
    secure_revealed: Option<usize>,
    /// This task stored the unmask marker ([`Engine::before_unmask`]).
    marked: bool,
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
    /// Why the run stopped before its last round, if it did.
    stopped: Option<RunStop>,
    /// An analysis (frequent itemsets) whose latest version needs no
    /// further round: the run ends after handing it to the agents.
    complete: bool,
    /// The best version by the federated validation metric, if any was
    /// evaluated (meta key `best_version`).
    best: Option<BestVersion>,
    /// The version of the last committed evaluation, and whether it reached
    /// only a sample of the merchants: when the run ends and that is not the
    /// best version, or was sampled, one more evaluation of the best version
    /// hands it to every agent ([`Engine::serving_task`]).
    last_evaluated: Option<(u64, bool)>,
    /// Secure rounds: who reported a share bundle from whom that failed
    /// authentication (accused → accusers), over the run ([`Engine::accuse`]).
    accusations: BTreeMap<String, BTreeSet<String>>,
    /// Merchants no task of this run selects any more (see [`Engine::accuse`]).
    set_aside: BTreeSet<String>,
    /// Those of `set_aside` a task record has named.
    noted_aside: BTreeSet<String>,
    /// Merchants whose session declined a task of this run for a lasting
    /// cause (its data does not fit the model, its policy refuses the run),
    /// with that reason: a task selects them only when the others cannot
    /// fill it, until they join again ([`Engine::decline_for_run`]). In
    /// memory only: a restarted coordinator asks again.
    declined: BTreeMap<String, String>,
    /// The merchants of the last secure sum whose unmask requests left
    /// without a commit or a known failure following (meta key `unmasking`):
    /// its round is retried over exactly them (see `unmask`).
    unmasking: Option<unmask::Unmasking>,
    /// The last task's record when that task aborted (cleared when a task
    /// commits): the runs list says why the round is being retried.
    last_abort: Option<RoundRecord>,
}

/// `record` when it is an aborted attempt the run retries (evaluations are
/// not retried): what [`Engine::retrying`] names.
fn retried(record: &RoundRecord) -> Option<RoundRecord> {
    (record.outcome == Outcome::Aborted && record.kind != TaskKind::Evaluate)
        .then(|| record.clone())
}

/// Whether `version` is followed by an evaluation task: after every version
/// when the run evaluates, and always after the last version, which is how
/// the final model (or an analysis's final state, say the frequent itemsets)
/// reaches the agents even when `run.evaluate` is off: an agent keeps the
/// model of the last task it ran, and without this it would hold only the
/// version it last trained from.
fn publishes(run: &RunConfig, version: u64, global: &[f32], complete: bool) -> bool {
    let model = run.model.model();
    match model.analysis() {
        // Boosting evaluates only between trees (`Analysis::checkpoint`).
        Some(a) => complete || version >= run.rounds || (run.evaluate && a.checkpoint(global)),
        None => run.evaluate || version >= run.rounds,
    }
}

/// The version merchants are served: the best by the federated validation
/// metric (`ModelSpec::selection_metric`), not necessarily the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestVersion {
    /// The version.
    pub version: u64,
    /// The validation metric's name.
    pub metric: String,
    /// Its figure over the merchants that evaluated this version.
    pub value: f64,
    /// Each of those merchants' part, to compare a later evaluation over
    /// the same merchants (see `selection`); empty in a store written before
    /// they were kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_merchant: BTreeMap<String, MerchantEvaluation>,
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
        Self::open_from(store, configured, None)
    }

    /// [`Engine::open`], with a new run's version 0 set to `initial`
    /// instead of the model's initial parameters (scheduled retraining
    /// starts from the previous instance's served version). A resumed run
    /// keeps its stored versions.
    pub fn open_from(
        store: Store,
        configured: RunConfig,
        initial: Option<Vec<f32>>,
    ) -> Result<Self, EngineError> {
        let run = match store.meta_json::<RunConfig>("run_config")? {
            Some(stored) if stored.run_id != configured.run_id => {
                return Err(EngineError::RunMismatch {
                    path: store.path().display().to_string(),
                    stored: stored.run_id,
                    configured: configured.run_id,
                });
            }
            Some(stored) => {
                warn_if_changed(&stored, &configured);
                stored
            }
            None => {
                let json = serde_json::to_value(&configured).expect("config serialises");
                store.put_meta_json(&[("run_config", json)])?;
                configured
            }
        };
        // A run stored before a check existed (a model too large to
        // allocate, say) is refused by name instead of aborting the process.
        run.validate().map_err(|e| {
            EngineError::Config(format!(
                "run `{}` in {}: {e}",
                run.run_id,
                store.path().display()
            ))
        })?;
        let fresh = run.model.initial_params(run.seed);
        let initial = match initial {
            Some(v) if v.len() != fresh.len() => {
                return Err(EngineError::Config(format!(
                    "a starting version of {} values for a model of {}",
                    v.len(),
                    fresh.len()
                )));
            }
            Some(v) => v,
            None => fresh,
        };
        store.init_model(&initial)?;
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
        if let Some(w) = run
            .dp
            .as_ref()
            .and_then(|dp| dp.weak_guarantee_warning(&run))
        {
            tracing::warn!(run = %run.run_id, "{w}");
        }
        let mut ledger = run
            .dp
            .as_ref()
            .map(|dp| Ledger::open(dp, &run, &history))
            .transpose()
            .map_err(EngineError::Config)?;
        let unmasking = unmask::load(&store)?;
        unmask::record_lost(
            &store,
            &history,
            ledger.as_mut(),
            &mut attempts,
            run.max_attempts,
            &unmasking,
        )?;
        let unmasking = unmask::unless_committed(unmasking, &history);
        let stopped = store.meta_json::<RunStop>("stopped")?;
        let complete = run
            .model
            .model()
            .analysis()
            .is_some_and(|a| a.complete(&global));
        let best = store.meta_json::<BestVersion>("best_version")?;
        let pending_eval = publishes(&run, version, &global, complete)
            && version > 0
            && !history
                .iter()
                .any(|r| r.kind == TaskKind::Evaluate && r.round == version);
        // Set aside stays set aside across a restart; the records name each
        // merchant once.
        let accusations = store
            .meta_json::<BTreeMap<String, BTreeSet<String>>>("accusations")?
            .unwrap_or_default();
        let noted_aside = history
            .iter()
            .flat_map(|r| &r.rejected)
            .filter(|(_, reason)| reason == commit::SET_ASIDE || reason == commit::FORGED_SHARE)
            .map(|(m, _)| m.clone())
            .collect();
        let last_evaluated = history
            .iter()
            .rev()
            .find(|r| r.kind == TaskKind::Evaluate && r.outcome == Outcome::Committed)
            .map(|r| (r.round, r.sampled));
        let last_abort = history.last().and_then(retried);
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
            stopped,
            complete,
            best,
            last_evaluated,
            set_aside: collect::set_aside_by(&accusations),
            accusations,
            noted_aside,
            declined: BTreeMap::new(),
            unmasking,
            last_abort,
        })
    }

    /// Resumes the run whose configuration `store` holds (a run found in
    /// the store's registry at start-up).
    pub fn resume(store: Store) -> Result<Self, EngineError> {
        let run =
            store
                .meta_json::<RunConfig>("run_config")?
                .ok_or_else(|| StoreError::Corrupt {
                    path: store.path().into(),
                    what: "a registered run without its configuration".into(),
                })?;
        Self::open(store, run)
    }

    /// Stops the run for an operator: a task in flight is abandoned (as on
    /// a shutdown: nothing of it is kept), the stop is stored with the run,
    /// and no further task starts. A finished run is left as it is.
    pub fn stop_by_operator(&mut self, by: &str) -> Result<(), EngineError> {
        if self.finished() {
            return Ok(());
        }
        let stop = RunStop::Operator {
            by: by.to_owned(),
            version: self.version,
        };
        let json = serde_json::to_value(&stop).expect("serialisable");
        self.store.put_meta_json(&[("stopped", json)])?;
        self.open = None;
        self.stopped = Some(stop);
        Ok(())
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

    /// True when all rounds are committed and evaluated, or the run stopped
    /// early ([`Engine::stopped`]).
    pub fn finished(&self) -> bool {
        self.next_kind().is_none()
    }

    /// Why the run stopped before its last round, if it did: a round that
    /// aborted `run.max_attempts` times, an exhausted privacy budget, or a
    /// revealed secure sum that could not be committed.
    pub fn stopped(&self) -> Option<&RunStop> {
        self.stopped.as_ref()
    }

    /// The best version so far by the federated validation metric: the one
    /// to serve. `None` before the first evaluation that reported it.
    pub fn best(&self) -> Option<&BestVersion> {
        self.best.as_ref()
    }

    /// Why the round being retried aborted last, as the runs list shows it
    /// ("r3a2-train aborted (attempt 2 of 10, run.max_attempts): …"), while
    /// no task of the run has committed since.
    pub fn retrying(&self) -> Option<String> {
        let r = self.last_abort.as_ref()?;
        Some(format!(
            "{}: {}",
            self.retrying_for_merchants()?,
            attempt_cause(r)
        ))
    }

    /// [`Engine::retrying`] without the cause, which names other merchants
    /// and their refusals: what a merchant's `status` shows.
    pub fn retrying_for_merchants(&self) -> Option<String> {
        let r = self.last_abort.as_ref()?;
        if self.stopped.is_some() || self.finished() {
            return None;
        }
        Some(format!(
            "{} aborted (attempt {} of {}, run.max_attempts)",
            r.task_id,
            self.attempts
                .get(&(r.round, kind_name(r.kind)))
                .copied()
                .unwrap_or(r.attempt),
            self.run.max_attempts,
        ))
    }

    /// The version a final evaluation task must hand to the agents once
    /// training is over (all rounds, or a planned stop): the best version,
    /// when the agents last evaluated another one. Agents keep the model of
    /// the last task they ran, so after it every merchant holds (and
    /// `fedcart-client recommend` serves) the selected version, not the last.
    fn serving_task(&self) -> Option<u64> {
        let serve = self.served_version()?;
        (serve > 0 && self.last_evaluated != Some((serve, false))).then_some(serve)
    }

    /// The version the run serves its merchants: the best so far, or
    /// without evaluations the latest (a run with `run.evaluate` off that a
    /// budget stopped before its last round). `None` once the run failed:
    /// nothing is handed out then, and each merchant keeps what it last
    /// evaluated.
    pub fn served_version(&self) -> Option<u64> {
        if self.stopped.as_ref().is_some_and(|s| !s.is_planned()) {
            return None;
        }
        Some(self.best.as_ref().map_or(self.version, |b| b.version))
    }

    /// Chooses where the DP noise comes from ([`NoiseSource::Os`] unless
    /// changed). Only the simulator asks for seeded noise, which makes an
    /// experiment reproducible and its noise public.
    pub fn set_noise_source(&mut self, source: NoiseSource) {
        if let Some(l) = &mut self.ledger {
            l.set_noise_source(source);
        }
    }

    /// The open task, if any.
    pub fn open_task(&self) -> Option<&TaskPlan> {
        self.open.as_ref().map(|o| &o.plan)
    }
}

mod collect;
mod commit;
mod plan;
mod selection;
mod stop;
pub(crate) mod unmask;

pub use stop::{DIVERGED, RunStop, attempt_cause, dominant_cause};

/// The top-level settings of `configured` that differ from `stored`, as
/// `key: stored → configured` (JSON values), for the operator's warning.
pub fn changed_settings(stored: &RunConfig, configured: &RunConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (
        serde_json::to_value(stored),
        serde_json::to_value(configured),
    ) else {
        return Vec::new();
    };
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
            (x != y).then(|| {
                let cut = |v: &serde_json::Value| {
                    let t = v.to_string();
                    if t.len() > 60 {
                        format!("{}…", t.chars().take(60).collect::<String>())
                    } else {
                        t
                    }
                };
                format!("{k}: {} → {}", cut(x), cut(y))
            })
        })
        .collect()
}

/// Warns when a run given again (`serve --config`, a restart) differs from
/// the one its store holds: the stored one goes on, the edit is ignored.
pub fn warn_if_changed(stored: &RunConfig, configured: &RunConfig) {
    let changed = changed_settings(stored, configured);
    if !changed.is_empty() {
        tracing::warn!(
            run = %stored.run_id,
            changed = %changed.join("; "),
            "the configuration differs from the run the store holds, which goes on unchanged: \
             give the run a new `run_id` (or use another store) to start one with these settings"
        );
    }
}

#[cfg(test)]
mod tests;
