//! `fedcart-sim`: the researchers' simulator.
//!
//! It is the second driver of the round engine: the same [`Engine`] the gRPC
//! service drives, with N virtual merchants calling the same
//! `fedcart_common::train::run_task` the agent calls, in-process on a rayon
//! pool. Results are folded into the engine in merchant order, so a seed gives
//! identical metrics whatever the thread count.

mod args;
pub mod clock;
pub mod data;
mod dp;
pub mod experiment;
pub mod fedbuff;
mod grpc;
pub mod halving;
pub mod mode;
pub mod output;
pub mod plots;
pub mod rules;
pub mod search;
mod secure;
pub mod segments;
mod settings;
mod submit;
#[cfg(test)]
mod tests;
pub mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use fedcart_common::metrics::PooledMean;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use rand::RngExt;
use rayon::prelude::*;

pub use args::SimArgs;
pub use args::{DpModeName, ModeName, Transport};
use data::TaskChoice;
pub use experiment::{Experiment, RoundRow};
use fedcart_coordinator::config::{RunConfig, SecAggSettings, Selection};
use fedcart_coordinator::engine::Engine;
use fedcart_coordinator::ledger::NoiseSource;
use fedcart_coordinator::record::Outcome;
use fedcart_coordinator::store::Store;
pub use settings::{Attack, Settings};

/// Results computed per chunk of merchants: bounds memory to `CHUNK` updates
/// in flight however many merchants a round selects.
const CHUNK: usize = 64;

/// What the command prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// The summary table (and a k-means run's segment profiles).
    #[default]
    Table,
    /// One JSON document (`{"experiments": [...]}`), for `jq` and scripts.
    Json,
}

/// Runs the command: every experiment the settings describe, then the
/// output files and, on stdout, the summary in `format` (nothing else goes
/// to stdout: progress bars, logs and notes go to stderr). `progress` draws
/// progress bars on stderr.
pub fn run_command(args: SimArgs, format: Format, progress: bool) -> anyhow::Result<()> {
    let mut settings = Settings::from_args(args)?;
    settings.progress = progress;
    // Every file goes into a staging folder inside --out first and moves
    // into place only once all are written: a full disk or a failed run
    // leaves the earlier run's results whole (a full disk had left a
    // truncated metrics.json beside the earlier run's plots).
    let out = settings.out.clone();
    let stage = match &out {
        Some(dir) => Some(output::Staging::new(dir)?),
        None => None,
    };
    settings.out = stage.as_ref().map(|s| s.path().to_path_buf());
    let experiments = run_all(&settings);
    settings.out = out;
    let experiments = experiments?;
    // A natural partition has a merchant per store, whatever `--merchants`
    // (or its default, 10) said: the report's settings showed 10 for a log
    // of 3 or 20 stores.
    if settings.partition == fedcart_common::data::partition::Partitioner::Natural
        && let Some(n) = experiments.first().map(|e| e.merchants)
        && experiments.iter().all(|e| e.merchants == n)
    {
        settings.merchants = n;
    }
    // The summary first: a run whose files cannot be written still shows
    // its figures (and a closed stdout does not keep the files from being
    // written).
    let printed = (|| -> anyhow::Result<()> {
        match format {
            Format::Table => {
                output::print_table(&experiments)?;
                for e in &experiments {
                    for line in &e.report {
                        fedcart_common::outln!("{line}")?;
                    }
                }
            }
            Format::Json => fedcart_common::outln!("{}", output::summary_json(&experiments))?,
        }
        Ok(())
    })();
    if let (Some(dir), Some(stage)) = (&settings.out, stage) {
        output::write_all(stage.path(), &settings, &experiments).map_err(|e| stage.abandon(e))?;
        let written = stage.publish()?;
        let removed = output::retire_stale(dir, &written)?;
        eprintln!("wrote {}", dir.display());
        if !removed.is_empty() {
            eprintln!(
                "removed {} file(s) an earlier run wrote there and this one did not: {}",
                removed.len(),
                removed.join(", ")
            );
        }
    }
    printed?;
    failures(&experiments, settings.out.as_deref())
}

/// The command's error when a run failed: its cause, and where the rounds
/// it committed were reported (they were, before this error).
fn failures(experiments: &[Experiment], out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let failed: Vec<String> = experiments
        .iter()
        .filter(|e| e.failed)
        .map(|e| format!("{}: {}", e.name, e.stopped.as_deref().unwrap_or("failed")))
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    let kept = match out {
        Some(dir) => format!("{}", dir.join("metrics.json").display()),
        None => "the summary above".into(),
    };
    bail!(
        "{}; the rounds committed before the failure are in {kept}",
        failed.join("; ")
    )
}

/// Runs every experiment of `settings` (the demo runs two).
pub fn run_all(settings: &Settings) -> anyhow::Result<Vec<Experiment>> {
    // An --out that cannot be written is found now, not after the run.
    if let Some(dir) = &settings.out {
        check_out_dir(dir)?;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads)
        .build()
        .context("building the thread pool")?;
    settings
        .experiments()
        .into_iter()
        .map(|(task, data)| match task {
            TaskChoice::Rules(_) => {
                let (exp, mined) = rules::run(settings, task, &data, &pool)?;
                if let Some(dir) = &settings.out {
                    rules::write(dir, &mined)?;
                }
                Ok(exp)
            }
            _ if settings.search.is_some() => search::run(settings, task, &data, &pool),
            _ => run_one(settings, task, &data, &pool),
        })
        .collect()
}

/// Runs one experiment through the engine.
pub fn run_one(
    s: &Settings,
    task: TaskChoice,
    data: &data::DataSpec,
    pool: &rayon::ThreadPool,
) -> anyhow::Result<Experiment> {
    let strategy = s.strategy.build();
    let load_start = Instant::now();
    let pop = data::build(
        task,
        data,
        s.files(),
        s.delimiter(),
        s.merchants,
        s.partition,
        s.mf_hyper(task),
        s.factors(task),
        s.seed,
    )?;
    let mut pop = pop;
    // Said in the report, above everything else: what reading the data
    // skipped or doubted (it was on standard error only).
    let data_notes = std::mem::take(&mut pop.notes);
    // A segmentation's report is its profile table: the notes go above it.
    let segment_notes = data_notes.clone();
    // Segments: the whole pipeline (candidates, choice of k, Lloyd rounds)
    // runs as rounds of the engine, `--rounds` Lloyd updates of the chosen
    // k at most; keep the data to profile the segments after the run.
    let segment_data = if let ModelSpec::Segments { lloyd_rounds, .. } = &mut pop.model {
        *lloyd_rounds = usize::try_from(s.rounds).unwrap_or(usize::MAX);
        Some(pop.merchants.clone())
    } else {
        None
    };
    match &mut pop.model {
        ModelSpec::ChurnGbdt { params, .. } => *params = s.gbdt.clone(),
        ModelSpec::ChurnLr { valid_fraction, .. } | ModelSpec::ChurnMlp { valid_fraction, .. } => {
            *valid_fraction = s.valid_fraction;
        }
        _ => {}
    }
    // A recommender with nothing to test on anywhere would train every
    // round and report no figure: say why before training.
    let untested = pop
        .merchants
        .iter()
        .all(|m| m.mf.as_ref().is_none_or(|d| d.test.is_empty()));
    if task.is_mf() && untested {
        bail!(
            "{}: no merchant holds a held-out interaction, so nothing could be measured: \
             leave-last-out (implicit tasks) tests a customer's latest item only when they bought \
             at least 2 items; a random split (mf) needs more ratings per merchant",
            data.name()
        );
    }
    let load_seconds = load_start.elapsed().as_secs_f64();
    let mut sgd = s.sgd(task);
    sgd.prox_mu = strategy.prox_mu();
    let n = pop.merchants.len();
    // FedBuff's defaults follow --merchants; a natural partition makes one
    // merchant per store instead, and a buffer no set of merchants can fill
    // would wait forever.
    if let mode::Mode::FedBuff(cfg) = &s.mode
        && (cfg.buffer > n || cfg.concurrency > n)
    {
        bail!(
            "--mode fedbuff: --concurrency {} and --buffer {} must be in [1, merchants = {n}], and \
             {} has {n} merchants (without the flags they follow --merchants {} and --fraction): \
             give --concurrency and --buffer of at most {n}",
            cfg.concurrency,
            cfg.buffer,
            data.name(),
            s.merchants
        );
    }
    // An analysis hands its final state out in one evaluation anyway;
    // boosted trees are models, evaluated between trees (early stopping).
    let evaluate = !matches!(pop.model, ModelSpec::Noop { .. })
        && (!pop.model.is_analysis() || matches!(pop.model, ModelSpec::ChurnGbdt { .. }));
    let rounds = pop
        .model
        .model()
        .analysis()
        .and_then(|a| a.max_versions())
        .unwrap_or(s.rounds);
    // Secure aggregation hides an update only among others: a round of one
    // merchant always aborts, so say so before training instead of after
    // max_attempts aborted rounds.
    let per_round = ((n as f64 * s.fraction).ceil() as usize).clamp(1, n.max(1));
    if s.secagg && s.mode == mode::Mode::Sync && per_round < 2 {
        let why = "secure aggregation hides each update among the others'";
        if n < 2 {
            bail!("--secagg needs at least 2 merchants ({why}); this federation has {n}");
        }
        bail!(
            "--secagg needs at least 2 merchants in each round ({why}), but --fraction {} selects \
             {per_round} of {n}: give a --fraction of at least {}",
            s.fraction,
            2.0 / n as f64
        );
    }
    // Krum's guarantee needs 2f + 3 updates a round (a round with fewer is
    // aborted): a --fraction that never selects that many is refused here.
    let needed = strategy.min_updates();
    if s.mode == mode::Mode::Sync && per_round < needed {
        bail!(
            "--strategy {} needs at least {needed} updates a round, but --fraction {} selects \
             {per_round} of {n} merchants: select more, or lower f",
            s.strategy,
            s.fraction
        );
    }
    // A FedBuff version holds exactly the buffer's updates.
    if let mode::Mode::FedBuff(cfg) = &s.mode {
        if cfg.buffer < needed {
            bail!(
                "--strategy {} needs at least {needed} updates a version, but --buffer {} holds \
                 {}: give --buffer {needed} or more",
                s.strategy,
                cfg.buffer,
                cfg.buffer
            );
        }
        if s.secagg && cfg.buffer < 2 {
            bail!(
                "--secagg hides each update among the others' of a version, but --buffer 1 holds \
                 one: give --buffer 2 or more"
            );
        }
    }
    // Early stopping reads a validation metric; a model without one would
    // ignore the flag (the no-task demo's churn model keeps going).
    if s.task.is_some()
        && s.patience.is_some_and(|p| p > 0)
        && pop.model.selection_metric().is_none()
    {
        if matches!(
            pop.model,
            ModelSpec::ChurnLr { .. } | ModelSpec::ChurnMlp { .. }
        ) {
            bail!(
                "--patience stops on the validation AUC, and --valid-fraction 0 keeps no \
                 validation slice: give --valid-fraction above 0 (default 0.1), or leave \
                 --patience out"
            );
        }
        bail!(
            "--patience applies to models that report a validation metric (mf, mf-implicit, mf-ials, \
             churn-lr, churn-mlp, churn-gbdt); task `{}` reports none: leave --patience out",
            task.name()
        );
    }
    let fleet = clock::Fleet::new(&s.clock, s.seed, &pop.merchants, &pop.model, &sgd);
    // Training rounds draw from the merchants online (`--availability`).
    let online = fleet.online_count().max(1);
    let per_round_online = ((online as f64 * s.fraction).ceil() as usize).clamp(1, online);
    let quorum = sim_quorum(s, per_round_online);
    let run = RunConfig {
        run_id: "simulation".into(),
        seed: s.seed,
        rounds,
        model: pop.model.clone(),
        sgd,
        selection: Selection {
            // FedBuff opens a task for exactly the buffered merchants.
            fraction: match s.mode {
                mode::Mode::Sync => s.fraction,
                mode::Mode::FedBuff(_) => 1.0,
            },
            min_agents: quorum,
            max_agents: n,
            min_available: 0,
        },
        quorum,
        round_timeout_ms: u64::MAX / 2,
        evaluate,
        strategy: s.strategy.clone(),
        secagg: s.secagg.then(|| SecAggSettings {
            neighbours: s.secagg_neighbours,
            clip: s.secagg_clip(task),
            verify_survivors: false,
            stage_timeout_ms: None,
        }),
        dp: s.dp.clone().map(|mut dp| {
            dp.population = Some(n);
            dp
        }),
        max_attempts: s.max_attempts,
        early_stopping: if evaluate {
            s.early_stopping(&pop.model)
        } else {
            None
        },
    };
    run.validate().map_err(flag_error)?;
    let spec = run.model.clone();
    let churn_rows: usize = pop
        .merchants
        .iter()
        .filter_map(|m| m.churn.as_ref().map(|c| c.train.y.len()))
        .sum();
    // Customers labelled churned and not anywhere (training or held out):
    // with fewer of either than one merchant's held-out split needs, no
    // partition can measure an AUC.
    let classes = pop
        .merchants
        .iter()
        .filter_map(|m| m.churn.as_ref())
        .flat_map(|c| {
            let train = c.train.y.iter().map(|&y| (y, false));
            train.chain(c.valid.y.iter().map(|&y| (y, true)))
        })
        .fold(Classes::default(), |mut n, (y, held_out)| {
            let churned = y > 0.5;
            if churned {
                n.churners += 1;
            } else {
                n.stayers += 1;
            }
            if held_out {
                n.held_out[usize::from(churned)] += 1;
            }
            n
        });
    if s.transport == Transport::Grpc {
        let mut exp = grpc::run(s, task, data, pop, run, &fleet, load_seconds)?;
        exp.report.splice(0..0, data_notes);
        if !exp.failed {
            exp.report.extend(selection_report(&exp));
            let notes = closing_notes(s, task, &spec, &exp, &exp.final_model, churn_rows, classes);
            exp.report.extend(notes);
        }
        return finish_segments(exp, segment_data.as_deref(), &segment_notes, &spec, s);
    }
    let dir = tempfile::tempdir().context("creating the simulator's temporary store")?;
    // Not fsync'd: the store is deleted with `dir` when the run ends.
    let store = Store::open_scratch(&dir.path().join("simulation.redb"))?;
    let mut engine = Engine::open(store, run)?;
    // Reproducible experiments: the noise is derived from the seed, which
    // makes it public. Reports say so (`privacy.dp_noise`).
    engine.set_noise_source(NoiseSource::SeededNotPrivate);

    let ids: Vec<String> = pop
        .merchants
        .iter()
        .map(|m| m.merchant_id.clone())
        .collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| (id.as_str(), k))
        .collect();
    let malicious = s.malicious_set(n);
    if s.malicious > 0.0 && malicious.is_empty() {
        bail!(
            "--malicious {} of {n} merchants rounds to no attacker, so the run would be \
             an attack-free run labelled as an attack: give at least {} (one merchant)",
            s.malicious,
            (1e4 / n as f64).ceil() / 1e4
        );
    }
    if s.malicious > 0.0 && (malicious.len() as f64 - s.malicious * n as f64).abs() > 1e-9 {
        eprintln!(
            "--malicious {} of {n} merchants: {} attacker(s), {:.1} % of them",
            s.malicious,
            malicious.len(),
            100.0 * malicious.len() as f64 / n as f64
        );
    }
    // Baselines for the federation-value report, on untouched copies.
    // Not for k-means: a segmentation has no local-only or centralised
    // "model quality" per merchant to compare (its report profiles the segments).
    let originals = (s.out.is_some()
        && !matches!(pop.model, ModelSpec::Noop { .. } | ModelSpec::KMeans { .. })
        && (!pop.model.is_analysis() || matches!(pop.model, ModelSpec::ChurnGbdt { .. })))
    .then(|| pop.merchants.clone());
    let merchants: Vec<Mutex<LocalData>> = pop.merchants.into_iter().map(Mutex::new).collect();
    let mut exp = Experiment::new(task, data, s, n, &pop.model, load_seconds);
    let bar = progress_bar(s.rounds, &exp.name, s.progress);
    let mut round_start = Instant::now();
    let mut row = RoundRow::default();
    // A committed training round waits in `row` for the evaluation of its
    // version; a round that none follows (the sketch round and the inner
    // levels of a boosted tree) is pushed as it is when the next begins.
    let mut awaiting_eval = false;
    if let mode::Mode::FedBuff(cfg) = &s.mode {
        // Runs the engine to completion: the synchronous loop below then
        // has nothing left to do.
        let cx = fedbuff::Ctx {
            s,
            cfg,
            ids: &ids,
            merchants: &merchants,
            fleet: &fleet,
            malicious: &malicious,
            pool,
            bar: &bar,
        };
        fedbuff::drive(&cx, &mut engine, &mut exp)?;
    }
    let mut traffic = traffic::Traffic::new(s.traffic, s.download_precision, n);
    let mut now = 0.0;
    while !engine.finished() {
        // Training is offered to the merchants online now; statistics and
        // evaluation (measurements) to everyone.
        let available = match engine.next_task() {
            Some((_, TaskKind::Train)) => fleet.online_ids(&ids, now),
            _ => ids.clone(),
        };
        let plan = engine.start_task(&available)?;
        let evaluates_row =
            plan.spec.kind == TaskKind::Evaluate && plan.model_version == engine.version();
        if awaiting_eval && !evaluates_row {
            awaiting_eval = false;
            exp.rounds.push(std::mem::take(&mut row));
            bar.inc(1);
        }
        if plan.spec.kind == TaskKind::Train {
            round_start = Instant::now();
            row = RoundRow {
                round: plan.round,
                ..Default::default()
            };
        }
        let global = engine
            .model(plan.model_version)?
            .with_context(|| format!("version {} is not stored", plan.model_version))?;
        let model_layout = plan.spec.model.layout();
        let handed = if plan.spec.kind == TaskKind::Stats {
            Arc::clone(&global)
        } else {
            traffic.handed_out(&global, &model_layout)
        };
        let update_layout = plan.spec.update_layout();
        let mut todo = Vec::with_capacity(plan.selected.len());
        let mut dropped_ids = std::collections::BTreeSet::new();
        for id in &plan.selected {
            let k = index[id.as_str()];
            // Only training drops: an evaluation's figures are every
            // selected merchant's, not a random subset's.
            let dropped = plan.spec.kind == TaskKind::Train
                && s.dropout > 0.0
                && fedcart_common::seed::rng(s.seed, &["dropout", &plan.task_id, id])
                    .random::<f64>()
                    < s.dropout;
            if dropped {
                engine.drop_agent(id);
                dropped_ids.insert(id.clone());
            } else {
                todo.push(k);
            }
        }
        let mut per_merchant = BTreeMap::new();
        // Secure rounds are opened before training and take each chunk's
        // updates as they come, so no more than a chunk of them is held.
        let mut secure = if plan.secure {
            // Invited: every selected merchant (the dropped fall silent at
            // the advertise stage, as over gRPC).
            let invited = plan.selected.clone();
            let round =
                secure::SecureRound::open(&mut engine, &plan, invited, &dropped_ids, s.seed)?;
            // Aborted before the masked inputs (too few survivors to pass
            // the advertise stage, or one merchant): nobody trains, as over
            // gRPC, where the round ends before an update is asked for.
            if round.is_none() {
                todo.clear();
            }
            round
        } else {
            None
        };
        for chunk in todo.chunks(CHUNK) {
            let mut secure_inputs = Vec::new();
            let outs: Vec<_> = pool.install(|| {
                chunk
                    .par_iter()
                    .map(|&k| {
                        let mut m = merchants[k].lock().expect("merchant lock");
                        run_task(&plan.spec, &handed, &mut m)
                    })
                    .collect()
            });
            let mut subs = Vec::with_capacity(chunk.len());
            let mut senders = Vec::with_capacity(chunk.len());
            for (&k, out) in chunk.iter().zip(outs) {
                let id = &ids[k];
                let Some(mut out) = submit::accept(&mut engine, id, out) else {
                    continue;
                };
                if plan.spec.kind == TaskKind::Train
                    && malicious.contains(&k)
                    && let Some(u) = &mut out.update
                {
                    s.attack.apply(&mut u.values);
                }
                if plan.spec.kind == TaskKind::Evaluate {
                    per_merchant.insert(id.clone(), out.metrics.clone());
                }
                let mut sub = submit::route(id, out, plan.secure, &mut secure_inputs);
                if let Some(bytes) = sub
                    .update
                    .as_ref()
                    .and_then(|u| traffic.upload(u, &update_layout))
                {
                    sub.bytes = bytes;
                }
                row.bytes_down += if plan.spec.kind == TaskKind::Stats {
                    4 * plan.model_len
                } else {
                    traffic.download(k, plan.model_version, &global, &model_layout)
                };
                row.bytes_up += sub.bytes;
                subs.push((id.clone(), sub));
                senders.push(k);
            }
            // One batch per chunk: validated and folded in parallel, in
            // merchant order (bit-identical to one-by-one submission).
            let results =
                pool.install(|| engine.submit_many("simulation", plan.round, &plan.task_id, subs));
            for (&k, result) in senders.iter().zip(results) {
                if let Err(e) = result {
                    tracing::warn!(merchant = %ids[k], error = %e, "submission refused");
                }
            }
            if let Some(round) = &mut secure {
                pool.install(|| round.mask(secure_inputs))?;
            }
        }
        if let Some(round) = secure {
            let (clipped, seconds, times) = round.finish(&mut engine)?;
            row.clipped += clipped;
            row.secagg_seconds += seconds;
            row.secagg_stages
                .get_or_insert_with(Default::default)
                .add(&times);
        }
        let record = engine.finish_task()?;
        match plan.spec.kind {
            TaskKind::Stats => {}
            TaskKind::Train => {
                row.selected = record.selected.len();
                row.reported = record.reported.len();
                row.committed = record.outcome == Outcome::Committed;
                row.train = record.metrics.clone();
                if let Some(p) = &record.privacy {
                    row.epsilon = Some(p.epsilon);
                    row.dp_clip = Some(p.clip);
                    row.dp_noise = Some(p.noise_multiplier);
                }
                now += fleet.round_seconds(&record.selected, &index);
                row.virtual_seconds = now;
                row.seconds = round_start.elapsed().as_secs_f64();
                if !engine.run().evaluate || !row.committed {
                    exp.rounds.push(std::mem::take(&mut row));
                    bar.inc(1);
                } else {
                    awaiting_eval = true;
                }
            }
            // The final serving task hands the best version out: its
            // figures are the best version's (`best_summary`), not a row.
            TaskKind::Evaluate if plan.model_version != engine.version() => {}
            // An analysis's one evaluation (the final state handed out)
            // completes the last training row, already pushed.
            TaskKind::Evaluate if !engine.run().evaluate && !exp.rounds.is_empty() => {
                if let Some(last) = exp.rounds.last_mut() {
                    last.eval = record.metrics.clone();
                }
                exp.per_merchant = per_merchant;
            }
            TaskKind::Evaluate => {
                awaiting_eval = false;
                row.eval = record.metrics.clone();
                row.seconds = round_start.elapsed().as_secs_f64();
                exp.per_merchant = per_merchant;
                exp.rounds.push(std::mem::take(&mut row));
                bar.inc(1);
            }
        }
    }
    if awaiting_eval {
        exp.rounds.push(row);
    }
    bar.finish_and_clear();
    match engine.stopped() {
        None => {}
        // An exhausted budget or early stopping ends the experiment early;
        // its rounds stand.
        Some(stop) if stop.is_planned() => {
            eprintln!("{}: {}", exp.name, stop_text(stop));
            exp.stopped = Some(stop_text(stop));
        }
        // A fault (a round aborted `run.max_attempts` times, a revealed
        // sum): the run failed, but the rounds it committed stand and are
        // reported; the command exits with the cause once every output is
        // written.
        Some(stop) => {
            exp.stopped = Some(stop_text(stop));
            exp.failed = true;
        }
    }
    exp.privacy = engine.ledger().map(|l| experiment::PrivacySummary {
        dp_noise: l.noise_source().label().to_string(),
        mode: l.settings().mode,
        noise_multiplier: l.noise_multiplier(),
        delta: l.settings().delta,
        epsilon: l.epsilon().unwrap_or(0.0),
        clip: exp
            .rounds
            .last()
            .and_then(|r| r.dp_clip)
            .unwrap_or(l.clip()),
        adaptive: l.settings().clip == fedcart_coordinator::config::ClipNorm::Adaptive,
    });
    exp.report.splice(0..0, data_notes);
    if exp.failed {
        // Nothing is served from a failed run: no best version, no
        // personalised copies, no baselines to set it against.
        exp.report.push(exp.failure_line());
        exp.final_model = engine.global().to_vec();
        exp.finish();
        return Ok(exp);
    }
    exp.best = best_summary(&engine, &exp, &merchants, &ids, pool)?;
    // `per_merchant` is the served version's, as `final` is (the last
    // version's figures stay in the rounds).
    if let Some(best) = &exp.best {
        exp.per_merchant = best.served_per_merchant.clone();
    }
    if let (Some(best), Some(p)) = (&mut exp.best, s.personalisation(task)) {
        best.personalised = Some(personalise(
            &engine, best.round, &p, &merchants, &ids, pool,
        )?);
    }
    if let Some(originals) = originals {
        let template = TaskSpec {
            kind: TaskKind::Train,
            model: engine.run().model.clone(),
            sgd: engine.run().sgd.clone(),
            seed: s.seed,
            round: 0,
            standardizer: None,
            dp: None,
            best_version: None,
        };
        // The federated column is this run's served version, merchant by
        // merchant; only the baselines are trained for the report.
        let served = served_figures(&engine, &exp, &merchants, &ids, pool)?;
        baselines(
            &mut exp,
            &template,
            &originals,
            s.mode.baseline_rounds(s.rounds, n),
            // The run's stopping rule: a baseline trained past the point
            // the run stopped at would be compared unfairly.
            engine.run().early_stopping.map(|e| e.patience),
            &served,
            s.progress,
        )?;
    }
    exp.report.extend(selection_report(&exp));
    let notes = closing_notes(s, task, &spec, &exp, &engine.global(), churn_rows, classes);
    exp.report.extend(notes);
    exp.final_model = engine.global().to_vec();
    exp.finish();
    finish_segments(exp, segment_data.as_deref(), &segment_notes, &spec, s)
}

/// The report's closing notes, whichever transport ran the rounds.
fn closing_notes(
    s: &Settings,
    task: TaskChoice,
    spec: &ModelSpec,
    exp: &Experiment,
    model: &[f32],
    churn_rows: usize,
    classes: Classes,
) -> Vec<String> {
    let mut out: Vec<String> = unsplit_note(spec, model, churn_rows).into_iter().collect();
    out.extend(untested_note(task, exp, classes));
    out.extend(noisy_selection_note(s, task, exp, classes));
    out.extend(weak_privacy_note(
        exp,
        s.dp.as_ref().and_then(|d| d.target_epsilon),
    ));
    if s.secagg {
        out.extend(clipping_note(spec, exp, s.secagg_clip(task)));
    }
    out
}

/// Above this ε a differential-privacy guarantee bounds little in
/// practice: an observer's odds of telling whether a merchant took part may
/// grow by e^ε (e^10 ≈ 22,000).
const WEAK_EPSILON: f64 = 10.0;

/// A DP run whose ε came out above [`WEAK_EPSILON`]: said, with what to
/// change, rather than left as a large number in the table.
/// `target`: the `--target-epsilon` the noise was solved from, if given
/// (the advice then names it, not a --dp-noise the user did not pass).
fn weak_privacy_note(exp: &Experiment, target: Option<f64>) -> Option<String> {
    let p = exp.privacy.as_ref()?;
    (p.epsilon > WEAK_EPSILON).then(|| {
        let change = match target {
            Some(t) => format!(
                "give a smaller --target-epsilon (now {t}; the noise solved from it is {})",
                p.noise_multiplier
            ),
            None => format!(
                "raise --dp-noise (now {}), give --target-epsilon",
                p.noise_multiplier
            ),
        };
        format!(
            "ε = {} at δ = {:e} is above {WEAK_EPSILON}: a guarantee this weak bounds little in \
             practice (an observer's odds of telling whether a merchant took part may grow by \
             e^ε); {change}, or run fewer --rounds",
            output::epsilon_text(p.epsilon),
            p.delta,
        )
    })
}

/// Boosted trees none of which split: why, and what to change
/// (`Ensemble::unsplit_note`); `churn_rows` are the merchants' training
/// rows, each of which keeps `valid_fraction` of them aside.
fn unsplit_note(spec: &ModelSpec, global: &[f32], churn_rows: usize) -> Option<String> {
    let ModelSpec::ChurnGbdt { params, .. } = spec else {
        return None;
    };
    let ens = fedcart_common::model::gbdt::Ensemble::decode(global).ok()?;
    let grown = (churn_rows as f64 * (1.0 - params.valid_fraction)).round() as usize;
    ens.unsplit_note(params, Some(grown))
}

/// The round of a secure run that clipped the largest fraction of its
/// training coordinates, when that is above the warning threshold: a clip
/// too low for these updates distorts every sum without failing a round.
fn clipping_note(spec: &ModelSpec, exp: &Experiment, clip: f32) -> Option<String> {
    let per_update = spec.model().update_len() + spec.layout().num_coord_weights + 1;
    let (round, fraction) = exp
        .rounds
        .iter()
        .filter(|r| r.reported > 0)
        .map(|r| (r.round, r.clipped as f64 / (r.reported * per_update) as f64))
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    let setting = format!("--secagg-clip (now {clip:?})");
    fedcart_common::privacy::secagg::clipping_warning(fraction, &setting)
        .map(|w| format!("round {round}: {w}"))
}

/// How many customers of a churn run's merchants, training and held out
/// together, are labelled churned and how many are not.
#[derive(Debug, Clone, Copy, Default)]
struct Classes {
    churners: usize,
    stayers: usize,
    /// Of them, held out for the test: not churned, churned.
    held_out: [usize; 2],
}

/// Below this many held-out customers of either class, a churn run's test
/// figure is said to be a rough one: a 20-row table showed an AUC of 1.0000
/// from 4 held-out rows, with nothing to say it meant little.
const FEW_TO_MEASURE: usize = 10;

/// Below about this many churned customers in the pooled validation slices,
/// a churn run's choice of version (and early stopping) reads `val_auc`
/// from so few positives that it moves by about ±0.03 between versions by
/// chance (Hanley and McNeil's standard error at an AUC of 0.7). Set by
/// judgement, not tuned: a probe's table of 2 % churners had about 38 in
/// its validation slices and served version 1, 5 or 20 by seed while the
/// test AUC rose with every version.
const FEW_TO_SELECT: f64 = 50.0;

/// Says when a churn run chose its served version on a validation slice
/// holding too few churned customers ([`FEW_TO_SELECT`]).
fn noisy_selection_note(
    s: &Settings,
    task: TaskChoice,
    exp: &Experiment,
    classes: Classes,
) -> Option<String> {
    if !task.is_churn() || s.valid_fraction <= 0.0 || exp.best.is_none() {
        return None;
    }
    let churned = classes.churners.saturating_sub(classes.held_out[1]) as f64 * s.valid_fraction;
    (churned < FEW_TO_SELECT).then(|| {
        format!(
            "note: the served version was chosen (and early stopping read) on validation slices \
             holding about {churned:.0} churned customers in all (--valid-fraction {}): at that \
             size val_auc moves by a few hundredths between versions by chance. With rare \
             churners, a larger --valid-fraction, or --valid-fraction 0 (no selection: the last \
             version is served), may serve better",
            s.valid_fraction
        )
    })
}

/// The fewest customers of a class for a merchant's held-out fifth to hold
/// one: the stratified split rounds a fifth of 2 to none.
const FEWEST_HELD_OUT: usize = 3;

/// A recommender run whose merchants hold nothing to test on (every
/// customer bought a single item, say) reports no held-out metric: said in
/// the report rather than left as a table of dashes. A churn figure from
/// too few held-out customers is called a rough one.
fn untested_note(task: TaskChoice, exp: &Experiment, classes: Classes) -> Option<String> {
    let (key, _) = exp.headline()?;
    let measured = exp.rounds.iter().any(|r| r.eval.contains_key(key));
    let [stayed, churned] = classes.held_out;
    if measured && task.is_churn() && stayed.min(churned) < FEW_TO_MEASURE {
        return Some(format!(
            "the {key} is measured on {} held-out customers, {churned} of them churned: too few \
             for the figure to mean much (one customer ranked otherwise moves it by up to {:.2}); \
             give more customers",
            stayed + churned,
            1.0 / stayed.min(churned).max(1) as f64
        ));
    }
    if measured || exp.rounds.is_empty() {
        return None;
    }
    if task.is_mf() {
        return Some(format!(
            "no merchant holds a held-out interaction, so no {key} was measured: leave-last-out \
             (implicit tasks) tests a customer's latest item only when they bought at least 2 \
             items, and keeps a validation item only from 3; a random split (mf) needs more \
             ratings per merchant"
        ));
    }
    task.is_churn().then(|| {
        let few = |n: usize, one: &str, many: &str| {
            format!(
                "the table holds only {n} {} in total, and a merchant's held-out fifth takes one \
                 only from {FEWEST_HELD_OUT} of them, however the table is split",
                if n == 1 { one } else { many }
            )
        };
        let fix = if classes.churners == 0 {
            "no customer of any merchant is labelled churned: check which label values count \
             as churned (the schema's `positive`) or, for an orders export, the churn window \
             and cutoff"
                .to_string()
        } else if classes.churners < FEWEST_HELD_OUT {
            few(classes.churners, "churner", "churners")
        } else if classes.stayers < FEWEST_HELD_OUT {
            few(
                classes.stayers,
                "customer not churned",
                "customers not churned",
            )
        } else if exp.merchants <= 1 {
            "with one merchant, give more customers".to_string()
        } else if exp.partition == "natural" {
            // A natural partition keeps the export's stores: the merchant
            // count is the data's, not a setting.
            format!(
                "the natural partition keeps the export's {} stores; pool them with another \
                 --partition and fewer --merchants, or give a longer export",
                exp.merchants
            )
        } else {
            format!(
                "give fewer --merchants ({} now), or more customers per merchant",
                exp.merchants
            )
        };
        format!(
            "no merchant holds held-out customers of both classes, so no {key} was measured: \
             each merchant tests on a fifth of its customers, stratified by label; {fix}"
        )
    })
}

/// Trains and evaluates the report's baselines (`--out`): every merchant
/// alone, the pooled data, and the popularity rankings, `rounds` rounds
/// each. Said before it starts (on a large log it takes longer than the
/// run) and timed into `timing.baselines_seconds`.
pub(crate) fn baselines(
    exp: &mut Experiment,
    template: &TaskSpec,
    originals: &[LocalData],
    rounds: u64,
    patience: Option<u64>,
    served: &BTreeMap<String, fedcart_common::reference::ServedFigures>,
    show: bool,
) -> anyhow::Result<()> {
    let spinner = if show {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(format!(
            "{}: training the report's baselines ({} merchants alone, all data pooled; leave \
             out --out to skip)",
            exp.name,
            originals.len()
        ));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    tracing::info!(
        merchants = originals.len(),
        rounds,
        "training the report's baselines (each merchant alone, all data pooled): leave out \
         --out to skip them"
    );
    let start = std::time::Instant::now();
    // The run itself is done: a baseline that cannot be computed (the
    // pooled model diverging on an outlier) costs the report its baselines,
    // not the run its outputs.
    match fedcart_common::reference::federation_value(
        template,
        originals,
        rounds,
        patience,
        fedcart_common::reference::Federated::Served(served),
    ) {
        Ok(value) => {
            exp.report.extend(value.notes.iter().cloned());
            exp.federation_value = Some(value);
        }
        Err(e) => {
            tracing::warn!(error = %e, "the federation-value baselines could not be computed");
            exp.report.push(format!(
                "no federation-value baselines: {e} (the federated figures above are the run's)"
            ));
        }
    }
    spinner.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    exp.timing.baselines_seconds = Some(seconds);
    tracing::info!(seconds = format_args!("{seconds:.1}"), "baselines done");
    Ok(())
}

/// Report lines on model selection and, with `--out`, the baselines.
fn selection_report(exp: &Experiment) -> Vec<String> {
    let mut out = Vec::new();
    let Some((key, higher)) = exp.headline() else {
        return out;
    };
    let get = |m: &BTreeMap<String, f64>| m.get(key).copied().unwrap_or(f64::NAN);
    // A figure to print: `–` where none was measured, never `NaN`.
    let shown = |v: Option<f64>| match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "–".to_string(),
    };
    let show = |m: &BTreeMap<String, f64>| shown(m.get(key).copied());
    if let Some(b) = &exp.best {
        out.push(format!(
            "model selection: best version {} by {} = {:.4}; served {key} {} \
             (measured after round {}: {}; last version: {})",
            b.round,
            b.metric,
            b.value,
            show(&b.served),
            b.round,
            show(&b.at_best),
            show(&b.last)
        ));
        // A "best" version chosen among equal scores is a tie, not a choice.
        let scores: Vec<f64> = exp
            .rounds
            .iter()
            .filter_map(|r| r.eval.get(&b.metric).copied())
            .collect();
        if scores.len() > 1 && scores.iter().all(|v| (v - scores[0]).abs() < 1e-12) {
            out.push(format!(
                "note: every one of the {} evaluated versions scored {} = {:.4} on validation, so \
                 version {} was served as the first of a tie: training never moved the \
                 validation metric{}",
                scores.len(),
                b.metric,
                scores[0],
                b.round,
                if b.metric.starts_with("val_hr") {
                    " (the merchants' own bestsellers decided every ranking: see pop_blend)"
                } else {
                    ""
                }
            ));
        }
        // A perfect held-out separation of churners is a column that is
        // the label in disguise far more often than a model (a probe's
        // cancellation code gave 1.0000 without a word).
        if b.metric == "val_auc" && b.value >= 0.9999 {
            // An orders export has no schema: its features are derived, and
            // a perfect score comes from too few customers to rank.
            let cause = if exp.data.starts_with("orders") {
                "with features derived from an orders export, a validation slice of few \
                 customers or a churn window the export barely covers is the likely cause: \
                 check both"
            } else {
                "a column that encodes the label (a cancellation flag or date, a status code) \
                 is the likely cause: check the schema's columns"
            };
            out.push(format!(
                "warning: val_auc {:.4}: the model separates churners perfectly on customers it \
                 did not train on; {cause} before trusting any figure",
                b.value
            ));
        }
        // A churn model that flags no customer at the 0.5 threshold: its
        // accuracy is the share of non-churners, which read as a good model
        // (0.990 on a table of 1 % churners).
        if b.served.get("recall") == Some(&0.0) && b.served.contains_key("accuracy") {
            out.push(format!(
                "note: the served model flags no customer as churning at the 0.5 threshold \
                 (recall 0): its accuracy {} is the share of customers who stay; rank customers \
                 by score (AUC {}, PR-AUC {}) rather than reading accuracy",
                shown(b.served.get("accuracy").copied()),
                shown(b.served.get("auc").copied()),
                shown(b.served.get("pr_auc").copied())
            ));
        }
        // The best version is the last one evaluated (a tie keeps the
        // first): validation was still improving when the rounds ran out.
        let last_evaluated = exp
            .rounds
            .iter()
            .filter(|r| r.eval.contains_key(&b.metric))
            .map(|r| r.round)
            .max();
        if exp.stopped.is_none() && scores.len() > 2 && last_evaluated == Some(b.round) {
            out.push(format!(
                "note: {} was still improving at the last evaluated version ({}): more --rounds \
                 may serve a better model",
                b.metric, b.round
            ));
        }
        if let Some(p) = &b.personalised {
            out.push(format!(
                "personalisation ({} epochs, proximal {}): {} of {} merchants kept their copy \
                 (strictly better {}){}; pooled {} of the selected copies {} (global copy \
                 {}); served {key} with each merchant's selected copy {} \
                 (global copy {}; personalised everywhere {})",
                p.epochs,
                p.proximal,
                p.kept.len(),
                p.per_merchant.len(),
                p.metric,
                if p.kept.is_empty() {
                    String::new()
                } else {
                    format!(": {}", p.kept.join(", "))
                },
                p.metric,
                shown(p.selected.get(&p.metric).copied()),
                shown(b.served.get(&p.metric).copied()),
                show(&p.selected),
                show(&b.served),
                show(&p.personalised)
            ));
        }
    }
    if let Some(v) = &exp.federation_value {
        let cols: Vec<String> = v
            .pooled
            .iter()
            .map(|(c, m)| format!("{c} {}", show(m)))
            .collect();
        // Only merchants with both figures compare: one whose held-out rows
        // are of one class has no AUC, one with nothing held out no figure.
        let comparable: Vec<_> = v
            .merchants
            .iter()
            .filter(|m| m.federated.contains_key(key) && m.local_only.contains_key(key))
            .collect();
        let versus_local =
            experiment::VersusLocal::count(comparable.iter().copied(), key, higher, |m| {
                &m.federated
            });
        let unmeasured = v.merchants.len() - comparable.len();
        // The served model below a baseline the merchants had without it.
        let served = v.pooled.get("federated").map(get);
        let better = |x: f64, y: f64| if higher { x > y } else { x < y };
        let beaten: Vec<String> = ["own_popularity", "local_only", "global_popularity"]
            .iter()
            .filter_map(|c| {
                let b = v.pooled.get(*c).map(get)?;
                // Better by what the four printed decimals can show: one
                // merchant's federated and local-only models are the same
                // model, measured by two AUC estimators a hair apart.
                (served.is_some_and(|f| better(b, f) && (b - f).abs() >= 5e-5))
                    .then(|| format!("{} {b:.4}", c.replace('_', " ")))
            })
            .collect();
        let below = match (served, beaten.is_empty()) {
            (Some(f), false) => Some(format!(
                "note: the served model's {key} on the baselines' terms, {f:.4}, is {} {}: on \
                 these merchants joining the federation did not pay (see the per-merchant table \
                 for where)",
                if higher {
                    "below"
                } else {
                    "worse than (above)"
                },
                beaten.join(" and ")
            )),
            _ => None,
        };
        out.push(format!(
            "baselines ({key}, each merchant's weighted by its held-out rows{}): {}; \
             federated {versus_local}{}",
            v.patience
                .map(|p| format!("; stopped as the run stops, patience {p}"))
                .unwrap_or_default(),
            // None measurable (every merchant too small): said, not blank.
            if cols.is_empty() {
                "none measured".to_string()
            } else {
                cols.join(", ")
            },
            if unmeasured > 0 {
                format!(
                    " ({unmeasured} of {} have no held-out {key}: {})",
                    v.merchants.len(),
                    if key.contains("auc") {
                        "too few held-out rows, or all of one class"
                    } else if key.contains("rmse") {
                        "no held-out rating"
                    } else {
                        "no held-out purchase (leave-last-out needs a customer with two distinct \
                         items)"
                    }
                )
            } else {
                String::new()
            }
        ));
        out.extend(below);
        if v.merchants.iter().any(|m| m.personalised_kept.is_some()) {
            let selected = experiment::VersusLocal::count(
                comparable.iter().copied(),
                key,
                higher,
                fedcart_common::reference::MerchantValue::selected,
            );
            let kept: Vec<&str> = v
                .merchants
                .iter()
                .filter(|m| m.personalised_kept == Some(true))
                .map(|m| m.merchant.as_str())
                .collect();
            out.push(format!(
                "with personalisation: {} of {} merchants kept their copy{}; the selected copy \
                 {selected}",
                kept.len(),
                v.merchants.len(),
                if kept.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", kept.join(", "))
                },
            ));
        }
    }
    out
}

/// The best version by federated validation and its served metrics: the
/// best item side evaluated with every merchant's final private state
/// (re-evaluated only when it is not the last version).
fn best_summary(
    engine: &Engine,
    exp: &Experiment,
    merchants: &[Mutex<LocalData>],
    ids: &[String],
    pool: &rayon::ThreadPool,
) -> anyhow::Result<Option<experiment::BestSummary>> {
    let Some(best) = engine.best() else {
        return Ok(None);
    };
    let last = exp.last_eval();
    // The last evaluation's figures serve when they are the best version's
    // and heard from every merchant; with dropouts (or a sample) they are a
    // subset's, and the served version is evaluated on everyone below.
    let everyone = ids.iter().all(|id| exp.per_merchant.contains_key(id));
    let (served, served_per_merchant) = if best.version == engine.version() && everyone {
        (last.clone(), exp.per_merchant.clone())
    } else {
        let (params, spec) = evaluation_of(engine, best.version, "best")?;
        let outs: Vec<_> = pool.install(|| {
            merchants
                .par_iter()
                .map(|m| run_task(&spec, &params, &mut m.lock().expect("merchant lock")))
                .collect()
        });
        let outs = ids
            .iter()
            .zip(outs)
            .map(|(id, out)| {
                let out = out.with_context(|| format!("{id}: evaluating the best version"))?;
                Ok((id.clone(), out))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let served = pooled_evaluation(&spec.model, outs.iter().map(|(_, o)| o));
        let per = outs.into_iter().map(|(id, o)| (id, o.metrics)).collect();
        (served, per)
    };
    Ok(Some(experiment::BestSummary {
        round: best.version,
        metric: best.metric.clone(),
        value: best.value,
        at_best: exp.eval_at(best.version),
        served,
        last,
        served_per_merchant,
        personalised: None,
    }))
}

/// Each merchant's figures under the version the run serves (the best by
/// validation, else the last) and, with personalisation, under its
/// fine-tuned copy: the federated column of the federation-value report.
/// A merchant missing from the served figures (the last evaluation, when
/// it is the served version, heard only from the merchants it selected or
/// that did not drop out) is evaluated here on the served version, as the
/// engine would hand it out: the table has every merchant, and its pooled
/// federated figure is `best.served` whenever that covers every merchant
/// (but for AUC and PR-AUC, which the table averages over merchants like
/// its other columns and `best.served` reads off the summed histograms).
fn served_figures(
    engine: &Engine,
    exp: &Experiment,
    merchants: &[Mutex<LocalData>],
    ids: &[String],
    pool: &rayon::ThreadPool,
) -> anyhow::Result<BTreeMap<String, fedcart_common::reference::ServedFigures>> {
    let (version, per_merchant) = match &exp.best {
        Some(b) => (b.round, &b.served_per_merchant),
        None => (engine.version(), &exp.per_merchant),
    };
    let missing: Vec<usize> = (0..ids.len())
        .filter(|&k| !per_merchant.contains_key(&ids[k]))
        .collect();
    let mut metrics = per_merchant.clone();
    if !missing.is_empty() {
        let (params, spec) = evaluation_of(engine, version, "served")?;
        let outs: Vec<_> = pool.install(|| {
            missing
                .par_iter()
                .map(|&k| {
                    run_task(
                        &spec,
                        &params,
                        &mut merchants[k].lock().expect("merchant lock"),
                    )
                })
                .collect()
        });
        for (&k, out) in missing.iter().zip(outs) {
            let out = out.with_context(|| format!("{}: evaluating version {version}", ids[k]))?;
            metrics.insert(ids[k].clone(), out.metrics);
        }
    }
    let personal = exp.best.as_ref().and_then(|b| b.personalised.as_ref());
    Ok(metrics
        .into_iter()
        .map(|(id, metrics)| {
            let personalised = personal
                .and_then(|p| p.per_merchant.get(&id))
                .map(|m| (m.personalised.clone(), m.kept));
            (
                id,
                fedcart_common::reference::ServedFigures {
                    metrics,
                    personalised,
                },
            )
        })
        .collect())
}

/// Every merchant personalises the served `version` (in parallel, each on
/// its own data; their private state is left as served) and keeps its copy
/// where its validation improves.
fn personalise(
    engine: &Engine,
    version: u64,
    p: &fedcart_common::model::mf::Personalise,
    merchants: &[Mutex<LocalData>],
    ids: &[String],
    pool: &rayon::ThreadPool,
) -> anyhow::Result<experiment::PersonalSummary> {
    let (params, spec) = evaluation_of(engine, version, "served")?;
    let outs: Vec<_> = pool.install(|| {
        merchants
            .par_iter()
            .map(|m| {
                fedcart_common::train::personalise(
                    &spec,
                    &params,
                    &mut m.lock().expect("merchant lock"),
                    p,
                )
            })
            .collect()
    });
    let mut selected = PooledMean::default();
    let mut everywhere = PooledMean::default();
    let mut kept = Vec::new();
    let mut per_merchant = BTreeMap::new();
    let mut metric = String::new();
    for (id, out) in ids.iter().zip(outs) {
        let out = out.with_context(|| format!("{id}: personalising version {version}"))?;
        metric = out.metric.to_string();
        selected.add(out.selected_metrics(), out.weights);
        everywhere.add(&out.personal_metrics, out.weights);
        if out.kept {
            kept.push(id.clone());
        }
        per_merchant.insert(
            id.clone(),
            experiment::MerchantPersonal {
                kept: out.kept,
                global_val: out.global_val,
                personal_val: out.personal_val,
                personalised: out.personal_metrics,
            },
        );
    }
    Ok(experiment::PersonalSummary {
        epochs: p.epochs,
        proximal: p.proximal,
        metric,
        kept,
        selected: selected.mean(),
        personalised: everywhere.mean(),
        per_merchant,
    })
}

/// The stored `version` (the `which` version of the run, for the error)
/// and an evaluation task of it, as the engine would hand it out.
fn evaluation_of(
    engine: &Engine,
    version: u64,
    which: &str,
) -> anyhow::Result<(std::sync::Arc<Vec<f32>>, TaskSpec)> {
    let params = engine
        .model(version)?
        .with_context(|| format!("{which} version {version} is not stored"))?;
    let run = engine.run();
    let spec = TaskSpec {
        kind: TaskKind::Evaluate,
        model: run.model.clone(),
        sgd: run.sgd.clone(),
        seed: run.seed,
        round: version,
        standardizer: engine.standardizer().cloned(),
        dp: None,
        best_version: None,
    };
    Ok((params, spec))
}

/// The federation's figures from every merchant's evaluation, as the engine
/// commits an evaluation: a mean per metric weighted by the rows it is a
/// mean over (validation figures by validation rows, `PooledMean`), and
/// those that do not average (AUC, PR-AUC) from the summed evaluation
/// vectors, so served figures read like every round's.
pub(crate) fn pooled_evaluation<'a>(
    model: &ModelSpec,
    outs: impl IntoIterator<Item = &'a fedcart_common::model::TaskOutput>,
) -> BTreeMap<String, f64> {
    let mut mean = PooledMean::default();
    let mut sum = vec![0.0f64; model.eval_len()];
    for out in outs {
        mean.add(&out.metrics, out.figure_weights());
        out.add_values_to(&mut sum);
    }
    let mut m = mean.mean();
    if !sum.is_empty() {
        m.extend(model.pooled_metrics(&sum));
    }
    m
}

/// Adds the segment profiles of a segmentation run to its report (and
/// writes the merchants' labels under `--out`): the chosen centres become
/// the experiment's final model, and the choice of k its last report line.
/// Creates `--out` and checks that a file can be written in it.
pub(crate) fn check_out_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let refused = |e: std::io::Error| {
        anyhow::anyhow!(
            "--out {}: {e}; nothing was run (give a directory that can be created and written)",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(refused)?;
    let probe = dir.join(format!(".fedcart-sim-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(refused)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn finish_segments(
    mut exp: Experiment,
    merchants: Option<&[LocalData]>,
    notes: &[String],
    spec: &ModelSpec,
    s: &Settings,
) -> anyhow::Result<Experiment> {
    let Some(merchants) = merchants else {
        return Ok(exp);
    };
    let (k, d, centres, choice) = segments::decode_final(spec, &exp.final_model)?;
    exp.final_model = centres;
    let profiles = segments::profile(merchants, &exp.final_model, k, d)?;
    let names = data::feature_names(&s.data);
    // What reading the data noted (e.g. what the churn rate means) first.
    exp.report = notes.to_vec();
    exp.report.extend(segments::report(&profiles, &names));
    exp.report.extend(choice);
    exp.final_metrics
        .insert("pooled_inertia".into(), profiles.inertia);
    let labels = &profiles.labels;
    if let Some(dir) = &s.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Each customer's raw features too: the pooled data of the
        // scikit-learn reference (coordinator/sim/examples/kmeans_reference.py).
        // `customer` is the table's or export's id (the row within the
        // merchant stays, for the reference script).
        // The features under their names (they were `f0..`, which left a
        // one-hot column to be found in the schema).
        let quoted = |id: &str| {
            if id.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", id.replace('"', "\"\""))
            } else {
                id.to_string()
            }
        };
        let mut out = String::from("merchant,row,customer,segment");
        for j in 0..d {
            let name = names.get(j).cloned().unwrap_or_else(|| format!("f{j}"));
            out.push(',');
            out.push_str(&quoted(&name));
        }
        out.push('\n');
        for (m, l) in merchants.iter().zip(labels) {
            let churn = m.churn.as_ref().context("segments need RFM features")?;
            let rows = churn.train.x.rows().into_iter().chain(churn.valid.x.rows());
            let ids = churn.train.ids.iter().chain(&churn.valid.ids);
            for (i, ((c, row), id)) in l.iter().zip(rows).zip(ids).enumerate() {
                out.push_str(&format!("{},{i},{},{c}", m.merchant_id, quoted(id)));
                for v in row {
                    out.push_str(&format!(",{v}"));
                }
                out.push('\n');
            }
        }
        let path = dir.join("segments.csv");
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        let shown = segments::shown_features(&names, &profiles);
        plots::segments(dir, merchants, k, labels, &names, &shown)?;
        exp.files
            .extend(["segments.csv".to_string(), "segments.png".to_string()]);
    }
    Ok(exp)
}

/// A run configuration's refusal, naming the flag that set the field
/// (`--dp-delta` rather than `run.dp.delta`) where one did.
fn flag_error(e: fedcart_coordinator::config::ConfigError) -> anyhow::Error {
    use fedcart_coordinator::config::ConfigError;
    let flag = |field: &str| match field {
        "run.dp.delta" => Some("--dp-delta"),
        "run.dp.clip" => Some("--dp-clip"),
        "run.dp.noise_multiplier" => Some("--dp-noise"),
        "run.dp.target_epsilon" => Some("--target-epsilon"),
        "run.dp.mode" => Some("--dp-mode"),
        // DP as a whole (a model that takes none): the flags that turned it on.
        "run.dp" => Some("--dp-clip (with --dp-noise or --target-epsilon)"),
        "run.rounds" => Some("--rounds"),
        "run.sgd.epochs" => Some("--epochs"),
        "run.sgd.learning_rate" => Some("--lr"),
        "run.sgd.batch_size" => Some("--batch-size"),
        "run.sgd.prox_mu" => Some("--strategy fedprox:MU"),
        "run.strategy" => Some("--strategy"),
        "run.max_attempts" => Some("--max-attempts"),
        "run.early_stopping" | "run.early_stopping.patience" => Some("--patience"),
        "run.secagg.clip" => Some("--secagg-clip"),
        "run.secagg.neighbours" => Some("--secagg-neighbours"),
        "run.selection.fraction" => Some("--fraction"),
        _ => None,
    };
    match e {
        ConfigError::Invalid { field, message } if flag(field).is_some() => {
            // The simulator's federation is its `--merchants` (the run's
            // population is set from it).
            let message = message.replace("run.dp.population", "--merchants");
            anyhow::anyhow!("invalid {}: {message}", flag(field).unwrap_or(field))
        }
        e => e.into(),
    }
}

/// Why the run stopped, in the simulator's terms: its flag where the
/// coordinator's text names a key of `coordinator.toml`.
pub(crate) fn stop_text(stop: &fedcart_coordinator::engine::RunStop) -> String {
    stop.to_string()
        .replace("(run.early_stopping.patience)", "(--patience)")
}

/// The fewest results a simulated round commits with: 1, except under
/// distributed DP, whose noise is planned for a commit with only the quorum
/// (`DpSettings::noise_multiplier`): there it is the round's cohort less the
/// dropouts `--dropout` makes likely (three standard deviations of the
/// binomial below the mean), so that a target ε does not buy noise for a
/// round of one survivor.
fn sim_quorum(s: &Settings, per_round: usize) -> usize {
    let distributed =
        s.dp.as_ref()
            .is_some_and(|d| d.mode == fedcart_coordinator::config::DpMode::Distributed);
    if !distributed || s.mode != mode::Mode::Sync {
        return 1;
    }
    let (m, p) = (per_round as f64, s.dropout);
    ((m * (1.0 - p) - 3.0 * (m * p * (1.0 - p)).sqrt()).floor() as usize).clamp(1, per_round.max(1))
}

/// A progress bar on stderr, hidden unless `show` (a terminal, no `-q`).
fn progress_bar(rounds: u64, name: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(rounds),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] round {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(name.to_string());
    bar
}
