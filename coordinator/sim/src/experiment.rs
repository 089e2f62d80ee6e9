//! What one experiment measured: its rounds, final metrics, per-merchant
//! metrics and timings, as the drivers fill them in and `output` writes them.

use std::collections::BTreeMap;

use fedcart_common::privacy::secagg::StageTimes;
use fedcart_common::task::ModelSpec;
use serde::Serialize;

use crate::data::{DataSpec, TaskChoice};
use crate::settings::Settings;

/// How a column of the federation-value report compares with local-only,
/// merchant by merchant: shown as "beats local-only for B of N merchants,
/// ties it for T, loses to it for L" (the report's lines) and in the plot
/// of many merchants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersusLocal {
    /// Merchants whose column figure is better than local-only's.
    pub better: usize,
    /// Merchants whose two figures are exactly equal.
    pub tied: usize,
    /// Merchants whose column figure is worse.
    pub worse: usize,
    /// Merchants compared (a NaN figure is in none of the three).
    pub of: usize,
}

impl VersusLocal {
    /// Counts `merchants` (those with both figures of `key`; any other is
    /// compared but counted in none of the three) by `column`'s figure
    /// against local-only's, better as the metric's direction says. A tie
    /// is an exactly equal figure, not a loss: a recommender's hit counts
    /// are whole numbers, and a small store often scores the same either
    /// way (grocery stores read "beats local-only for 3 of 20" for 3 wins,
    /// 17 ties and no loss).
    pub fn count<'a>(
        merchants: impl IntoIterator<Item = &'a fedcart_common::reference::MerchantValue>,
        key: &str,
        higher_is_better: bool,
        column: impl Fn(&fedcart_common::reference::MerchantValue) -> &BTreeMap<String, f64>,
    ) -> Self {
        use std::cmp::Ordering;
        let mut tally = Self::default();
        for m in merchants {
            tally.of += 1;
            let (Some(c), Some(l)) = (column(m).get(key), m.local_only.get(key)) else {
                continue;
            };
            match c.partial_cmp(l) {
                Some(Ordering::Equal) => tally.tied += 1,
                Some(o) if (o == Ordering::Greater) == higher_is_better => tally.better += 1,
                Some(_) => tally.worse += 1,
                // A NaN figure compares with nothing.
                None => {}
            }
        }
        tally
    }
}

impl std::fmt::Display for VersusLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "beats local-only for {} of {} merchants, ties it for {}, loses to it for {}",
            self.better, self.of, self.tied, self.worse
        )
    }
}

/// One training round as reported.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RoundRow {
    /// Round number (= version committed).
    pub round: u64,
    /// Merchants selected.
    pub selected: usize,
    /// Merchants whose update was accepted.
    pub reported: usize,
    /// Whether the round committed.
    pub committed: bool,
    /// Weighted mean of the training metrics.
    pub train: BTreeMap<String, f64>,
    /// Weighted mean of the held-out metrics of the new version.
    pub eval: BTreeMap<String, f64>,
    /// Update bytes sent by merchants.
    pub bytes_up: u64,
    /// Model bytes downloaded by merchants.
    pub bytes_down: u64,
    /// Wall-clock seconds of the round (train + evaluate).
    pub seconds: f64,
    /// Of `seconds`, the secure aggregation (all parties, in-process).
    pub secagg_seconds: f64,
    /// `secagg_seconds` by protocol stage (in-process secure rounds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secagg_stages: Option<StageTimes>,
    /// Update coordinates clipped by secure aggregation's encoding.
    pub clipped: u64,
    /// Differential privacy: ε of the run after this round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Differential privacy: the clip norm C of this round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_clip: Option<f64>,
    /// Differential privacy: the noise multiplier this round was accounted
    /// at — the planned σ centrally; in distributed mode σ·√(s/m) for `s`
    /// of `m` planned agents in the sum, so a round with dropouts shows the
    /// smaller noise its ε was charged at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_noise: Option<f64>,
    /// Virtual time (see `clock.rs`) when this version was committed: the
    /// axis on which synchronous rounds and FedBuff compare. Deterministic.
    pub virtual_seconds: f64,
    /// FedBuff: mean staleness τ of the buffered updates (0 in sync mode).
    pub staleness_mean: f64,
    /// FedBuff: largest staleness τ among the buffered updates.
    pub staleness_max: u64,
}

/// Wall-clock timings of an experiment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Loading and partitioning the data.
    pub load_seconds: f64,
    /// All rounds.
    pub total_seconds: f64,
    /// Mean seconds per round after the first.
    pub seconds_per_round: f64,
    /// With `--out`: training and evaluating the report's baselines
    /// (local-only, centralised, popularity) after the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baselines_seconds: Option<f64>,
}

/// The outcome of one experiment.
#[derive(Debug, Clone, Serialize)]
pub struct Experiment {
    /// `task on data`.
    pub name: String,
    /// Task name.
    pub task: String,
    /// Dataset spec.
    pub data: String,
    /// Merchants simulated.
    pub merchants: usize,
    /// Federated parameters.
    pub model_len: usize,
    /// The model as trained: its family and every hyper-parameter, with
    /// the defaults and the privacy defaults resolved (`settings` keeps
    /// only what was given: a run with DP and one without, on different
    /// defaults, read alike; found by a researcher probe).
    pub model: ModelSpec,
    /// The local optimiser as run, for the families it trains (churn LR
    /// and MLP); MF's learning rate and epochs are in `model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sgd: Option<fedcart_common::model::sgd::SgdParams>,
    /// Strategy name.
    pub strategy: String,
    /// Partitioner.
    pub partition: String,
    /// `sync` or `fedbuff`.
    pub mode: String,
    /// Final held-out metrics (the last round's `eval`).
    #[serde(rename = "final")]
    pub final_metrics: BTreeMap<String, f64>,
    /// Every round.
    pub rounds: Vec<RoundRow>,
    /// Each merchant's held-out metrics of the final model: the served
    /// version's (the best by validation) where the run selects one, as
    /// `final`.
    pub per_merchant: BTreeMap<String, BTreeMap<String, f64>>,
    /// Timings (vary between runs).
    pub timing: Timing,
    /// Local-only vs federated vs centralised, per merchant (computed with
    /// `fedcart_common::reference::federation_value` when `--out` is given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation_value: Option<fedcart_common::reference::FederationValue>,
    /// Differential privacy of the run, when `--dp-clip` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
    /// With `--secagg`: how the agents' keys reached each other. The
    /// simulator has no TLS, so they are never bound to merchant
    /// certificates, unlike `serve` with its mTLS agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secagg_keys: Option<String>,
    /// Why the run stopped before its last round (an exhausted privacy
    /// budget, early stopping, or a fault), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The run ended on a fault (`stopped` says which: a round aborted
    /// `run.max_attempts` times, a revealed sum): the rounds it committed
    /// are reported, nothing is served from it, and the command exits with
    /// an error once every output is written.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    /// Model selection: the best version by the federated validation metric
    /// and what it scores when served (with the merchants' final private
    /// state), when the model reports a validation metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSummary>,
    /// The final global model's parameters (not written to the outputs;
    /// for comparing runs, e.g. the two transports).
    #[serde(skip)]
    pub final_model: Vec<f32>,
    /// Files the run wrote under `--out` besides the outputs every run
    /// writes (a segmentation's `segments.csv` and `segments.png`), named
    /// in the output manifest so that a later run can retire them.
    #[serde(skip)]
    pub files: Vec<String>,
    /// Analysis tasks' report (segment profiles, rules), as Markdown lines.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub report: Vec<String>,
    /// The hyper-parameter search that chose this run's configuration
    /// (`--search`), with every trial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchSummary>,
    #[serde(skip)]
    headline: Option<(&'static str, bool)>,
    #[serde(skip)]
    selection: Option<(&'static str, bool)>,
}

/// One configuration of the hyper-parameter search (`--search`): the MF
/// knobs it tunes, as `--factors`, `--lr`, `--reg`, `--epochs`,
/// `--negatives` and (iALS) `--alpha` set them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SearchConfig {
    /// Latent factors k.
    pub factors: usize,
    /// Local learning rate (factors and biases).
    #[serde(serialize_with = "shortest_f32")]
    pub lr: f32,
    /// L2 penalty on the factors (the biases' keeps its default ratio).
    #[serde(serialize_with = "shortest_f32")]
    pub reg: f32,
    /// Local epochs per round.
    pub epochs: usize,
    /// BPR negatives per purchase (unused by explicit MF and iALS).
    pub negatives: usize,
    /// iALS confidence scale α (`None` for the SGD tasks, which have none).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "shortest_f32_opt"
    )]
    pub alpha: Option<f32>,
}

/// An f32 as the shortest decimal that reads back as it (0.01, not
/// 0.009999999776482582), the way `--lr` would be written.
fn shortest_f32<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.to_string().parse().unwrap_or(f64::from(*v)))
}

/// [`shortest_f32`] of a value that is there (`skip_serializing_if` drops
/// the others).
fn shortest_f32_opt<S: serde::Serializer>(v: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => shortest_f32(v, s),
        None => s.serialize_none(),
    }
}

/// What one trial measured in one rung: an ordinary federated run of at
/// most the rung's rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialRung {
    /// The rung (0 = first).
    pub rung: usize,
    /// Training rounds the run was given.
    pub allotted: u64,
    /// Training rounds it spent (fewer after an early stop; a failed run
    /// is charged its allotment).
    pub rounds: u64,
    /// Its best version by the federated validation metric.
    pub best_version: Option<u64>,
    /// That version's federated validation metric: the trial's score.
    pub value: Option<f64>,
    /// Why the run failed, if it did (it then ranks last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the candidate went on to the next rung (or, in the last
    /// rung, was chosen).
    pub kept: bool,
    /// Update bytes the merchants sent during the run.
    pub bytes_up: u64,
    /// Wall-clock seconds of its rounds.
    pub seconds: f64,
}

/// One candidate of the search and the rungs it ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchTrial {
    /// Index of the candidate (0 = the settings as given).
    pub candidate: usize,
    /// Its configuration.
    pub config: SearchConfig,
    /// Every rung it ran, in order.
    pub rungs: Vec<TrialRung>,
}

/// The hyper-parameter search of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchSummary {
    /// The validation metric that ranks the trials.
    pub metric: String,
    /// Whether larger values of it are better.
    pub higher_is_better: bool,
    /// The budget in training rounds (`--search`).
    pub budget: u64,
    /// Training rounds the trials spent.
    pub rounds_used: u64,
    /// The rungs as planned.
    pub schedule: Vec<crate::halving::Rung>,
    /// Every candidate.
    pub trials: Vec<SearchTrial>,
    /// The candidate chosen (its index in `trials`).
    pub chosen: usize,
    /// Wall-clock seconds of all trials' rounds.
    pub seconds: f64,
    /// `seconds` per round spent.
    pub seconds_per_round: f64,
}

/// What the reports say about key binding under `--secagg` for `transport`.
pub(crate) fn secagg_keys(transport: crate::args::Transport) -> &'static str {
    match transport {
        crate::args::Transport::Inproc => {
            "in-process: keys handed over in memory, not bound to merchant certificates \
             (simulation, no TLS)"
        }
        crate::args::Transport::Grpc => {
            "loopback gRPC without TLS: agents run with privacy.require_key_binding = false, \
             keys not bound to merchant certificates (simulation)"
        }
    }
}

/// The version served to merchants: the best by federated validation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BestSummary {
    /// The best version (= its round).
    pub round: u64,
    /// The validation metric that chose it.
    pub metric: String,
    /// Its federated value at the best version.
    pub value: f64,
    /// The held-out metrics measured right after the best round.
    pub at_best: BTreeMap<String, f64>,
    /// The held-out metrics of the best version as served at the end of the
    /// run (the item side of the best version, each merchant's latest
    /// private state); the experiment's `final` metrics.
    pub served: BTreeMap<String, f64>,
    /// The held-out metrics of the last version.
    pub last: BTreeMap<String, f64>,
    /// Each merchant's served metrics.
    pub served_per_merchant: BTreeMap<String, BTreeMap<String, f64>>,
    /// Personalisation at the serving step (`--personalise`), if on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personalised: Option<PersonalSummary>,
}

/// What personalisation did at the serving step: each merchant fine-tuned
/// the served version and kept its copy where its validation improved.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PersonalSummary {
    /// Local fine-tuning epochs (`--personalise`).
    pub epochs: usize,
    /// The proximal weight μ (`--personalise-proximal`).
    pub proximal: f32,
    /// The validation metric each merchant compared its two copies on.
    pub metric: String,
    /// The merchants that kept (and serve) their personalised copy.
    pub kept: Vec<String>,
    /// Held-out metrics pooled over the merchants, each with the copy it
    /// serves: its personalised one where kept, else the global one.
    pub selected: BTreeMap<String, f64>,
    /// Held-out metrics pooled over the merchants of every personalised
    /// copy, kept or not (what personalising everywhere would give).
    pub personalised: BTreeMap<String, f64>,
    /// Per merchant.
    pub per_merchant: BTreeMap<String, MerchantPersonal>,
}

/// One merchant's personalisation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MerchantPersonal {
    /// Whether it kept the personalised copy.
    pub kept: bool,
    /// The served global copy's validation figure.
    pub global_val: f64,
    /// The personalised copy's validation figure.
    pub personal_val: f64,
    /// The personalised copy's held-out metrics.
    pub personalised: BTreeMap<String, f64>,
}

/// The privacy guarantee of a finished experiment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrivacySummary {
    /// Where the noise came from: seeded in the simulator, which makes the
    /// experiment reproducible and the noise public.
    pub dp_noise: String,
    /// `central` or `distributed`.
    pub mode: fedcart_coordinator::config::DpMode,
    /// The planned noise multiplier σ (solved from `--target-epsilon` if given).
    pub noise_multiplier: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// ε after the last round.
    pub epsilon: f64,
    /// The clip norm of the last round.
    pub clip: f64,
    /// Whether the clip followed the private quantile estimate.
    pub adaptive: bool,
}

impl Experiment {
    /// An experiment with no rounds yet.
    pub fn new(
        task: TaskChoice,
        data: &DataSpec,
        s: &Settings,
        merchants: usize,
        model: &ModelSpec,
        load_seconds: f64,
    ) -> Self {
        // Explicit train/test files are what the run read, not the
        // dataset's bundled file.
        let data = match s.files() {
            Some((train, test)) => format!(
                "{}:{} (test {})",
                data.kind(),
                train.display(),
                test.display()
            ),
            None => data.name(),
        };
        Self {
            name: format!("{} on {}", task.name(), data),
            task: task.name(),
            data,
            merchants,
            model_len: model.model_len(),
            model: model.clone(),
            sgd: matches!(
                model,
                ModelSpec::ChurnLr { .. } | ModelSpec::ChurnMlp { .. }
            )
            .then(|| {
                let mut sgd = s.sgd(task);
                sgd.prox_mu = s.strategy.build().prox_mu();
                sgd
            }),
            strategy: s.strategy.to_string(),
            partition: s.partition.to_string(),
            mode: s.mode.name().into(),
            final_metrics: BTreeMap::new(),
            rounds: Vec::new(),
            per_merchant: BTreeMap::new(),
            federation_value: None,
            privacy: None,
            secagg_keys: s.secagg.then(|| secagg_keys(s.transport).to_string()),
            stopped: None,
            failed: false,
            best: None,
            timing: Timing {
                load_seconds,
                ..Default::default()
            },
            final_model: Vec::new(),
            files: Vec::new(),
            report: Vec::new(),
            search: None,
            headline: task.headline(),
            selection: model.selection_metric(),
        }
    }

    /// The held-out metrics measured right after `round` committed (empty
    /// if none): a round retried after an aborted attempt has a row per
    /// attempt under the same number, and only the committed one measured
    /// the version.
    pub fn eval_at(&self, round: u64) -> BTreeMap<String, f64> {
        self.rounds
            .iter()
            .filter(|r| r.round == round)
            .find(|r| r.committed)
            .map(|r| r.eval.clone())
            .unwrap_or_default()
    }

    /// The last round's held-out metrics (empty if none).
    pub fn last_eval(&self) -> BTreeMap<String, f64> {
        self.rounds
            .last()
            .map(|r| r.eval.clone())
            .unwrap_or_default()
    }

    /// Fills the final metrics and timings once the rounds are done.
    pub fn finish(&mut self) {
        self.final_metrics = match &self.best {
            Some(b) => b.served.clone(),
            None => self
                .rounds
                .iter()
                .rev()
                .find(|r| !r.eval.is_empty())
                .map(|r| r.eval.clone())
                .unwrap_or_default(),
        };
        self.timing.total_seconds = self.rounds.iter().map(|r| r.seconds).sum();
        let later: Vec<f64> = self.rounds.iter().skip(1).map(|r| r.seconds).collect();
        self.timing.seconds_per_round = if later.is_empty() {
            self.timing.total_seconds
        } else {
            later.iter().sum::<f64>() / later.len() as f64
        };
    }

    /// The report line of a failed run: its cause and what stands.
    pub fn failure_line(&self) -> String {
        let committed = self.rounds.iter().filter(|r| r.committed).count();
        format!(
            "the run failed: {}; the {committed} committed round(s) before it are reported, \
             and no version is served",
            self.stopped.as_deref().unwrap_or("no cause recorded")
        )
    }

    /// The strategy as the summary table and `report.html` show it: with
    /// FedBuff, the mode beside it (`fedavg (fedbuff)`; a FedBuff run read
    /// `fedavg`, a synchronous run's name). The strategy still aggregates
    /// each buffer of updates.
    pub fn strategy_label(&self) -> String {
        if self.mode == "sync" {
            self.strategy.clone()
        } else {
            format!("{} ({})", self.strategy, self.mode)
        }
    }

    /// The headline metric and whether larger is better (None for `noop`).
    pub fn headline(&self) -> Option<(&'static str, bool)> {
        self.headline
    }

    /// The model-selection metric (the federated validation metric that
    /// chooses the best version) and whether larger is better.
    pub fn selection_metric(&self) -> Option<(&'static str, bool)> {
        self.selection
    }

    /// The same experiment with every timing field zeroed, for comparisons.
    pub fn without_timings(&self) -> serde_json::Value {
        let mut e = self.clone();
        e.timing = Timing::default();
        e.rounds.iter_mut().for_each(|r| {
            r.seconds = 0.0;
            r.secagg_seconds = 0.0;
            r.secagg_stages = None;
        });
        if let Some(s) = &mut e.search {
            s.seconds = 0.0;
            s.seconds_per_round = 0.0;
            s.trials
                .iter_mut()
                .flat_map(|t| &mut t.rungs)
                .for_each(|r| r.seconds = 0.0);
        }
        serde_json::to_value(e).expect("serialisable")
    }
}
