//! Collection: the checks on each submission (run, stale task id,
//! selection, duplicates, drops, validation), the running sum the accepted
//! updates are folded into, and the secure-aggregation hand-over.

use std::collections::{BTreeMap, BTreeSet};

use fedcart_common::federation::update::{Update, UpdateError};
use fedcart_common::metrics::FigureWeights;
use fedcart_common::metrics::histogram::HISTOGRAM_LEN;
use fedcart_common::privacy::secagg::DecodedSum;
use fedcart_common::task::TaskKind;

use super::{Accumulation, Engine, MerchantEvaluation, OpenTask, Submission, SubmitError};

use crate::limits::{MAX_REJECTION_CHARS, MAX_REJECTIONS};
use crate::record::ClippedRecord;

/// Records a refused update in the open task, within [`MAX_REJECTIONS`]
/// entries of at most [`MAX_REJECTION_CHARS`] characters (the last entry
/// says that further ones were not recorded), and counts its sender as done
/// with the task: it may send no other update, and the task stops waiting
/// for it.
fn record_rejection(open: &mut OpenTask, agent: String, e: &dyn std::fmt::Display) {
    open.refused.insert(agent.clone());
    open.dropped.insert(agent.clone());
    let n = open.rejected.len();
    if n + 1 < MAX_REJECTIONS {
        let full = e.to_string();
        let mut reason: String = full.chars().take(MAX_REJECTION_CHARS).collect();
        if reason.len() < full.len() {
            reason.push('…');
        }
        open.rejected.push((agent, reason));
    } else if n + 1 == MAX_REJECTIONS {
        open.rejected.push((
            "*".into(),
            format!("{MAX_REJECTIONS} or more rejections: further ones are not recorded"),
        ));
    }
}

/// A metric name cut for a message, so that a huge name from the network
/// cannot blow up a log line or the round record.
fn shown_name(name: &str) -> String {
    if name.len() <= 64 {
        return name.to_owned();
    }
    let mut shown: String = name.chars().take(32).collect();
    shown.push('…');
    shown
}

/// The accuser of a merchant the coordinator proved to have forged a share
/// ([`Engine::forged_share`]); not a merchant id (ids have no spaces).
pub(super) const PROVEN: &str = "(the coordinator: a forged unmask share)";

/// The merchants [`Engine::accuse`]'s rule sets aside, given who accused
/// whom (accused → accusers), for one malicious merchant M: an honest
/// merchant only ever accuses M (only M's bundles can fail), and only M
/// accuses an honest one. So a merchant is surely M, and set aside alone
/// with everything it said void, when two or more accuse it (M makes one
/// accusation of a merchant), when it accuses two or more (an honest one
/// accuses M alone), or when it accuses a merchant other than its own
/// accuser (an honest accused is accused by M and accuses only M). Every
/// other accusation sets aside both ends: one of the two is lying. M thus
/// costs at most one honest merchant, however many accusations it sends.
/// A merchant the coordinator itself proved a forger (a share it revealed
/// at the unmask stage that the other holders' shares prove wrong,
/// [`Engine::forged_share`]) is sure too: it is recorded as accused by
/// [`PROVEN`], which is no merchant id.
pub(super) fn set_aside_by(accusations: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    // Accuser → the merchants it accused.
    let mut accused_by: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (accused, accusers) in accusations {
        for a in accusers.iter().filter(|a| *a != PROVEN) {
            accused_by
                .entry(a.as_str())
                .or_default()
                .insert(accused.as_str());
        }
    }
    let mut sure: BTreeSet<&str> = accused_by
        .iter()
        .filter(|(_, targets)| targets.len() >= 2)
        .map(|(a, _)| *a)
        .collect();
    for (accused, accusers) in accusations {
        let accuses_another = accused_by
            .get(accused.as_str())
            .is_some_and(|targets| targets.iter().any(|t| !accusers.contains(*t)));
        if accusers.len() >= 2 || accuses_another || accusers.contains(PROVEN) {
            sure.insert(accused.as_str());
        }
    }
    let mut aside: BTreeSet<String> = sure.iter().map(|m| m.to_string()).collect();
    for (accused, accusers) in accusations {
        for accuser in accusers {
            if !sure.contains(accuser.as_str()) && !sure.contains(accused.as_str()) {
                aside.insert(accused.clone());
                aside.insert(accuser.clone());
            }
        }
    }
    aside
}

impl Engine {
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
        if open.refused.contains(agent) {
            return Err(SubmitError::AlreadyRefused(agent.into()));
        }
        if open.dropped.contains(agent) {
            return Err(SubmitError::Dropped(agent.into()));
        }
        Ok(())
    }

    /// Records an upload the transport refused before it reached
    /// [`Engine::submit`] (a wrong vector length, a payload longer or
    /// shorter than its header declared, an undecodable encoding) from a
    /// merchant selected for the open task: logged, in the round's
    /// rejections, and its sender done with the task, as for an invalid
    /// update. Anything else (another task, a merchant not selected, one
    /// already counted) is ignored.
    pub fn refuse_upload(&mut self, agent: &str, task_id: &str, reason: &str) {
        let Some(open) = &mut self.open else { return };
        if open.plan.task_id != task_id
            || !open.selected.contains(agent)
            || open.reported.contains(agent)
            || open.dropped.contains(agent)
        {
            return;
        }
        tracing::warn!(agent, task = task_id, error = reason, "upload refused");
        record_rejection(open, agent.to_string(), &reason);
    }

    /// Notes that a masked input of `agent` for the open secure task was
    /// refused before anything of it reached the sum (`reason`): logged, and
    /// recorded in the round's rejections at its close unless a later
    /// masked input of the agent counted (nothing of the refused one was
    /// added, so the agent may send its input again: a broken upload is not
    /// misbehaviour, and a merchant rejected beside an input folded in would
    /// break the record's rule). They went unlogged and unrecorded, so an
    /// operator could not tell an agent framing its input as another's from
    /// a dropout (found by an attacker probe).
    pub fn note_refused_masked(&mut self, agent: &str, task_id: &str, reason: &str) {
        let Some(open) = &mut self.open else { return };
        if open.plan.task_id != task_id || !open.selected.contains(agent) {
            return;
        }
        tracing::warn!(
            agent,
            task = task_id,
            error = reason,
            "masked input refused"
        );
        open.masked_refusals
            .entry(agent.to_string())
            .or_insert_with(|| format!("masked input refused: {reason}"));
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
        let result = Self::accept(open, agent, &sub);
        match &result {
            Ok(()) => {
                open.reported.insert(agent.to_string());
                open.bytes_in += sub.bytes;
            }
            Err(e) => {
                tracing::warn!(agent, task = task_id, error = %e, "update rejected");
                record_rejection(open, agent.to_string(), e);
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
            match Self::check(open, &agent, &sub, |_| pre.unwrap_or(Ok(()))) {
                Ok(()) => {
                    open.reported.insert(agent.clone());
                    accepted.push((i, agent, sub));
                    results.push(Ok(()));
                }
                Err(e) => {
                    tracing::warn!(agent, task = task_id, error = %e, "update rejected");
                    record_rejection(open, agent, &e);
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
                record_rejection(open, agent, &e);
                results[i] = Err(e);
                continue;
            }
            open.bytes_in += sub.bytes;
            Self::add_metrics(open, &agent, &sub);
            if let Accumulation::Individual(list) = &mut open.acc {
                list.extend(sub.update);
            }
        }
        results
    }

    fn accept(open: &mut OpenTask, agent: &str, sub: &Submission) -> Result<(), SubmitError> {
        let (len, layout) = (open.plan.spec.update_len(), open.plan.spec.update_layout());
        Self::check(open, agent, sub, |u| u.validate(len, &layout))?;
        if let Some(u) = &sub.update {
            match &mut open.acc {
                Accumulation::Sum(acc) => acc.add(u)?,
                Accumulation::Individual(list) => list.push(u.clone()),
            }
        }
        Self::add_metrics(open, agent, sub);
        Ok(())
    }

    /// Every check of one result from `agent`, without folding it;
    /// `validate` checks the update itself (lengths, finiteness, weights).
    fn check(
        open: &OpenTask,
        agent: &str,
        sub: &Submission,
        validate: impl FnOnce(&Update) -> Result<(), UpdateError>,
    ) -> Result<(), SubmitError> {
        if let Some((k, _)) = sub.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(SubmitError::BadMetric(shown_name(k)));
        }
        let (weights, total) = (sub.figure_weights(), open.metric_weight);
        for w in [weights.examples, weights.validation] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(UpdateError::BadWeight(w).into());
            }
        }
        // Each figure is finite, but its weighted sum with the others' must
        // stay so too, or the round's means (and its record) are ∞.
        for (w, sum) in [
            (weights.examples, total.examples),
            (weights.validation, total.validation),
        ] {
            if !(sum + w).is_finite() {
                return Err(UpdateError::BadWeight(w).into());
            }
        }
        for (k, v) in &sub.metrics {
            let sum = open.metric_sums.get(k).map_or(0.0, |s| s.0) + v * weights.of(k);
            if !sum.is_finite() {
                return Err(SubmitError::MetricOverflow(shown_name(k)));
            }
        }
        let spec = &open.plan.spec;
        if open.plan.secure && sub.update.is_some() {
            return Err(SubmitError::PlaintextInSecureTask(
                open.plan.task_id.clone(),
            ));
        }
        // An evaluation carries a vector only when the family sums one
        // (churn: per-class score histograms), and then must carry it.
        let evaluation_vector = spec.update_len() > 0;
        match (&sub.update, spec.kind) {
            (None, TaskKind::Evaluate) if !evaluation_vector => {}
            (None, _) if open.plan.secure => {}
            (Some(u), TaskKind::Train | TaskKind::Stats) => {
                validate(u)?;
                if spec.kind == TaskKind::Stats && u.weight > 0.0 {
                    let moments: Vec<f32> = u
                        .values
                        .iter()
                        .map(|v| (f64::from(*v) / u.weight) as f32)
                        .collect();
                    if let Some((feature, mean, square)) =
                        fedcart_common::data::standardize::impossible_feature(&moments)
                    {
                        return Err(SubmitError::ImpossibleStatistics {
                            feature,
                            mean,
                            square,
                        });
                    }
                }
                if spec.kind == TaskKind::Train
                    && let Some(a) = spec.model.model().analysis()
                    && let Some(index) = a.first_bad_value(agent, u)
                {
                    return Err(SubmitError::NotACount {
                        index,
                        value: u.values[index],
                        weight: u.weight,
                    });
                }
            }
            (Some(u), TaskKind::Evaluate) if evaluation_vector => {
                validate(u)?;
                // Histogram counts: a negative one would let pooled figures
                // (AUC, PR-AUC) divide by zero or leave [0, 1]; a fraction
                // is no count of rows.
                if let Some(index) = u.values.iter().position(|v| *v < 0.0 || v.fract() != 0.0) {
                    return Err(SubmitError::NotAHistogramCount {
                        index,
                        value: u.values[index],
                    });
                }
                // The held-out histogram (the first) counts the rows the
                // result is weighted by. Claims beyond that stay possible
                // (see ARCHITECTURE.md, "Threat model").
                let held_out = &u.values[..HISTOGRAM_LEN.min(u.values.len())];
                let counted: f64 = held_out.iter().map(|&v| f64::from(v)).sum();
                if counted != sub.weight {
                    return Err(SubmitError::HistogramTotal {
                        counted,
                        weight: sub.weight,
                    });
                }
            }
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

    fn add_metrics(open: &mut OpenTask, agent: &str, sub: &Submission) {
        // A masked upload's header carries no row count (agents send 1: the
        // count travels only inside the masked vector), so a secure task's
        // metrics are averaged with equal weights, whoever drives it (the
        // simulator too), and its example count is the unmasked sum's.
        // Otherwise each figure weighs by its rows: the validation figures
        // by the validation rows, the others by the example weight.
        let weights = if open.plan.secure {
            FigureWeights {
                examples: 1.0,
                validation: 1.0,
            }
        } else {
            sub.figure_weights()
        };
        // Model selection keeps each merchant's part of an evaluation of
        // the latest version (see `selection`).
        if open.plan.spec.kind == TaskKind::Evaluate
            && let Some((metric, _)) = open.plan.spec.model.selection_metric()
        {
            open.evaluations.insert(
                agent.to_string(),
                MerchantEvaluation::of(sub, weights.of(metric), metric),
            );
        }
        for (k, v) in &sub.metrics {
            let w = weights.of(k);
            let (sum, weight) = open.metric_sums.entry(k.clone()).or_default();
            *sum += v * w;
            *weight += w;
        }
        open.metric_weight.examples += weights.examples;
        open.metric_weight.validation += weights.validation;
        open.metric_parts
            .insert(agent.to_string(), (sub.metrics.clone(), weights));
    }

    /// Hands over the decoded sum of a secure task and the agents whose
    /// inputs it contains. The engine never sees an individual update of a
    /// secure task: only this sum, and how much of it the clip cut (kept in
    /// the task's record).
    pub fn set_secure_sum(
        &mut self,
        survivors: &[String],
        decoded: DecodedSum,
    ) -> Result<(), SubmitError> {
        let clipped = ClippedRecord {
            coordinates: decoded.clipped,
            fraction: decoded.clipped_fraction(),
        };
        let sum = decoded.into_accumulator();
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
        open.secure_clipped = Some(clipped);
        Ok(())
    }

    /// Records that secure aggregation of the open task failed (too few
    /// survivors, unrecoverable shares): the task aborts with `reason` in its
    /// round record, and nothing of the masked sum reaches the engine.
    pub fn abort_secure(&mut self, reason: String) {
        if let Some(open) = &mut self.open
            && open.plan.secure
            && open.secure_abort.is_none()
        {
            open.secure_abort = Some(reason);
        }
    }

    /// Records that the open task's secure sum was unmasked, over the inputs
    /// of `survivors` agents, and then refused for `reason` (out of the
    /// round's bounds: a malicious agent's doing). The task aborts and,
    /// since its sum was seen, the run stops instead of retrying: the same
    /// inputs over another survivor set would give a second sum, and the
    /// difference of the two would be one merchant's update. A training
    /// round's privacy is accounted (the sum held the agents' noise).
    pub fn refuse_unmasked_sum(&mut self, reason: String, survivors: usize) {
        if let Some(open) = &mut self.open
            && open.plan.secure
        {
            open.secure_abort = Some(reason);
            open.secure_revealed = Some(survivors);
        }
    }

    /// Counts a selected agent whose local task failed (its training
    /// diverged, it had no data) as dropped for the open task, recording
    /// `reason` with the rejections so that a round that keeps aborting can
    /// name its cause (see [`RunStop::GaveUp`](super::RunStop::GaveUp)).
    pub fn fail_agent(&mut self, agent: &str, reason: String) {
        if let Some(open) = &mut self.open
            && open.selected.contains(agent)
            && !open.reported.contains(agent)
            && open.dropped.insert(agent.to_string())
        {
            tracing::info!(agent, task = %open.plan.task_id, %reason, "local task failed");
            open.rejected.push((agent.to_string(), reason));
        }
    }

    /// Records why a merchant whose result is already in the open task
    /// left it afterwards (a secure round's survivor refusing the unmask
    /// stage): once per merchant, with the round's rejections.
    pub fn note_rejection(&mut self, agent: &str, reason: String) {
        if let Some(open) = &mut self.open
            && open.reported.contains(agent)
            && !open.rejected.iter().any(|(a, _)| a == agent)
        {
            open.rejected.push((agent.to_string(), reason));
        }
    }

    /// Records that `accuser` could not open the share bundle `accused` sent
    /// it in a secure round, and sets merchants aside from the run's later
    /// tasks. A sender of forged shares can always make the round fail (no
    /// one can rebuild its masks), and the coordinator cannot tell a forged
    /// bundle from a false accusation, so the rule ([`set_aside_by`]) is
    /// built for one malicious merchant: a merchant accused by two or more
    /// others, or accusing two or more, or accusing a merchant other than
    /// its own accuser, is set aside alone and its accusations count for
    /// nothing; any other accusation sets aside both ends (one of the two is
    /// lying). Either way the malicious merchant is out after its first
    /// attempt, and the retry runs without it; at worst one honest merchant
    /// is set aside with it, however many accusations it sends (one
    /// accusation per honest merchant set aside took out every merchant of
    /// a run). The accusations are stored (meta key
    /// `accusations`), so a restarted coordinator keeps the same merchants
    /// aside. Returns the merchants newly set aside.
    pub fn accuse(&mut self, accuser: &str, accused: &str) -> Vec<String> {
        if accuser == accused
            || !self
                .accusations
                .entry(accused.to_string())
                .or_default()
                .insert(accuser.to_string())
        {
            return Vec::new();
        }
        let json = serde_json::to_value(&self.accusations).expect("names serialise");
        if let Err(e) = self.store.put_meta_json(&[("accusations", json)]) {
            // Still set aside in this process; only a restart would forget.
            tracing::error!(accuser, accused, error = %e, "storing an accusation failed");
        }
        let aside = set_aside_by(&self.accusations);
        let new: Vec<String> = aside.difference(&self.set_aside).cloned().collect();
        self.set_aside = aside;
        new
    }

    /// Records that `merchant` revealed a share at a secure round's unmask
    /// stage that the other holders' shares prove wrong (the server
    /// recovered the sum without it, [`SecAggOutput::forged_shares`]): no
    /// accusation to weigh but a proof, so it alone is set aside from the
    /// run's later tasks, stored as [`Engine::accuse`] stores accusations.
    /// Returns the merchants newly set aside.
    ///
    /// [`SecAggOutput::forged_shares`]: fedcart_common::privacy::secagg::SecAggOutput::forged_shares
    pub fn forged_share(&mut self, merchant: &str) -> Vec<String> {
        self.accuse(PROVEN, merchant)
    }

    /// Whether `merchant` is set aside by [`Engine::forged_share`]'s proof
    /// rather than by accusations.
    pub fn proven_forger(&self, merchant: &str) -> bool {
        self.accusations
            .get(merchant)
            .is_some_and(|by| by.contains(PROVEN))
    }

    /// Merchants set aside by [`Engine::accuse`].
    pub fn set_aside(&self) -> &BTreeSet<String> {
        &self.set_aside
    }

    /// `agent` declined a task of this run for a lasting cause (`reason`):
    /// every later task would fail the same way while its session lasts, so
    /// until it joins again ([`Engine::readmit`]) a task selects it only
    /// when the other merchants cannot fill it. Each selection of it cost
    /// the round an attempt: one misconfigured merchant among a quorum of
    /// healthy ones stopped a run on `max_attempts`.
    pub fn decline_for_run(&mut self, agent: &str, reason: String) {
        if self.declined.insert(agent.to_string(), reason).is_none() {
            tracing::warn!(agent, run = %self.run.run_id,
                "the merchant declines this run's tasks for a lasting cause: it is selected \
                 again only when the others cannot fill a task, until its agent joins again");
        }
    }

    /// `agent` joined (again): a merchant that declined the run's tasks may
    /// have changed its data or policy, and is selected again.
    pub fn readmit(&mut self, agent: &str) {
        self.declined.remove(agent);
    }

    /// Merchants that declined this run's tasks for a lasting cause, with
    /// the reason ([`Engine::decline_for_run`]).
    pub fn declined(&self) -> &BTreeMap<String, String> {
        &self.declined
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

    /// Whether `agent` was dropped from the open task (it disconnected, or
    /// its local task failed).
    pub fn has_dropped(&self, agent: &str) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| o.dropped.contains(agent))
    }

    /// Selected agents that have neither reported nor dropped.
    pub fn pending(&self) -> usize {
        self.open
            .as_ref()
            .map_or(0, |o| o.selected.len() - o.reported.len() - o.dropped.len())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedcart_common::task::ModelSpec;

    use super::*;
    use crate::config::{RunConfig, Selection};
    use crate::store::Store;

    /// A one-round run of a two-value `Noop` model selecting exactly
    /// `agents` agents, quorum 1, over a scratch store.
    fn noop_engine(run_id: &str, agents: usize) -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_scratch(&dir.path().join("e.redb")).unwrap();
        let run = RunConfig {
            max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
            early_stopping: None,
            run_id: run_id.into(),
            seed: 3,
            rounds: 1,
            model: ModelSpec::Noop { dim: 2 },
            sgd: Default::default(),
            selection: Selection {
                fraction: 1.0,
                min_agents: agents,
                max_agents: agents,
                min_available: 0,
            },
            quorum: 1,
            round_timeout_ms: 1_000,
            evaluate: false,
            strategy: Default::default(),
            secagg: None,
            dp: None,
        };
        (dir, Engine::open(store, run).unwrap())
    }

    #[test]
    fn repeated_refusals_with_huge_metric_names_keep_the_record_bounded() {
        let merchants: Vec<String> = (0..1_000).map(|k| format!("m{k}")).collect();
        let (_dir, mut engine) = noop_engine("bounded", merchants.len());
        let plan = engine.start_task(&merchants).unwrap();
        let huge = "k".repeat(4 << 20);
        let sub = || Submission {
            update: Some(Update {
                values: vec![0.0; 2],
                coord_weights: vec![],
                weight: 1.0,
            }),
            metrics: BTreeMap::from([(huge.clone(), f64::NAN)]),
            weight: 1.0,
            validation_weight: 1.0,
            bytes: 8,
        };
        for m in &merchants {
            let err = engine
                .submit(m, "bounded", plan.round, &plan.task_id, sub())
                .unwrap_err();
            assert!(
                err.to_string().len() < 200,
                "the error does not carry the name"
            );
        }
        // One update per merchant and task: a refused one is its last.
        let err = engine
            .submit("m0", "bounded", plan.round, &plan.task_id, sub())
            .unwrap_err();
        assert!(matches!(err, SubmitError::AlreadyRefused(_)), "{err}");
        let record = engine.finish_task().unwrap();
        assert_eq!(record.rejected.len(), MAX_REJECTIONS);
        assert_eq!(record.rejected.last().unwrap().0, "*");
        let size = serde_json::to_vec(&record).unwrap().len();
        assert!(size < 64 * 1024, "record is {size} bytes");
    }

    /// A malicious merchant's finite figures whose weighted sum is not:
    /// rejected, the round goes on, and the stored history stays readable
    /// (an ∞ in a record used to be stored as JSON `null` and end the
    /// coordinator at its next read or restart).
    #[test]
    fn figures_whose_weighted_sum_overflows_are_rejected_and_the_history_stays_readable() {
        let (_dir, mut engine) = noop_engine("overflow", 3);
        let agents: Vec<String> = ["m0", "m1", "m2"].map(String::from).to_vec();
        let plan = engine.start_task(&agents).unwrap();
        let sub = |loss: f64, weight: f64| Submission {
            update: Some(Update {
                values: vec![0.5; 2],
                coord_weights: vec![],
                weight,
            }),
            metrics: BTreeMap::from([("loss".to_string(), loss)]),
            weight,
            validation_weight: weight,
            bytes: 8,
        };
        let mut submit =
            |agent: &str, s| engine.submit(agent, "overflow", plan.round, &plan.task_id, s);
        let e = submit("m0", sub(1e308, 10.0)).unwrap_err();
        assert!(
            matches!(e, SubmitError::MetricOverflow(ref k) if k == "loss"),
            "{e}"
        );
        submit("m1", sub(0.25, f64::MAX)).unwrap();
        // Each weight is finite; their sum is not.
        let e = submit("m2", sub(0.25, f64::MAX)).unwrap_err();
        assert!(
            matches!(e, SubmitError::Invalid(UpdateError::BadWeight(_))),
            "{e}"
        );
        let record = engine.finish_task().unwrap();
        assert_eq!(record.outcome, crate::record::Outcome::Committed);
        assert_eq!(record.reported, vec!["m1"]);
        assert_eq!(record.metrics["loss"], 0.25);
        let history = engine.store().history().unwrap();
        assert_eq!(history.last().unwrap().reported, vec!["m1"]);
    }

    /// A plaintext weight that is negative or not a number is refused by
    /// the engine (a negative one would flip the sign of its update in the
    /// mean), and the round commits with the honest merchant.
    #[test]
    fn a_negative_or_nan_weight_is_refused_and_the_round_goes_on() {
        let (_dir, mut engine) = noop_engine("weights", 3);
        let agents: Vec<String> = ["m0", "m1", "m2"].map(String::from).to_vec();
        let plan = engine.start_task(&agents).unwrap();
        let sub = |weight: f64| Submission {
            update: Some(Update {
                values: vec![0.5; 2],
                coord_weights: vec![],
                weight,
            }),
            metrics: BTreeMap::new(),
            weight,
            validation_weight: weight,
            bytes: 8,
        };
        let mut submit =
            |agent: &str, s| engine.submit(agent, "weights", plan.round, &plan.task_id, s);
        for (agent, weight) in [("m0", -1.0), ("m1", f64::NAN)] {
            let e = submit(agent, sub(weight)).unwrap_err();
            assert!(
                matches!(e, SubmitError::Invalid(UpdateError::BadWeight(_))),
                "{agent}: {e}"
            );
        }
        submit("m2", sub(1.0)).unwrap();
        let record = engine.finish_task().unwrap();
        assert_eq!(record.outcome, crate::record::Outcome::Committed);
        assert_eq!(record.reported, vec!["m2"]);
        let rejected: Vec<&str> = record.rejected.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(rejected, ["m0", "m1"]);
    }
}
