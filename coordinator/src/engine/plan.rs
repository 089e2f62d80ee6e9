//! Planning: which task comes next, which agents are selected (seeded by the
//! run seed and the task id), and the task spec and seeds they receive.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use fedcart_common::federation::aggregate::SumAccumulator;
use fedcart_common::task::{TaskKind, TaskSpec};
use rand::seq::SliceRandom;

use super::{Accumulation, Engine, EngineError, OpenTask, RunStop, TaskPlan, unix_ms};
use crate::config::Selection;
use crate::record::kind_name;

impl Engine {
    /// The round and kind of the task [`Engine::start_task`] would open next
    /// (None when finished); drivers use it to pick whom to offer it to.
    pub fn next_task(&self) -> Option<(u64, TaskKind)> {
        self.next_kind()
    }

    pub(super) fn next_kind(&self) -> Option<(u64, TaskKind)> {
        if self.stopped.is_some() {
            self.serving_task().map(|v| (v, TaskKind::Evaluate))
        } else if self.run.model.stats_len() > 0 && self.standardizer.is_none() {
            Some((0, TaskKind::Stats))
        } else if self.pending_eval {
            Some((self.version, TaskKind::Evaluate))
        } else if self.version < self.run.rounds && !self.complete {
            Some((self.version + 1, TaskKind::Train))
        } else {
            self.serving_task().map(|v| (v, TaskKind::Evaluate))
        }
    }

    /// Whether a task of `kind` at `round` hands the run's model out: the
    /// evaluation of the last version (the run ends after it unless a better
    /// one is then served), or the serving task of the best version after
    /// training ends. Every available merchant takes part, whatever
    /// `selection` says, so that each one holds the model it is served from.
    fn hands_out(&self, kind: TaskKind, round: u64) -> bool {
        kind == TaskKind::Evaluate
            && (self.stopped.is_some()
                || !self.pending_eval
                || round >= self.run.rounds
                || self.complete)
    }

    /// Selects agents among `available` and opens the next task.
    pub fn start_task(&mut self, available: &[String]) -> Result<TaskPlan, EngineError> {
        if let Some(open) = &self.open {
            return Err(EngineError::TaskOpen(open.plan.task_id.clone()));
        }
        let (round, kind) = self.next_kind().ok_or(EngineError::Finished)?;
        let kept: Vec<String>;
        let available = if self.set_aside.is_empty() {
            available
        } else {
            kept = available
                .iter()
                .filter(|a| !self.set_aside.contains(*a))
                .cloned()
                .collect();
            &kept[..]
        };
        let sel = &self.run.selection;
        let needed = sel.min_agents.max(sel.min_available);
        if available.len() < needed {
            return Err(EngineError::NotEnoughAgents {
                available: available.len(),
                needed,
            });
        }
        // Room for the version this task would commit (twice: the store
        // writes a new copy before it frees pages) and its record, before
        // any merchant trains or any sum is revealed.
        let model_bytes = self.global.len() as u64 * 4;
        self.store.check_room(2 * model_bytes + (1 << 20))?;
        let kind_name = kind_name(kind);
        let attempt = self.attempts.get(&(round, kind_name)).copied().unwrap_or(0) + 1;
        let task_id = format!("r{round}a{attempt}-{kind_name}");
        // The evaluation that hands the run's model out goes to every
        // merchant there, not to a sample: each one serves from it.
        let hands_out = self.hands_out(kind, round);
        let (selected, population) = if hands_out {
            every(available)
        } else if let Some(pinned) = self.pinned(round, kind).cloned() {
            // A secure sum of this round may have been unmasked before a
            // restart: the retry is over exactly its merchants (`unmask`).
            (
                self.select_pinned(round, pinned, available)?,
                available.len(),
            )
        } else {
            // Merchants that declined the run's tasks for a lasting cause
            // are drawn only when the others cannot fill the task: each
            // selection of one cost the round an attempt, and one
            // misconfigured merchant among a quorum of healthy ones stopped
            // a run on `max_attempts` (found by a new-user probe).
            let serving: Vec<String>;
            let pool = if self.declined.is_empty() {
                available
            } else {
                serving = available
                    .iter()
                    .filter(|a| !self.declined.contains_key(*a))
                    .cloned()
                    .collect();
                if serving.len() >= pool_of(available, sel).1 {
                    &serving[..]
                } else {
                    available
                }
            };
            if kind == TaskKind::Evaluate {
                // Versions are compared on their evaluations (the best
                // version, early stopping): a sample must be the same
                // merchants each round, not a fresh draw that makes each
                // figure another subset's.
                select_cohort(pool, sel, self.run.seed)
            } else {
                select(pool, sel, self.run.seed, &task_id)
            }
        };
        let sampled = kind == TaskKind::Evaluate && selected.len() < population;
        if kind == TaskKind::Train {
            self.check_delta(round, population)?;
            self.check_budget(round, selected.len())?;
        }

        // An analysis's task is sized by the current state (itemsets: the
        // level's candidates; segments: the exchange, one candidate slot
        // per selected merchant).
        // The final serving task evaluates an older version (the best one);
        // every other task works on the latest.
        let base = if kind == TaskKind::Evaluate {
            round
        } else {
            self.version
        };
        let params = self
            .model(base)?
            .ok_or_else(|| EngineError::Config(format!("version {base} is not stored")))?;
        let model = self
            .run
            .model
            .for_task(&params, &selected)
            .map_err(|e| EngineError::Config(format!("version {base}: {e}")))?;
        let spec = TaskSpec {
            kind,
            model,
            sgd: self.run.sgd.clone(),
            seed: self.run.seed,
            round,
            standardizer: self.standardizer.clone(),
            dp: match (&self.ledger, kind) {
                (Some(l), TaskKind::Train) => Some(l.task(selected.len(), self.global.len())?),
                _ => None,
            },
            best_version: match kind {
                TaskKind::Evaluate => self.best.as_ref().map(|b| b.version),
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
            model_version: base,
            model_len: if needs_model { params.len() as u64 } else { 0 },
            selected: selected.clone(),
            spec,
            hands_out,
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
            sampled,
            selected: selected.into_iter().collect(),
            reported: BTreeSet::new(),
            dropped: BTreeSet::new(),
            refused: BTreeSet::new(),
            masked_refusals: BTreeMap::new(),
            rejected: Vec::new(),
            acc,
            metric_sums: BTreeMap::new(),
            metric_weight: Default::default(),
            metric_parts: BTreeMap::new(),
            evaluations: BTreeMap::new(),
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            bytes_in: 0,
            secure_survivors: None,
            secure_clipped: None,
            secure_abort: None,
            secure_revealed: None,
            marked: false,
        });
        tracing::info!(task = %plan.task_id, selected = plan.selected.len(), run = %self.run.run_id, "task started");
        Ok(plan)
    }
}

impl Engine {
    /// Stops the run, before anything is sent, when `population` merchants
    /// are available to training round `round` and `run.dp.delta` is not
    /// below 1/`population`: the check at start took `run.dp.population`,
    /// or `selection.min_agents` without it, for the federation's size, and
    /// a δ of 0.009 ran rounds of 150 merchants.
    fn check_delta(&mut self, round: u64, population: usize) -> Result<(), EngineError> {
        let Some(dp) = &self.run.dp else {
            return Ok(());
        };
        if dp.delta * (population as f64) < 1.0 {
            return Ok(());
        }
        let stop = RunStop::Delta {
            round,
            delta: dp.delta,
            merchants: population,
            assumed: dp.population.unwrap_or(self.run.selection.min_agents),
        };
        tracing::error!(round, "{stop}");
        let json = serde_json::to_value(&stop).expect("serialisable");
        self.store.put_meta_json(&[("stopped", json)])?;
        self.stopped = Some(stop.clone());
        Err(EngineError::Stopped(stop))
    }

    /// Stops the run, before anything is sent, when composing training
    /// round `round` of `selected` merchants could take ε above
    /// `run.dp.target_epsilon`.
    fn check_budget(&mut self, round: u64, selected: usize) -> Result<(), EngineError> {
        let Some(l) = &self.ledger else {
            return Ok(());
        };
        let Some(target) = l.settings().target_epsilon else {
            return Ok(());
        };
        let (spent, next) = l.epsilon_if_one_more_round(selected, self.run.quorum)?;
        if next <= target * (1.0 + 1e-9) {
            return Ok(());
        }
        // Distributed noise solved for a target is planned for a cohort;
        // a larger one commits less noise in the worst case.
        let settings = l.settings();
        let planned = settings.planned_cohort(&self.run);
        let over_plan = (settings.mode == crate::config::DpMode::Distributed
            && settings.noise_multiplier.is_none()
            && selected as f64 > planned + 1e-9)
            .then(|| (planned.round() as usize, selected));
        let stop = RunStop::Budget {
            round,
            spent,
            next,
            target,
            over_plan,
        };
        // A planned end (the budget), not a fault.
        tracing::warn!(round, spent, next, target, "{stop}");
        let json = serde_json::to_value(&stop).expect("serialisable");
        self.store.put_meta_json(&[("stopped", json)])?;
        self.stopped = Some(stop.clone());
        Err(EngineError::Stopped(stop))
    }
}

/// Every distinct agent of `available`, sorted (the hand-out, see
/// [`Engine::hands_out`]), and their number.
fn every(available: &[String]) -> (Vec<String>, usize) {
    let mut all = available.to_vec();
    all.sort();
    all.dedup();
    let n = all.len();
    (all, n)
}

/// Draws the agents of task `task_id` from `available`: `fraction` of the
/// distinct agents (rounded up, clamped to `[min_agents, max_agents]` and to
/// what is there), shuffled by the run seed and the task id so that a run
/// replays exactly. Returns the selected agents, sorted, and the number of
/// distinct agents available (the population the cohort was drawn from).
pub(super) fn select(
    available: &[String],
    sel: &Selection,
    seed: u64,
    task_id: &str,
) -> (Vec<String>, usize) {
    let (mut pool, want) = pool_of(available, sel);
    let population = pool.len();
    pool.shuffle(&mut fedcart_common::seed::rng(seed, &["select", task_id]));
    let mut selected: Vec<String> = pool.into_iter().take(want).collect();
    selected.sort();
    (selected, population)
}

/// Draws an evaluation's agents from `available`: as many as [`select`]
/// takes, but the same merchants every round of the run. Each merchant gets
/// a rank from the run seed and its id alone, and the lowest ranks among
/// those available are taken, so a merchant that is away is replaced by the
/// next in rank and the rest of the cohort stays.
pub(super) fn select_cohort(
    available: &[String],
    sel: &Selection,
    seed: u64,
) -> (Vec<String>, usize) {
    let (mut pool, want) = pool_of(available, sel);
    let population = pool.len();
    pool.sort_by_cached_key(|m| fedcart_common::seed::derive(seed, &["validation-cohort", m]));
    let mut selected: Vec<String> = pool.into_iter().take(want).collect();
    selected.sort();
    (selected, population)
}

/// The distinct agents of `available`, sorted, and how many a task takes:
/// `fraction` of `available` rounded up, clamped to `[min_agents,
/// max_agents]` and to what is there.
fn pool_of(available: &[String], sel: &Selection) -> (Vec<String>, usize) {
    let want = ((available.len() as f64 * sel.fraction).ceil() as usize)
        .clamp(sel.min_agents, sel.max_agents)
        .min(available.len());
    let mut pool: Vec<String> = available.to_vec();
    pool.sort();
    pool.dedup();
    (pool, want)
}
