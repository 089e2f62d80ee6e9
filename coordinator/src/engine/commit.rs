//! Commit: closing a task. With a quorum the aggregate goes through the
//! privacy ledger and the strategy and is committed to the store; without
//! one the task aborts, nothing changes, and the round is attempted again.

use std::collections::BTreeSet;
use std::sync::Arc;

use fedcart_common::data::standardize::Standardizer;
use fedcart_common::task::TaskKind;

use super::{Accumulation, BestVersion, Engine, EngineError, OpenTask, RunStop, selection};
use crate::record::{Outcome, RoundRecord, kind_name};
use crate::store::Commit;

/// The reason a task record gives for a merchant set aside by
/// [`Engine::accuse`], once per merchant (`Engine::noted_aside`).
pub(super) const SET_ASIDE: &str = "set aside for the rest of the run: a secure round's share \
     bundle it sent failed authentication (or, accused by one merchant only, it or its accuser \
     is lying)";

/// The record's reason for a merchant set aside by [`Engine::forged_share`].
pub(super) const FORGED_SHARE: &str = "set aside for the rest of the run: a share it revealed at a \
     secure round's unmask stage was proven forged by the other holders' shares";

impl Engine {
    /// Model selection after an evaluation of the current version: the new
    /// best version if its federated validation metric improved on the best
    /// so far (strictly), and the early stop if `run.early_stopping.patience`
    /// evaluated versions have passed since the best one.
    ///
    /// Patience counts evaluated versions, not versions: boosting commits
    /// one version per tree level and is evaluated only between trees.
    fn select(
        &self,
        record: &RoundRecord,
        open: &OpenTask,
    ) -> Result<(Option<BestVersion>, Option<RunStop>), EngineError> {
        let model = &self.run.model;
        let Some((metric, higher)) = model.selection_metric() else {
            return Ok((None, None));
        };
        let Some(&value) = record.metrics.get(metric).filter(|v| v.is_finite()) else {
            return Ok((None, None));
        };
        let improved = match &self.best {
            None => true,
            Some(b) => {
                let len = open.plan.spec.update_len();
                let c = selection::comparable(model, len, value, &open.evaluations, b);
                if let Some(n) = c.merchants {
                    tracing::info!(
                        version = self.version,
                        best = b.version,
                        merchants = n,
                        "{metric} compared over the merchants that evaluated both: {:.4} against {:.4}",
                        c.value,
                        c.best
                    );
                }
                if higher {
                    c.value > c.best
                } else {
                    c.value < c.best
                }
            }
        };
        let new_best = improved.then(|| BestVersion {
            version: self.version,
            metric: metric.to_string(),
            value,
            by_merchant: open.evaluations.clone(),
        });
        let stop = match (&self.best, &self.run.early_stopping) {
            (Some(b), Some(es)) if !improved => {
                // This evaluation and the committed ones after the best.
                let since = 1 + self
                    .store
                    .history()?
                    .iter()
                    .filter(|r| {
                        r.kind == TaskKind::Evaluate
                            && r.outcome == Outcome::Committed
                            && r.round > b.version
                            && r.round < self.version
                    })
                    .count() as u64;
                (since >= es.patience).then(|| RunStop::EarlyStopped {
                    version: self.version,
                    best_version: b.version,
                    metric: metric.to_string(),
                    best: b.value,
                })
            }
            _ => None,
        };
        Ok((new_best, stop))
    }

    /// Closes the open task: commits with a quorum, otherwise aborts.
    pub fn finish_task(&mut self) -> Result<RoundRecord, EngineError> {
        let record = self.close_open_task()?;
        self.last_abort = super::retried(&record);
        Ok(record)
    }

    fn close_open_task(&mut self) -> Result<RoundRecord, EngineError> {
        let mut open = self.open.take().ok_or(EngineError::NoTask)?;
        // Masked inputs refused, of merchants whose input never counted.
        for (m, why) in std::mem::take(&mut open.masked_refusals) {
            if !open.reported.contains(&m) {
                open.rejected.push((m, why));
            }
        }
        // Who this task's accusations set aside, in its record.
        for m in self.set_aside.intersection(&open.selected) {
            if self.noted_aside.insert(m.clone()) {
                let why = if self.proven_forger(m) {
                    FORGED_SHARE
                } else {
                    SET_ASIDE
                };
                open.rejected.push((m.clone(), why.into()));
            }
        }
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
        // Each figure's mean over the agents that reported it, weighted by
        // the rows it is a mean over (`metrics::FigureWeights`) and summed
        // in agent order (`OpenTask::metric_parts`).
        let mut pool = fedcart_common::metrics::PooledMean::default();
        let mut examples = 0.0;
        for (figures, weights) in open.metric_parts.values() {
            pool.add(figures, *weights);
            examples += weights.examples;
        }
        // A secure task's examples: the unmasked sum's weight (the headers
        // carry 1 each).
        if let (true, Accumulation::Sum(acc)) = (open.plan.secure, &open.acc) {
            examples = acc.total_weight();
        }
        let metrics = pool.mean();
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
            refused: open.refused.iter().cloned().collect(),
            metrics,
            examples,
            started_unix_ms: open.started_unix_ms,
            duration_ms: open.started.elapsed().as_millis() as u64,
            bytes_in: open.bytes_in,
            abort_reason: None,
            privacy: None,
            secagg_clipped: open.secure_clipped,
            sampled: open.sampled,
            seen_by: None,
        };
        if let (Some(reason), Some(survivors)) = (&open.secure_abort, open.secure_revealed) {
            let reason = format!("secure aggregation: {reason}");
            tracing::warn!(task = %record.task_id, %reason, "an unmasked sum was refused: the run stops");
            if kind == TaskKind::Train
                && let Some(ledger) = &mut self.ledger
            {
                record.privacy = Some(ledger.account_revealed(&open.plan, survivors)?);
            }
            return self.refuse_revealed(record, true, reason);
        }
        if reported < quorum || open.secure_abort.is_some() {
            record.abort_reason = Some(match &open.secure_abort {
                Some(reason) => format!("secure aggregation: {reason}"),
                None => format!("{reported} results, quorum is {quorum}"),
            });
            tracing::warn!(task = %record.task_id, reported, quorum, "task aborted");
            if kind == TaskKind::Evaluate {
                self.pending_eval = false;
            }
            return self.close_aborted(record, None);
        }
        // Krum's guarantee needs 2f + 3 updates: with fewer (merchants
        // sampled, dropped or rejected) the round is not aggregated.
        let needed = self.strategy.min_updates();
        if kind == TaskKind::Train
            && let Accumulation::Individual(list) = &open.acc
            && list.len() < needed
        {
            let reason = format!(
                "{} needs at least {needed} updates; {} arrived",
                self.strategy.name(),
                list.len()
            );
            tracing::warn!(task = %record.task_id, %reason, "task aborted");
            record.abort_reason = Some(reason);
            return self.close_aborted(record, None);
        }
        match kind {
            TaskKind::Stats => {
                let Accumulation::Sum(acc) = &open.acc else {
                    unreachable!("stats tasks sum")
                };
                let moments = acc.mean_delta(&Default::default());
                // Each plaintext update was checked on arrival; a secure sum
                // is seen only here, and a forged input in it would set
                // every merchant's features for the whole run.
                if let Some((j, mean, square)) =
                    fedcart_common::data::standardize::impossible_feature(&moments)
                {
                    let reason = format!(
                        "the statistics step's sum is one no rows can have (feature {j}: mean \
                         {mean:.6e}, mean square {square:.6e}, a negative variance): a merchant \
                         sent a forged input, and nobody can tell who under secure aggregation; \
                         standardising with it would put every customer of every merchant at \
                         the same value for the whole run"
                    );
                    tracing::error!(task = %record.task_id, %reason, "statistics refused");
                    return self.refuse_revealed(record, open.plan.secure, reason);
                }
                let st = Standardizer::from_moments(&moments).with_rows(acc.total_weight());
                record.outcome = Outcome::Committed;
                let json = serde_json::to_value(&st).expect("serialisable");
                let cleared = self.marker_cleared_by(&record);
                let mut meta = vec![("standardizer", json)];
                meta.extend(cleared.clone());
                self.store.append_history_with_meta(&record, &meta)?;
                self.standardizer = Some(st);
                if cleared.is_some() {
                    self.unmasking = None;
                }
            }
            TaskKind::Evaluate => {
                // Metrics that do not average (AUC, PR-AUC) come from the
                // summed evaluation vectors, replacing the weighted means.
                if let Accumulation::Sum(acc) = &open.acc
                    && open.plan.spec.update_len() > 0
                {
                    let pooled = open.plan.spec.model.pooled_metrics(acc.sum_values());
                    record.metrics.extend(pooled);
                }
                record.outcome = Outcome::Committed;
                // The serving task re-evaluates the best version: nothing
                // to select, and it must not count against the patience.
                let (best, stop) = if record.base_version == self.version {
                    self.select(&record, &open)?
                } else {
                    (None, None)
                };
                let cleared = self.marker_cleared_by(&record);
                let mut meta: Vec<_> = cleared.iter().cloned().collect();
                if let Some(b) = &best {
                    meta.push((
                        "best_version",
                        serde_json::to_value(b).expect("serialisable"),
                    ));
                }
                if let Some(s) = &stop {
                    meta.push(("stopped", serde_json::to_value(s).expect("serialisable")));
                }
                self.store.append_history_with_meta(&record, &meta)?;
                if cleared.is_some() {
                    self.unmasking = None;
                }
                if best.is_some() {
                    self.best = best;
                }
                if let Some(s) = stop {
                    tracing::info!("{s}");
                    self.stopped = Some(s);
                }
                self.last_evaluated = Some((record.base_version, record.sampled));
                self.pending_eval = false;
            }
            TaskKind::Train => {
                let layout = open.plan.spec.update_layout();
                let mut ledger = self.ledger.clone();
                // The optimiser state (momentum, moments) advances inside
                // `apply`: keep a copy so an aborted round leaves it as it
                // was, and only a commit keeps the new state.
                let before = self.strategy.state();
                let revealed = open.plan.secure;
                let model = open.plan.spec.model.model();
                let next = match (&open.acc, &mut ledger, model.analysis()) {
                    // An analysis (itemsets): the next state from the sum.
                    (Accumulation::Sum(acc), None, Some(analysis)) => {
                        match analysis.next_version(
                            &self.global,
                            acc.sum_values(),
                            acc.total_weight(),
                        ) {
                            Ok(next) => next,
                            Err(e) => {
                                return self.refuse_revealed(
                                    record,
                                    revealed,
                                    format!("the summed counts were refused: {e}"),
                                );
                            }
                        }
                    }
                    (Accumulation::Sum(acc), Some(l), _) => {
                        let (step, privacy) =
                            l.release(acc, &open.plan, reported, self.run.seed)?;
                        record.privacy = Some(privacy);
                        self.strategy.apply(&self.global, &step)
                    }
                    (Accumulation::Sum(acc), None, None) => {
                        self.strategy.apply(&self.global, &acc.mean_delta(&layout))
                    }
                    (Accumulation::Individual(list), _, _) => {
                        self.strategy
                            .aggregate_individual(&self.global, list, &layout)
                    }
                };
                if let Some(i) = next.iter().position(|v| !v.is_finite()) {
                    let reason = format!("aggregate value {i} is not finite");
                    record.abort_reason = Some(reason.clone());
                    self.strategy.restore(&before);
                    if !revealed {
                        record.privacy = None;
                        return self.close_aborted(record, None);
                    }
                    // The unmasked sum was seen: account its noise, and stop
                    // rather than retry over the same inputs.
                    self.ledger = ledger;
                    let stop = RunStop::Revealed {
                        round: record.round,
                        task_id: record.task_id.clone(),
                        reason,
                    };
                    return self.close_aborted(record, Some(stop));
                }
                record.outcome = Outcome::Committed;
                let version = self.version + 1;
                self.store.commit(Commit {
                    version,
                    params: &next,
                    record: &record,
                    strategy_state: &self.strategy.state(),
                })?;
                self.complete = model.analysis().is_some_and(|a| a.complete(&next));
                self.version = version;
                self.global = Arc::new(next);
                self.ledger = ledger;
                self.pending_eval =
                    super::publishes(&self.run, version, &self.global, self.complete);
                tracing::info!(version, reported, run = %self.run.run_id, "version committed");
            }
        }
        Ok(record)
    }

    /// Aborts a training task whose aggregate cannot be committed for
    /// `reason`. A sum that was revealed by secure aggregation is not
    /// attempted again over the same inputs: the run stops.
    fn refuse_revealed(
        &mut self,
        mut record: RoundRecord,
        revealed: bool,
        reason: String,
    ) -> Result<RoundRecord, EngineError> {
        record.abort_reason = Some(reason.clone());
        let stop = revealed.then(|| RunStop::Revealed {
            round: record.round,
            task_id: record.task_id.clone(),
            reason,
        });
        self.close_aborted(record, stop)
    }

    /// Writes an aborted attempt. When it is the round's `run.max_attempts`-th
    /// (or `stop` is given), the run stops in the same store transaction,
    /// with the dominant cause of the round's aborts.
    fn close_aborted(
        &mut self,
        record: RoundRecord,
        stop: Option<RunStop>,
    ) -> Result<RoundRecord, EngineError> {
        let key = (record.round, kind_name(record.kind));
        let attempts = self.attempts.get(&key).copied().unwrap_or(0);
        let stop = match stop {
            Some(s) => Some(s),
            None if attempts >= self.run.max_attempts => Some(super::stop::gave_up(
                &self.store.history()?,
                &record,
                attempts,
            )),
            None => None,
        };
        match stop {
            None => self.store.append_history(&record)?,
            Some(stop) => {
                tracing::error!(task = %record.task_id, "{stop}");
                let json = serde_json::to_value(&stop).expect("serialisable");
                self.store
                    .append_history_with_meta(&record, &[("stopped", json)])?;
                self.stopped = Some(stop);
            }
        }
        Ok(record)
    }
}
