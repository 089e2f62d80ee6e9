//! Federated hyper-parameter search (`--search ROUNDS`, config key
//! `search`): successive halving over MF configurations, each trial an
//! ordinary federated run.
//!
//! **Candidates.** Candidate 0 is the configuration the settings give (the
//! defaults unless `--factors`, `--lr`, `--reg`, `--epochs` or
//! `--negatives` changed them). The others, `--search-candidates` − 1 of them,
//! are drawn without replacement, with the run seed, from the grid of
//! multiples of that configuration:
//!
//! | knob | grid (× the given value) | defaults give (mf / mf-implicit) |
//! |---|---|---|
//! | factors k | ½, 1, 2, 4 | 16, 32, 64, 128 |
//! | learning rate | ½, 1, 2 | 0.005, 0.01, 0.02 / 0.025, 0.05, 0.1 |
//! | reg (factors; biases in proportion) | ¼, 1, 4 | 0.025, 0.1, 0.4 / 0.0025, 0.01, 0.04 |
//! | local epochs | ⌈½⌉, 1, 2 | 3, 5, 10 |
//! | negatives (mf-implicit only) | ⌈¼⌉, 1, 2 | 1, 4, 8 |
//!
//! `mf-ials` has no learning rate and draws no negatives; its grid is
//! factors × {½, 1, 2} (an item solve costs k³, so 4× the factors would
//! cost 64× a round), the penalty λ × {¼, 1, 4}, the confidence scale
//! α × {¼, 1, 4} (`--alpha`) and local sweeps {⌈½⌉, 1, 2} (`--epochs`): the
//! defaults give k 16 / 32 / 64, λ 0.5 / 2 / 8, α 1 / 4 / 16 and 1 or 2
//! sweeps.
//!
//! **Trials.** A trial is `run_one` with the candidate's configuration and
//! the rung's rounds: a fresh federated run through the same engine and the
//! same transport as the experiment (in-process or the real gRPC service and
//! agents, with secure aggregation when it is on), its statistics step,
//! training rounds, evaluations and early stopping included, on the same
//! data and seed. Its score is the federated validation metric of its best
//! version (`val_rmse` / `val_hr@10` on the merchants' validation slices,
//! the engine's model-selection rule); the test split is never read to
//! choose. A trial that fails (a configuration whose training diverges)
//! ranks last and is charged its allotment.
//!
//! **Budget.** `ROUNDS` training rounds in all, split by
//! [`halving::schedule`](crate::halving::schedule); a trial in a later rung
//! starts again from the initial model (the same seed replays its first
//! rounds), so the budget counts those rounds again: simpler than keeping
//! every candidate's merchants' private state between rungs, at about twice
//! the rounds of resuming. Statistics and evaluation tasks are not counted.
//!
//! **The winner** then trains for `--rounds` from the initial model, an
//! ordinary run reported as usual, with the search as its `search` section.
//! Differential privacy is refused (the trials' models are releases ε would
//! not cover).

use anyhow::{Context, bail};
use rand::seq::SliceRandom;

use crate::data::{DataSpec, TaskChoice};
use crate::experiment::{Experiment, SearchConfig, SearchSummary, SearchTrial, TrialRung};
use crate::halving;
use crate::settings::Settings;

/// Multiples of the given factors.
const FACTORS: [usize; 4] = [1, 2, 4, 8];
/// Divisor applied to [`FACTORS`] (so the multiples are ½, 1, 2, 4).
const FACTORS_DIV: usize = 2;
/// Multiples of the given learning rate.
const LR: [f32; 3] = [0.5, 1.0, 2.0];
/// Multiples of the given factor penalty.
const REG: [f32; 3] = [0.25, 1.0, 4.0];
/// Multiples of the given iALS confidence scale α.
const ALPHA: [f32; 3] = [0.25, 1.0, 4.0];

/// Runs the search for `task` on `data`, then the winner for `--rounds`:
/// the winner's experiment, with the search in its `search` section and
/// its summary first in the report.
pub fn run(
    s: &Settings,
    task: TaskChoice,
    data: &DataSpec,
    pool: &rayon::ThreadPool,
) -> anyhow::Result<Experiment> {
    let budget = s.search.context("the search needs a budget (--search)")?;
    let configs = candidates(s, task)?;
    let summary = halve(s, task, data, pool, &configs, budget)?;
    let winner = summary.trials[summary.chosen].config;
    let mut final_settings = with_config(s, &winner);
    final_settings.search = None;
    let mut exp = crate::run_one(&final_settings, task, data, pool)
        .context("training the search's chosen configuration")?;
    let mut report = summary_lines(&summary);
    report.append(&mut exp.report);
    exp.report = report;
    exp.search = Some(summary);
    Ok(exp)
}

/// The configuration the settings give for `task`.
pub fn given(s: &Settings, task: TaskChoice) -> SearchConfig {
    let h = s.mf_hyper(task);
    SearchConfig {
        factors: s.factors(task),
        lr: h.learning_rate,
        reg: h.reg_factors,
        epochs: h.epochs,
        negatives: h.negatives,
        alpha: (task == TaskChoice::MfIals).then_some(h.alpha),
    }
}

/// Candidate 0 (the given configuration) and `--search-candidates` − 1
/// others drawn with the run seed from the grid (module docs).
pub fn candidates(s: &Settings, task: TaskChoice) -> anyhow::Result<Vec<SearchConfig>> {
    let base = given(s, task);
    let negatives: Vec<usize> = if task == TaskChoice::MfImplicit {
        vec![
            base.negatives.div_ceil(4),
            base.negatives,
            2 * base.negatives,
        ]
    } else {
        vec![base.negatives]
    };
    let epochs = [base.epochs.div_ceil(2), base.epochs, 2 * base.epochs];
    // iALS solves in closed form: its knob in place of the learning rate is
    // the confidence scale α; the SGD tasks have no α.
    let steps: Vec<(f32, Option<f32>)> = match base.alpha {
        Some(alpha) => ALPHA.iter().map(|a| (base.lr, Some(alpha * a))).collect(),
        None => LR.iter().map(|l| (base.lr * l, None)).collect(),
    };
    let factors = match base.alpha {
        Some(_) => &FACTORS[..FACTORS.len() - 1],
        None => &FACTORS[..],
    };
    let mut grid = Vec::new();
    for &f in factors {
        for &(lr, alpha) in &steps {
            for reg in REG {
                for e in epochs {
                    for &n in &negatives {
                        let c = SearchConfig {
                            factors: (base.factors * f / FACTORS_DIV).max(1),
                            lr,
                            reg: base.reg * reg,
                            epochs: e,
                            negatives: n,
                            alpha,
                        };
                        if c != base && !grid.contains(&c) {
                            grid.push(c);
                        }
                    }
                }
            }
        }
    }
    let wanted = s.search_candidates - 1;
    if wanted > grid.len() {
        bail!(
            "--search-candidates {} is more than the grid's {} configurations and the given one",
            s.search_candidates,
            grid.len()
        );
    }
    grid.shuffle(&mut fedcart_common::seed::rng(
        s.seed,
        &["search", "candidates"],
    ));
    let mut out = vec![base];
    out.extend(grid.into_iter().take(wanted));
    Ok(out)
}

/// Successive halving of `configs` within `budget` training rounds: every
/// trial a federated run of the experiment's transport (module docs).
pub fn halve(
    s: &Settings,
    task: TaskChoice,
    data: &DataSpec,
    pool: &rayon::ThreadPool,
    configs: &[SearchConfig],
    budget: u64,
) -> anyhow::Result<SearchSummary> {
    let schedule = halving::schedule(budget, configs.len()).with_context(|| {
        format!(
            "--search {budget} cannot give each of {} candidates a round: give at least {}",
            configs.len(),
            halving::min_budget(configs.len())
        )
    })?;
    let mut trials: Vec<SearchTrial> = configs
        .iter()
        .enumerate()
        .map(|(candidate, &config)| SearchTrial {
            candidate,
            config,
            rungs: Vec::new(),
        })
        .collect();
    let mut alive: Vec<usize> = (0..configs.len()).collect();
    let mut selection: Option<(&'static str, bool)> = None;
    let mut chosen = 0;
    for (r, rung) in schedule.iter().enumerate() {
        let mut scored = Vec::with_capacity(alive.len());
        let mut first_error = None;
        for &k in &alive {
            let trial = with_config(s, &configs[k]);
            let trial = Settings {
                rounds: rung.rounds,
                out: None,
                progress: false,
                search: None,
                ..trial
            };
            // A failed trial (a round aborted too often) scores nothing.
            let outcome =
                crate::run_one(&trial, task, data, pool).and_then(|exp| match exp.failed {
                    true => Err(anyhow::anyhow!(
                        "{}: {}",
                        exp.name,
                        exp.stopped.as_deref().unwrap_or("failed")
                    )),
                    false => Ok(exp),
                });
            let entry = match outcome {
                Ok(exp) => {
                    selection = selection.or(exp.selection_metric());
                    let best = best_version(&exp);
                    TrialRung {
                        rung: r,
                        allotted: rung.rounds,
                        rounds: exp.rounds.len() as u64,
                        best_version: best.map(|b| b.0),
                        value: best.map(|b| b.1),
                        error: None,
                        kept: false,
                        bytes_up: exp.rounds.iter().map(|r| r.bytes_up).sum(),
                        seconds: exp.timing.total_seconds,
                    }
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    first_error.get_or_insert_with(|| text.clone());
                    TrialRung {
                        rung: r,
                        allotted: rung.rounds,
                        rounds: rung.rounds,
                        best_version: None,
                        value: None,
                        error: Some(text),
                        kept: false,
                        bytes_up: 0,
                        seconds: 0.0,
                    }
                }
            };
            tracing::info!(
                rung = r,
                candidate = k,
                config = ?configs[k],
                rounds = entry.rounds,
                value = ?entry.value,
                error = ?entry.error,
                "search trial"
            );
            if s.progress {
                // The trials draw no bars of their own: one line each.
                eprintln!(
                    "search: rung {}/{}, candidate {k} ({}): {} after {} rounds",
                    r + 1,
                    schedule.len(),
                    flags(&configs[k], task == TaskChoice::MfImplicit),
                    entry
                        .value
                        .map_or_else(|| "failed".to_string(), |v| format!("{v:.4}")),
                    entry.rounds
                );
            }
            scored.push((k, entry.value));
            trials[k].rungs.push(entry);
        }
        if scored.iter().all(|(_, v)| v.is_none()) {
            bail!(
                "every trial of rung {r} failed or measured no validation metric{}",
                first_error.map_or(String::new(), |e| format!("; the first: {e}"))
            );
        }
        let (_, higher) = selection.context("the task reports no validation metric")?;
        let kept = halving::keep(&scored, higher);
        for &k in &kept {
            if let Some(last) = trials[k].rungs.last_mut() {
                last.kept = true;
            }
        }
        chosen = kept[0];
        alive = kept;
        alive.sort_unstable();
    }
    let (metric, higher_is_better) = selection.context("the task reports no validation metric")?;
    let rungs = || trials.iter().flat_map(|t| &t.rungs);
    let rounds_used: u64 = rungs().map(|r| r.rounds).sum();
    let seconds: f64 = rungs().map(|r| r.seconds).sum();
    Ok(SearchSummary {
        metric: metric.to_string(),
        higher_is_better,
        budget,
        rounds_used,
        schedule,
        chosen,
        seconds,
        seconds_per_round: if rounds_used > 0 {
            seconds / rounds_used as f64
        } else {
            0.0
        },
        trials,
    })
}

/// The settings with `c`'s knobs.
fn with_config(s: &Settings, c: &SearchConfig) -> Settings {
    Settings {
        factors: Some(c.factors),
        lr: Some(c.lr),
        reg: Some(c.reg),
        epochs: Some(c.epochs),
        negatives: Some(c.negatives),
        alpha: c.alpha.or(s.alpha),
        ..s.clone()
    }
}

/// The best version of a trial by its federated validation metric and
/// that value: the engine's rule (the first strictly better finite value
/// among committed, evaluated rounds), read from the rounds so that both
/// transports score alike.
fn best_version(exp: &Experiment) -> Option<(u64, f64)> {
    let (metric, higher) = exp.selection_metric()?;
    let mut best: Option<(u64, f64)> = None;
    for r in exp.rounds.iter().filter(|r| r.committed) {
        let Some(&v) = r.eval.get(metric).filter(|v| v.is_finite()) else {
            continue;
        };
        let better = match best {
            None => true,
            Some((_, b)) if higher => v > b,
            Some((_, b)) => v < b,
        };
        if better {
            best = Some((r.round, v));
        }
    }
    best
}

/// A configuration as the flags that give it (`--negatives` for BPR only:
/// explicit MF refuses it), ready to paste.
fn flags(c: &SearchConfig, bpr: bool) -> String {
    match c.alpha {
        Some(alpha) => format!(
            "--factors {} --reg {} --alpha {alpha} --epochs {}",
            c.factors, c.reg, c.epochs
        ),
        None if bpr => format!(
            "--factors {} --lr {} --reg {} --epochs {} --negatives {}",
            c.factors, c.lr, c.reg, c.epochs, c.negatives
        ),
        None => format!(
            "--factors {} --lr {} --reg {} --epochs {}",
            c.factors, c.lr, c.reg, c.epochs
        ),
    }
}

/// The search's summary for stdout and the report.
fn summary_lines(s: &SearchSummary) -> Vec<String> {
    let plan: Vec<String> = s
        .schedule
        .iter()
        .map(|r| format!("{} × {}", r.candidates, r.rounds))
        .collect();
    let value = |t: &SearchTrial| {
        t.rungs.last().map_or("-".into(), |r| match r.value {
            Some(v) => format!("{} {v:.4} in rung {}", s.metric, r.rung + 1),
            None => format!("failed in rung {}", r.rung + 1),
        })
    };
    let winner = &s.trials[s.chosen];
    let mut out = vec![
        format!(
            "search: successive halving of {} configurations in {} rungs (candidates × rounds: {}); \
             {} of {} budgeted rounds spent, {:.1} s ({:.3} s per round)",
            s.trials.len(),
            s.schedule.len(),
            plan.join(", "),
            s.rounds_used,
            s.budget,
            s.seconds,
            s.seconds_per_round
        ),
        format!(
            "search: chosen candidate {} ({}): {}",
            s.chosen,
            flags(&winner.config, s.metric != "val_rmse"),
            value(winner)
        ),
    ];
    if s.chosen != 0 {
        out.push(format!(
            "search: the given settings (candidate 0): {}, dropped",
            value(&s.trials[0])
        ));
    }
    out
}

#[cfg(test)]
mod tests;
