//! `simulate --transport grpc`: the same experiment run through the real
//! coordinator service on loopback and one real merchant agent
//! (`fedcart_client::agent::Agent`) per merchant, all in one tokio runtime.
//!
//! Nothing is shortcut: agents join over HTTP/2, receive pushed tasks,
//! download the model in chunks, train with `run_task` and stream their
//! updates back; the service validates, folds and commits through the same
//! engine and redb store as `serve`. The experiment is then read back from
//! what the service recorded — the round records (train/eval metrics,
//! selection, the update bytes it received) — so the report is the same as
//! in-process and the two transports can be compared: with one seed they
//! commit the same models up to the order of floating-point additions
//! (updates are folded in arrival order here, in merchant order in-process).
//!
//! Fidelity needs every task to be drawn from the same pool of merchants,
//! so the run waits for all of them to be connected before each selection
//! (`Selection::min_available`). Dropout is the agent disconnecting from
//! the task it was pushed (the [`Agent::drop_out`] hook, decided by the same
//! seeded draw as in-process); it reconnects before the next task. With
//! `--secagg` the service and agents run the real secure-aggregation stages
//! over gRPC (`service/secure.rs`, the agent's `secure.rs`), in an explicitly
//! unbound mode: there is no TLS on the loopback, so the agents run with
//! `privacy.require_key_binding = false` and take the roster's keys without
//! certificate binding (reported as `secagg_keys` in `metrics.json`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedcart_client::agent::{Agent, TaskDecision, TaskObserver};
use fedcart_client::config::Backoff;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
use fedcart_common::train::{LocalData, run_task};
use rand::RngExt;
use tokio::sync::watch;

use super::data::{DataSpec, Population, TaskChoice};
use super::{Experiment, RoundRow, Settings};
use fedcart_coordinator::config::RunConfig;
use fedcart_coordinator::engine::RunStop;
use fedcart_coordinator::record::{Outcome, RoundRecord, kind_name};

/// Deadline of a task over loopback. Never reached in a healthy run (every
/// selected agent answers or disconnects first); it bounds a run whose agent
/// reconnected before its old session was seen to close.
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

/// Keepalive pings on the agents' Join streams.
const PING: Duration = Duration::from_secs(5);

/// Runs one experiment over loopback gRPC (see the module docs).
pub fn run(
    s: &Settings,
    task: TaskChoice,
    data: &DataSpec,
    pop: Population,
    mut run: RunConfig,
    fleet: &crate::clock::Fleet,
    load_seconds: f64,
) -> anyhow::Result<Experiment> {
    let n = pop.merchants.len();
    let ids: Vec<String> = pop
        .merchants
        .iter()
        .map(|m| m.merchant_id.clone())
        .collect();
    run.round_timeout_ms = ROUND_TIMEOUT.as_millis() as u64;
    run.selection.min_available = n;
    let threads = match s.threads {
        0 => std::thread::available_parallelism().map_or(1, |p| p.get()),
        t => t,
    };
    let mut exp = Experiment::new(task, data, s, n, &pop.model, load_seconds);
    // Baselines for the federation-value report, on untouched copies.
    let originals = (s.out.is_some()
        && !matches!(pop.model, ModelSpec::Noop { .. } | ModelSpec::KMeans { .. })
        && (!pop.model.is_analysis() || matches!(pop.model, ModelSpec::ChurnGbdt { .. })))
    .then(|| pop.merchants.clone());
    // The runtime lives on its own thread: the command may be called from
    // within a runtime (the binary's `main` is async), where neither
    // `block_on` nor dropping a runtime is allowed.
    let name = exp.name.clone();
    let done = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    // Local training runs on the blocking pool: at most one per core.
                    .max_blocking_threads(threads)
                    .enable_all()
                    .build()
                    .context("building the tokio runtime")?
                    .block_on(drive(s, run, pop.merchants, &name))
            })
            .join()
    })
    .map_err(|_| anyhow::anyhow!("the gRPC simulation thread panicked"))??;
    // The virtual clock of the in-process driver, from the same seeds and
    // example counts: each training round advances it by its selection's
    // slowest merchant (it was 0 on every row, and the by-time plot left
    // out; found by a researcher probe).
    let index: std::collections::HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| (id.as_str(), k))
        .collect();
    let mut now = 0.0;
    let clock: Vec<f64> = done
        .history
        .iter()
        .map(|r| {
            if kind_name(r.kind) == "train" {
                now += fleet.round_seconds(&r.selected, &index);
            }
            now
        })
        .collect();
    exp.rounds = rows(
        &done.history,
        &done.stamps,
        done.started,
        &done.model_lens,
        &clock,
    );
    exp.per_merchant = done.per_merchant;
    // Model selection as in process: the best version, what it scored right
    // after its round, and as served.
    if let Some((best, served)) = done.best {
        exp.best = Some(crate::experiment::BestSummary {
            round: best.version,
            metric: best.metric,
            value: best.value,
            at_best: exp.eval_at(best.version),
            served,
            last: exp.last_eval(),
            served_per_merchant: exp.per_merchant.clone(),
            personalised: None,
        });
    }
    // The run's ε as in process: the coordinator's accounting of its last
    // release, with its real (operating-system) noise.
    if let (Some(dp), Some(last)) = (
        &s.dp,
        done.history.iter().rev().find_map(|r| r.privacy.as_ref()),
    ) {
        // The planned multiplier, as in process: the one given, else the
        // largest a round was charged at (a round that lost agents is
        // charged lower; the last one's was shown as the run's).
        let planned = dp.noise_multiplier.unwrap_or_else(|| {
            done.history
                .iter()
                .filter_map(|r| r.privacy.as_ref().map(|p| p.noise_multiplier))
                .fold(last.noise_multiplier, f64::max)
        });
        exp.privacy = Some(crate::experiment::PrivacySummary {
            dp_noise: fedcart_coordinator::ledger::NoiseSource::Os
                .label()
                .to_string(),
            mode: last.mode,
            noise_multiplier: planned,
            delta: last.delta,
            epsilon: last.epsilon,
            clip: last.clip,
            adaptive: dp.clip == fedcart_coordinator::config::ClipNorm::Adaptive,
        });
    }
    if let Some(why) = &done.stopped {
        exp.stopped = Some(crate::stop_text(why));
        exp.failed = !why.is_planned();
    }
    if s.traffic == crate::traffic::TrafficMode::Rows
        || s.download_precision != fedcart_common::federation::sparse::RowPrecision::F32
    {
        exp.report.push(
            "note: over --transport grpc the bytes down are counted as dense f32 models (the \
             agents still download rows as --traffic and --download-precision say; the \
             in-process transport counts those bytes)"
                .into(),
        );
    }
    if exp.failed {
        exp.report.push(exp.failure_line());
        exp.final_model = done.final_model;
        exp.finish();
        return Ok(exp);
    }
    if let Some(originals) = originals {
        crate::baselines(
            &mut exp,
            &done.template,
            &originals,
            s.rounds,
            s.early_stopping(&done.template.model).map(|e| e.patience),
            &done.served,
            s.progress,
        )?;
    }
    exp.final_model = done.final_model;
    exp.finish();
    Ok(exp)
}

/// What a finished gRPC run leaves behind.
struct Done {
    /// The best version by federated validation, with its figures as served
    /// (every merchant, its agent's final private state).
    best: Option<(
        fedcart_coordinator::engine::BestVersion,
        BTreeMap<String, f64>,
    )>,
    /// Why the coordinator ended the run before its last round, if it did.
    stopped: Option<RunStop>,
    history: Vec<RoundRecord>,
    /// When each history record was seen written.
    stamps: Vec<Instant>,
    /// When the first task was opened.
    started: Instant,
    /// Length of each version a task handed out (an itemsets run's
    /// versions, its states, differ in length).
    model_lens: BTreeMap<u64, u64>,
    final_model: Vec<f32>,
    per_merchant: BTreeMap<String, BTreeMap<String, f64>>,
    /// Every merchant's metrics under the final version (with `--out`).
    served: BTreeMap<String, fedcart_common::reference::ServedFigures>,
    /// A training spec of the run (for the federation-value baselines).
    template: TaskSpec,
}

async fn drive(
    s: &Settings,
    run: RunConfig,
    merchants: Vec<LocalData>,
    name: &str,
) -> anyhow::Result<Done> {
    let dir = tempfile::tempdir().context("creating the simulator's temporary store")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port")?;
    let (model, sgd) = (run.model.clone(), run.sgd.clone());
    // Plaintext mode rate-limits per address; here every agent is 127.0.0.1.
    let opts = fedcart_coordinator::server::ServeOptions {
        limits: fedcart_coordinator::limits::Limits::loopback(),
        ..fedcart_coordinator::server::ServeOptions::insecure()
    };
    let running = fedcart_coordinator::server::start_with(
        listener,
        &dir.path().join("simulation.redb"),
        run,
        PING,
        opts,
    )
    .await
    .context("starting the coordinator service")?;
    let shared = Arc::clone(&running.shared);
    let url = format!("http://{}", running.addr);
    let (stop, stop_rx) = watch::channel(false);
    let mut agents = Vec::with_capacity(merchants.len());
    for data in merchants {
        // No TLS on the loopback: the agents explicitly take the roster's
        // keys unbound, as the report's `secagg_keys` says.
        let mut agent = Agent::new(url.clone(), data)
            .with_policy(fedcart_client::policy::PrivacyPolicy::without_key_binding());
        agent.backoff = Backoff {
            initial_ms: 10,
            max_ms: 200,
        };
        // The agents move models as `--traffic` says (the in-process driver
        // counts the same bytes up; downloads are counted as dense here).
        agent.row_transfers = s.traffic == crate::traffic::TrafficMode::Rows;
        agent.download_precision = s.download_precision;
        if s.dropout > 0.0 {
            agent.observer = Some(Arc::new(Dropouts {
                seed: s.seed,
                probability: s.dropout,
                merchant_id: agent.data.merchant_id.clone(),
            }));
        }
        let rx = stop_rx.clone();
        agents.push(tokio::spawn(async move {
            let result = agent.run(rx).await;
            (agent, result)
        }));
    }

    let bar = super::progress_bar(s.rounds, name, s.progress);
    let mut progress = running.progress.clone();
    let mut stamps = Vec::new();
    let mut started = None;
    loop {
        let p = progress.borrow_and_update().clone();
        if started.is_none() && (p.open_task.is_some() || p.records > 0) {
            started = Some(Instant::now());
        }
        while (stamps.len() as u64) < p.records {
            stamps.push(Instant::now());
        }
        bar.set_position(p.version);
        if p.finished {
            break;
        }
        progress
            .changed()
            .await
            .context("the coordinator stopped before the run finished")?;
    }
    bar.finish_and_clear();
    // Why the coordinator ended the run early, if it did. A fault (it
    // gave up on a round) still leaves the committed rounds to report.
    let stopped = shared.stopped();
    if let Some(why) = stopped.as_ref().filter(|w| w.is_planned()) {
        eprintln!("{name}: {}", crate::stop_text(why));
    }

    // The store keys records by task id, so `r10…` sorts before `r2…`: put
    // them back in the engine's order (statistics, then per round the
    // training attempts, then the evaluation attempts).
    let mut history = shared.history()?;
    let rank = |kind: &str| match kind {
        "stats" => 0,
        "train" => 1,
        _ => 2,
    };
    history.sort_by_key(|r| (r.round, rank(kind_name(r.kind)), r.attempt));
    let version = progress.borrow().version;
    let final_model = shared
        .model(version)?
        .with_context(|| format!("final model version {version} is missing"))?
        .to_vec();
    // The version merchants are served: the best by federated validation
    // (the coordinator's final serving task handed it out), else the last.
    let best = shared.best();
    let served_model = match &best {
        Some(b) if b.version != version => shared
            .model(b.version)?
            .with_context(|| format!("best version {} is missing", b.version))?
            .to_vec(),
        _ => final_model.clone(),
    };
    let mut model_lens = BTreeMap::new();
    for r in &history {
        if let std::collections::btree_map::Entry::Vacant(e) = model_lens.entry(r.base_version) {
            let len = shared.model(r.base_version)?.map_or(0, |m| m.len() as u64);
            e.insert(len);
        }
    }
    let standardizer = shared.standardizer();
    let _ = stop.send(true);
    let mut finished = Vec::with_capacity(agents.len());
    for handle in agents {
        let (agent, result) = handle.await.context("an agent task panicked")?;
        result.with_context(|| format!("agent {}", agent.data.merchant_id))?;
        finished.push(agent);
    }
    match &stopped {
        // The task loop ended with the fault already in `stopped`.
        Some(why) if !why.is_planned() => {
            let _ = running.shutdown().await;
        }
        _ => running.shutdown().await?,
    }

    let template = TaskSpec {
        kind: TaskKind::Train,
        model,
        sgd,
        seed: s.seed,
        round: version,
        standardizer,
        dp: None,
        best_version: None,
    };
    // Each merchant's held-out metrics of the served version, evaluated
    // once with its agent's private state: those that answered the last
    // evaluation make the per-merchant table of a run without model
    // selection (the coordinator keeps only their weighted mean); with
    // model selection or `--out`, every merchant (the served figures, and
    // the federation-value report's federated column: the run's own served
    // version, as in process, not a reference FedAvg trained after it).
    let reported: Vec<String> = history
        .iter()
        .rev()
        .find(|r| kind_name(r.kind) == "evaluate" && r.outcome == Outcome::Committed)
        .map(|r| r.reported.clone())
        .unwrap_or_default();
    // Evaluated as of the served version's round, as in process: the agents
    // pair a version with the private state they measured it with.
    let served_spec = TaskSpec {
        round: best.as_ref().map_or(version, |b| b.version),
        ..template.clone()
    };
    let outputs = evaluate(&served_spec, &served_model, &mut finished, |id| {
        s.out.is_some() || best.is_some() || reported.iter().any(|r| r == id)
    })?;
    let served_mean = crate::pooled_evaluation(&template.model, outputs.values());
    let evaluated: BTreeMap<String, BTreeMap<String, f64>> =
        outputs.into_iter().map(|(id, o)| (id, o.metrics)).collect();
    let per_merchant = evaluated
        .iter()
        .filter(|(id, _)| best.is_some() || reported.contains(id))
        .map(|(id, m)| (id.clone(), m.clone()))
        .collect();
    let served = if s.out.is_some() {
        evaluated
            .into_iter()
            .map(|(id, metrics)| {
                let figures = fedcart_common::reference::ServedFigures {
                    metrics,
                    personalised: None,
                };
                (id, figures)
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut template = template;
    template.round = 0;
    template.standardizer = None;
    Ok(Done {
        best: best.map(|b| (b, served_mean)),
        stopped,
        stamps,
        started: started.unwrap_or_else(Instant::now),
        model_lens,
        history,
        final_model,
        per_merchant,
        served,
        template,
    })
}

/// The held-out metrics under `model` of the merchants `which` picks, each
/// with its agent's private state: the agents' (pure) evaluation re-run on
/// their own data after the run, the same numbers they sent.
fn evaluate(
    spec: &TaskSpec,
    model: &[f32],
    agents: &mut [Agent],
    which: impl Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<String, fedcart_common::model::TaskOutput>> {
    let mut spec = spec.clone();
    spec.kind = TaskKind::Evaluate;
    let mut out = BTreeMap::new();
    for agent in agents.iter_mut().filter(|a| which(&a.data.merchant_id)) {
        let o = run_task(&spec, model, &mut agent.data)
            .with_context(|| format!("evaluating merchant {}", agent.data.merchant_id))?;
        out.insert(agent.data.merchant_id.clone(), o);
    }
    Ok(out)
}

/// The report's rows from the service's round records, as the in-process
/// driver builds them: a training task and the evaluation of its version
/// make one row. Bytes are payloads: the update bytes the service received
/// and the model bytes each answering agent downloaded.
fn rows(
    history: &[RoundRecord],
    stamps: &[Instant],
    started: Instant,
    model_lens: &BTreeMap<u64, u64>,
    clock: &[f64],
) -> Vec<RoundRow> {
    let mut out = Vec::new();
    let mut row: Option<(RoundRow, Instant)> = None;
    // As in-process, a statistics task's clipped count joins the next row.
    let mut carried = 0;
    for (k, r) in history.iter().enumerate() {
        let clipped = r.secagg_clipped.map_or(0, |c| c.coordinates);
        let begin = if k == 0 { started } else { stamps[k - 1] };
        let end = stamps.get(k).copied().unwrap_or(begin);
        // Statistics tasks download no model.
        let model_len = match kind_name(r.kind) {
            "stats" => 0,
            _ => model_lens.get(&r.base_version).copied().unwrap_or(0),
        };
        let down = 4 * model_len * r.reported.len() as u64;
        match kind_name(r.kind) {
            "train" => {
                let new = RoundRow {
                    round: r.round,
                    selected: r.selected.len(),
                    reported: r.reported.len(),
                    committed: r.outcome == Outcome::Committed,
                    train: r.metrics.clone(),
                    bytes_up: r.bytes_in,
                    bytes_down: down,
                    clipped: std::mem::take(&mut carried) + clipped,
                    epsilon: r.privacy.as_ref().map(|p| p.epsilon),
                    dp_clip: r.privacy.as_ref().map(|p| p.clip),
                    // As in process: the multiplier the round was charged
                    // at (the column was empty over gRPC).
                    dp_noise: r.privacy.as_ref().map(|p| p.noise_multiplier),
                    virtual_seconds: clock.get(k).copied().unwrap_or_default(),
                    ..Default::default()
                };
                // An evaluation follows a committed round when the run evaluates.
                let evaluated = history.get(k + 1).is_some_and(|next| {
                    kind_name(next.kind) == "evaluate" && next.round == r.round
                });
                if new.committed && evaluated {
                    row = Some((new, begin));
                } else {
                    out.push(RoundRow {
                        seconds: end.duration_since(begin).as_secs_f64(),
                        ..new
                    });
                }
            }
            "evaluate" => {
                if let Some((mut new, begin)) = row.take() {
                    new.eval = r.metrics.clone();
                    new.bytes_up += r.bytes_in;
                    new.bytes_down += down;
                    new.clipped += clipped;
                    new.seconds = end.duration_since(begin).as_secs_f64();
                    out.push(new);
                }
            }
            _ => carried += clipped,
        }
    }
    out
}

#[cfg(test)]
mod tests;

/// `--dropout` over gRPC: the same per-task draw as the in-process transport,
/// made by each real agent through its [`TaskObserver`] seam.
struct Dropouts {
    seed: u64,
    probability: f64,
    merchant_id: String,
}

impl TaskObserver for Dropouts {
    fn on_task(&self, task_id: &str) -> TaskDecision {
        // The in-process draw: only training tasks drop (an evaluation is
        // heard from every merchant it selects, so the figures are the
        // federation's, not a random subset's).
        let drop = task_id.ends_with("-train")
            && fedcart_common::seed::rng(self.seed, &["dropout", task_id, &self.merchant_id])
                .random::<f64>()
                < self.probability;
        if drop {
            TaskDecision::Abandon
        } else {
            TaskDecision::Accept
        }
    }
}
