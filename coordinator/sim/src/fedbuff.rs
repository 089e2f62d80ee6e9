//! The simulator's asynchronous driver: FedBuff (buffered asynchronous
//! aggregation) over the same [`Engine`], on the virtual clock.
//!
//! Up to `concurrency` merchants train at once, each on the version it
//! downloaded when it was handed work. An event queue orders their
//! completions by virtual time (see `clock.rs`); nothing sleeps. A finished
//! update is `τ` versions stale and is scaled by `s(τ)·η`
//! ([`fedcart_common::federation::fedbuff::weigh`]); once `buffer` (K) updates are in,
//! they become one engine train task whose selected set is exactly the K
//! contributors, and the engine validates, folds, applies the strategy and
//! commits the version to the store exactly as for a synchronous round (then
//! the usual evaluation task measures it).
//!
//! Why the engine is driven this way: its tasks are rounds — one open task,
//! submissions refused unless they name it. Staleness is a driver concept
//! (the engine would rightly refuse an update trained on an old version), so
//! the driver keeps the pending updates itself and opens a task only when the
//! buffer is full. Everything else — validation, NaN refusal, strategies,
//! secure aggregation of the buffer, durable commits, history — is the
//! engine's. Local training is deferred to the flush: an update depends only
//! on the version downloaded and the merchant's own state, and a merchant is
//! not handed new work while its update waits in the buffer, so the K
//! buffered merchants train in parallel with results identical to training
//! them at dispatch time.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use fedcart_common::federation::fedbuff::weigh;
use fedcart_common::task::{TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use rand::RngExt;
use rayon::prelude::*;

use super::clock::Fleet;
use super::experiment::{Experiment, RoundRow};
use super::mode::FedBuffSettings;
use super::settings::Settings;
use super::submit;
use fedcart_coordinator::engine::{Engine, TaskPlan};
use fedcart_coordinator::record::Outcome;

/// Each merchant's metrics, by id.
type PerMerchant = BTreeMap<String, BTreeMap<String, f64>>;

/// A merchant at work: when it finishes and on which version it started.
struct Job {
    finish: f64,
    seq: u64,
    k: usize,
    base_version: u64,
    base: Arc<Vec<f32>>,
    dropped: bool,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// Reversed, so the max-heap pops the earliest finish (ties: first dispatched).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .finish
            .total_cmp(&self.finish)
            .then(other.seq.cmp(&self.seq))
    }
}

/// What the driver needs from the experiment set up by `run_one`.
pub(super) struct Ctx<'a> {
    pub s: &'a Settings,
    pub cfg: &'a FedBuffSettings,
    pub ids: &'a [String],
    pub merchants: &'a [Mutex<LocalData>],
    pub fleet: &'a Fleet,
    pub malicious: &'a BTreeSet<usize>,
    pub pool: &'a rayon::ThreadPool,
    pub bar: &'a indicatif::ProgressBar,
}

/// Runs the engine to completion with FedBuff, pushing one row per committed
/// (or aborted) version into `exp`.
pub(super) fn drive(cx: &Ctx<'_>, engine: &mut Engine, exp: &mut Experiment) -> anyhow::Result<()> {
    let n = cx.ids.len();
    let model_len = engine.global().len() as u64;
    // The statistics step (and an evaluation left pending) run on everyone
    // first, outside the virtual clock.
    while matches!(
        engine.next_task(),
        Some((_, TaskKind::Stats | TaskKind::Evaluate))
    ) {
        let plan = engine.start_task(cx.ids)?;
        collective(cx, engine, &plan, &mut RoundRow::default())?;
    }
    let mut now = 0.0f64;
    let mut seq = 0u64;
    let mut busy = vec![false; n];
    let mut heap: BinaryHeap<Job> = BinaryHeap::new();
    let mut buffer: Vec<Job> = Vec::with_capacity(cx.cfg.buffer);
    let mut row = RoundRow::default();
    let mut wall = Instant::now();
    while !engine.finished() {
        // Training is over: the serving task hands the best version out.
        if matches!(engine.next_task(), Some((v, TaskKind::Evaluate)) if v != engine.version()) {
            let plan = engine.start_task(cx.ids)?;
            collective(cx, engine, &plan, &mut RoundRow::default())?;
            continue;
        }
        // Hand the free slots to idle, online merchants, on the current version.
        let online = cx.fleet.online(cx.fleet.period_of(now));
        let mut idle: Vec<usize> = (0..n).filter(|&k| !busy[k] && online[k]).collect();
        while heap.len() < cx.cfg.concurrency && !idle.is_empty() {
            let label = seq.to_string();
            let pick = fedcart_common::seed::rng(cx.s.seed, &["fedbuff-pick", &label])
                .random_range(0..idle.len());
            let k = idle.swap_remove(pick);
            busy[k] = true;
            let dropped = cx.s.dropout > 0.0
                && fedcart_common::seed::rng(cx.s.seed, &["fedbuff-dropout", &label])
                    .random::<f64>()
                    < cx.s.dropout;
            heap.push(Job {
                finish: now + cx.fleet.task_seconds(k),
                seq,
                k,
                base_version: engine.version(),
                base: engine.global(),
                dropped,
            });
            row.bytes_down += 4 * model_len;
            seq += 1;
        }
        // Next event: a completion, or a new period bringing merchants online
        // while a slot is free.
        let next_period = cx.fleet.period_start(cx.fleet.period_of(now) + 1);
        let slot_free = heap.len() < cx.cfg.concurrency;
        match heap.peek() {
            Some(job) if !(slot_free && next_period < job.finish) => {}
            _ => {
                now = next_period;
                continue;
            }
        }
        let job = heap.pop().expect("peeked");
        now = job.finish;
        if job.dropped {
            busy[job.k] = false;
            continue;
        }
        buffer.push(job);
        if buffer.len() >= cx.cfg.buffer {
            buffer.sort_by_key(|j| j.k);
            row.virtual_seconds = now;
            if let Some(per_merchant) = flush(cx, engine, &buffer, &mut row)? {
                exp.per_merchant = per_merchant;
            }
            for j in buffer.drain(..) {
                busy[j.k] = false;
            }
            row.seconds = wall.elapsed().as_secs_f64();
            wall = Instant::now();
            exp.rounds.push(std::mem::take(&mut row));
            cx.bar.inc(1);
        }
    }
    Ok(())
}

/// Trains the buffered merchants on their own base versions, hands their
/// staleness-weighted updates to the engine as one train task, commits, and
/// evaluates the new version (returning each merchant's metrics of it).
fn flush(
    cx: &Ctx<'_>,
    engine: &mut Engine,
    buffer: &[Job],
    row: &mut RoundRow,
) -> anyhow::Result<Option<PerMerchant>> {
    let chosen: Vec<String> = buffer.iter().map(|j| cx.ids[j.k].clone()).collect();
    let plan = engine.start_task(&chosen)?;
    if plan.spec.kind != TaskKind::Train || plan.selected != chosen {
        bail!(
            "the engine opened {} for {:?}, expected a train task for the buffer {:?}",
            plan.task_id,
            plan.selected,
            chosen
        );
    }
    let mut taus = Vec::with_capacity(buffer.len());
    let mut secure_inputs = Vec::new();
    let current = engine.global();
    // Not under DP: the update was clipped to its norm bound as trained,
    // and a change after the clip would leave the bound.
    let statistics = match plan.spec.dp {
        None => plan.spec.model.statistic_coordinates(),
        Some(_) => &[],
    };
    for chunk in buffer.chunks(super::CHUNK) {
        let outs: Vec<_> = cx.pool.install(|| {
            chunk
                .par_iter()
                .map(|j| {
                    // The task as it was when the merchant downloaded j.base.
                    let spec = TaskSpec {
                        round: j.base_version + 1,
                        ..plan.spec.clone()
                    };
                    let mut m = cx.merchants[j.k].lock().expect("merchant lock");
                    run_task(&spec, &j.base, &mut m)
                })
                .collect()
        });
        for (j, out) in chunk.iter().zip(outs) {
            let id = &cx.ids[j.k];
            let Some(mut out) = submit::accept(engine, id, out) else {
                continue;
            };
            let tau = plan.model_version - j.base_version;
            taus.push(tau);
            if let Some(u) = &mut out.update {
                // A statistic (explicit MF's μ) is reported against the
                // version the update is applied to, not the one it trained
                // on: `value − base` + `base − current`.
                for &c in statistics {
                    if let (Some(v), Some(b), Some(now)) =
                        (u.values.get_mut(c), j.base.get(c), current.get(c))
                    {
                        *v += (b - now) * u.weight as f32;
                    }
                }
                if cx.malicious.contains(&j.k) {
                    cx.s.attack.apply(&mut u.values);
                }
                weigh(u, cx.cfg.staleness.weight(tau) * cx.cfg.server_lr);
            }
            let sub = submit::route(id, out, plan.secure, &mut secure_inputs);
            row.bytes_up += sub.bytes;
            if let Err(e) = engine.submit(id, "simulation", plan.round, &plan.task_id, sub) {
                tracing::warn!(merchant = %id, error = %e, "submission refused");
            }
        }
    }
    if plan.secure {
        let started = Instant::now();
        let (clipped, times) = super::secure::secure_sum(engine, &plan, secure_inputs, cx.s.seed)?;
        row.clipped += clipped;
        row.secagg_seconds += started.elapsed().as_secs_f64();
        row.secagg_stages
            .get_or_insert_with(Default::default)
            .add(&times);
    }
    let record = engine.finish_task()?;
    row.round = plan.round;
    row.selected = record.selected.len();
    row.reported = record.reported.len();
    row.committed = record.outcome == Outcome::Committed;
    row.train = record.metrics.clone();
    // As a synchronous round's row: the ε spent so far and the clip, or
    // metrics.json, metrics.csv and report.html show none under FedBuff
    // while the summary gives the total.
    if let Some(p) = &record.privacy {
        row.epsilon = Some(p.epsilon);
        row.dp_clip = Some(p.clip);
        row.dp_noise = Some(p.noise_multiplier);
    }
    if !taus.is_empty() {
        row.staleness_mean = taus.iter().sum::<u64>() as f64 / taus.len() as f64;
        row.staleness_max = taus.iter().copied().max().unwrap_or(0);
    }
    if row.committed && matches!(engine.next_task(), Some((_, TaskKind::Evaluate))) {
        let plan = engine.start_task(cx.ids)?;
        return Ok(Some(collective(cx, engine, &plan, row)?));
    }
    Ok(None)
}

/// Runs a statistics or evaluation task on every selected merchant and
/// closes it; evaluation metrics land in `row.eval`, and each merchant's in
/// the map returned.
fn collective(
    cx: &Ctx<'_>,
    engine: &mut Engine,
    plan: &TaskPlan,
    row: &mut RoundRow,
) -> anyhow::Result<PerMerchant> {
    if plan.secure {
        bail!("the FedBuff driver runs statistics only without secure aggregation");
    }
    let global = engine
        .model(plan.model_version)?
        .with_context(|| format!("version {} is not stored", plan.model_version))?;
    let index: HashMap<&str, usize> = cx
        .ids
        .iter()
        .enumerate()
        .map(|(k, id)| (id.as_str(), k))
        .collect();
    let todo: Vec<usize> = plan.selected.iter().map(|id| index[id.as_str()]).collect();
    let mut per_merchant = BTreeMap::new();
    for chunk in todo.chunks(super::CHUNK) {
        let outs: Vec<_> = cx.pool.install(|| {
            chunk
                .par_iter()
                .map(|&k| {
                    run_task(
                        &plan.spec,
                        &global,
                        &mut cx.merchants[k].lock().expect("merchant lock"),
                    )
                })
                .collect()
        });
        for (&k, out) in chunk.iter().zip(outs) {
            let id = &cx.ids[k];
            let Some(out) = submit::accept(engine, id, out) else {
                continue;
            };
            row.bytes_down += 4 * plan.model_len;
            if plan.spec.kind == TaskKind::Evaluate {
                per_merchant.insert(id.clone(), out.metrics.clone());
            }
            // Plaintext (checked above), so nothing goes to a secure sum;
            // the bytes are counted as the synchronous driver counts them
            // (an evaluation's payload, a churn model's histograms, too).
            let sub = submit::route(id, out, false, &mut Vec::new());
            row.bytes_up += sub.bytes;
            if let Err(e) = engine.submit(id, "simulation", plan.round, &plan.task_id, sub) {
                tracing::warn!(merchant = %id, error = %e, "submission refused");
            }
        }
    }
    let record = engine.finish_task()?;
    if plan.spec.kind == TaskKind::Evaluate {
        row.eval = record.metrics;
    }
    Ok(per_merchant)
}

#[cfg(test)]
mod tests;
