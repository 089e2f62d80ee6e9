//! The simulator's command-line flags, as written by the user: every one
//! optional, so that a flag can override the `--config` TOML file, which
//! overrides the defaults. [`Settings`](crate::Settings) validates them.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use fedcart_common::federation::strategy::StrategySpec;
use serde::{Deserialize, Serialize};

use crate::data::orders::OrdersArgs;
use crate::data::{DataSpec, TaskChoice};

/// Flags of `fedcart-sim`. Every flag may also be set in the
/// `--config` TOML file (same names, `-` as `_`; the orders flags under
/// `[orders]`, by their field names); flags win over the file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimArgs {
    /// TOML file with any of the settings below.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Dataset: `movielens:PATH`, `telco:PATH`, `csv:PATH` (any customer table,
    /// read with --schema; plain `csv` takes --train/--test), `orders:PATH` (an orders export
    /// read through the column mapping below; plain `orders` is the bundled
    /// CDNOW log). Without --data and --task the demo runs MovieLens MF and Telco churn.
    #[arg(long)]
    pub data: Option<DataSpec>,
    /// Schema of `--data csv[:PATH]`: a TOML file with the table a merchant
    /// writes under `[data.schema]` (id, label, positive, negative, numeric,
    /// categorical), or `auto` to draft one from the table (printed to
    /// standard error; `fedcart-client schema` writes the same draft to a file).
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// Explicit training file (used instead of splitting --data); needs --test.
    #[arg(long, requires = "test")]
    pub train: Option<PathBuf>,
    /// Explicit held-out file; needs --train.
    #[arg(long, requires = "train")]
    pub test: Option<PathBuf>,
    /// Task: `mf`, `mf-implicit` (BPR), `mf-ials` (implicit ALS), `churn-lr`, `churn-mlp[:H1[,H2]]` (hidden widths,
    /// default 16), `churn-gbdt` (boosted trees), `segments[:K]` (customer segments by federated
    /// k-means; k chosen by the elbow without K), `rules[:MIN]` (frequent itemsets and "bought
    /// together" rules), or `noop:D` (random D-float updates, no training).
    #[arg(long)]
    pub task: Option<TaskChoice>,
    /// Segments of `--task segments` (the same as `segments:K`; the flag wins).
    #[arg(long, value_name = "K")]
    pub k: Option<usize>,
    /// Minimum support of `--task rules`, in baskets across the federation
    /// (the same as `rules:MIN`; the flag wins).
    #[arg(long, value_name = "BASKETS", value_parser = baskets)]
    pub min_support: Option<u64>,
    /// Number of virtual merchants [default: 10].
    #[arg(long)]
    pub merchants: Option<usize>,
    /// Training rounds [default: 20; for churn-gbdt 1 + trees × max-depth: the
    /// feature sketch, then one round per level of each tree].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Fraction of merchants selected per round [default: 1].
    #[arg(long)]
    pub fraction: Option<f64>,
    /// Local epochs per round [default: 10 for mf, 5 for mf-implicit, 3 for churn-mlp, 1
    /// otherwise (iALS: local sweeps)].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Early stopping: stop once this many evaluated rounds in a row did not
    /// improve the federated validation metric (val_hr@10 / val_rmse / val_auc); 0
    /// turns it off. The best version is reported either way
    /// [default: 5 evaluated rounds for models with a validation metric; 50 evaluated trees
    /// for churn-gbdt].
    #[arg(long)]
    pub patience: Option<u64>,
    /// Local learning rate [default: 0.02 for mf, 0.05 for mf-implicit and churn-lr, 0.001 (Adam)
    /// for churn-mlp];
    /// for churn-gbdt the shrinkage of every tree [default: 0.1].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Trees of `--task churn-gbdt` [default: 300].
    #[arg(long)]
    pub trees: Option<usize>,
    /// Depth of each tree of `--task churn-gbdt` (one round per level)
    /// [default: 3].
    #[arg(long)]
    pub max_depth: Option<usize>,
    /// Least hessian sum of a leaf of `--task churn-gbdt` [default: 20].
    #[arg(long)]
    pub min_child_weight: Option<f32>,
    /// L2 penalty on the leaves of `--task churn-gbdt` [default: 10].
    #[arg(long)]
    pub l2: Option<f32>,
    /// Share of each merchant's training rows the churn models (`churn-lr`,
    /// `churn-mlp`, `churn-gbdt`) keep aside as their validation slice, never
    /// trained on: what model selection and `--patience` read (`val_auc`); 0 keeps
    /// none (the last version is served) [default: 0.1].
    #[arg(long, value_name = "SHARE")]
    pub valid_fraction: Option<f64>,
    /// Mini-batch size for churn models [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Latent factors of MF models [default: 128 for mf, 32 for mf-implicit and mf-ials].
    #[arg(long)]
    pub factors: Option<usize>,
    /// L2 penalty λ on the factors of MF models; the bias penalty keeps its
    /// default ratio to it (½ for mf, 1 for mf-implicit and mf-ials)
    /// [default: 0.1 for mf, 0.01 for mf-implicit, 2 for mf-ials].
    #[arg(long, value_name = "LAMBDA")]
    pub reg: Option<f32>,
    /// Sampled negatives per purchase of `--task mf-implicit` (BPR) [default: 4].
    #[arg(long)]
    pub negatives: Option<usize>,
    /// Federated hyper-parameter search of `--task mf` / `mf-implicit` / `mf-ials`:
    /// successive halving over --search-candidates configurations (factors, reg,
    /// lr, epochs, negatives; iALS: factors, reg, alpha, epochs; the given
    /// settings and others drawn with --seed from a
    /// grid around them), within ROUNDS training rounds in all. Each trial is
    /// an ordinary federated run (same transport, secure aggregation if on),
    /// scored by its best version's federated validation metric; the winner
    /// then trains for --rounds. Off by default.
    #[arg(long, value_name = "ROUNDS")]
    pub search: Option<u64>,
    /// Configurations the search starts from, the given settings among them
    /// [default: 8].
    #[arg(long, value_name = "N")]
    pub search_candidates: Option<usize>,
    /// Partitioner: `iid`, `dirichlet:ALPHA` (label skew: churn class, or the
    /// customers' item popularity for MF), `zipf:S` (size skew), `natural` (one
    /// merchant per store of an orders export's --merchant-col) [default: iid].
    #[arg(long)]
    pub partition: Option<String>,
    /// Strategy: fedavg, fedprox:MU (churn-lr, churn-mlp), fedavgm[:β[:η]], fedadam[:η],
    /// fedyogi[:η], fedadagrad[:η], fedmedian, fedtrimmedavg:β, krum:F (rounds of fewer than
    /// 2F + 3 updates abort), multikrum:F:M [default: fedavg].
    #[arg(long)]
    pub strategy: Option<StrategySpec>,
    /// Use secure aggregation (refused with robust strategies). On by default
    /// in the no-argument demo; off by default when --task, --data or
    /// --train/--test choose an experiment.
    #[arg(long, overrides_with = "no_secagg")]
    pub secagg: bool,
    /// Do not use secure aggregation (also in the demo).
    #[arg(long)]
    #[serde(skip)]
    pub no_secagg: bool,
    /// Secure aggregation clips every update value to [-X, X] [default: 1 for
    /// noop, 1e5 otherwise: updates are weighted by example counts, and MF's global mean μ by the merchant's rating count].
    #[arg(long)]
    pub secagg_clip: Option<f32>,
    /// Secure aggregation's neighbour-graph degree k (SecAgg+): each agent
    /// masks with k neighbours and shares its secrets among them, like
    /// Flower's `num_shares` = k + 1. At least 4; at or above the number of
    /// agents − 1 it is the complete graph [default: the complete graph up to
    /// 64 agents, 2·⌈log2 n⌉ above].
    #[arg(long, value_name = "K")]
    pub secagg_neighbours: Option<usize>,
    /// Where BPR draws negatives from: `catalogue` (every item) or
    /// `merchant` (the items the merchant sold, so its update touches only
    /// its own rows) [default: catalogue].
    #[arg(long, value_name = "POOL")]
    pub negatives_from: Option<fedcart_common::model::mf::NegativePool>,
    /// iALS confidence scale α: a purchase of quantity v weighs 1 + α·ln(1 + v)
    /// against 1 for an item not bought [default: 4].
    #[arg(long)]
    pub alpha: Option<f32>,
    /// iALS proximal weight ρ pulling a merchant's item solve towards the
    /// global rows [default: 0.1].
    #[arg(long, value_name = "RHO")]
    pub proximal: Option<f32>,
    /// Explicit MF: measure the test and serve with users solved in closed
    /// form on training and validation ratings, where users solved on
    /// training alone beat the trained ones on the merchant's validation
    /// slice; costs about one local training pass per evaluation at k = 32
    /// [default: off].
    #[arg(long)]
    pub refit_users: bool,
    /// Personalisation (recommenders): after the best version is served,
    /// each merchant fine-tunes its own copy of the item side for EPOCHS
    /// local epochs (iALS: sweeps) and keeps it only where its validation
    /// slice improves; reported beside the federated copy [default: off].
    #[arg(long, value_name = "EPOCHS")]
    pub personalise: Option<usize>,
    /// Personalisation's proximal weight μ pulling each fine-tuned item row
    /// towards the served global row [default: 10 (`mf`, BPR), 100 (iALS)].
    #[arg(long, value_name = "MU")]
    pub personalise_proximal: Option<f32>,
    /// Wire form of models and updates: `dense` vectors, or `rows`: a
    /// plaintext update as the catalogue rows the merchant touched and a
    /// download as the rows changed since the version it holds (MF only;
    /// secure-aggregation uploads stay dense) [default: dense].
    #[arg(long)]
    pub traffic: Option<crate::traffic::TrafficMode>,
    /// Precision of downloaded factor rows with `--traffic rows`: f32, f16
    /// or int8 (8 bits with a per-row scale); merchants then train from the
    /// rounded model [default: f32].
    #[arg(long, value_name = "P")]
    pub download_precision: Option<fedcart_common::federation::sparse::RowPrecision>,
    /// Probability that a merchant selected for a training round drops out of it (evaluations
    /// hear from every merchant they select, so the figures are the federation's) [default: 0].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Attempts of one round before the run stops with the dominant cause of
    /// its aborts (a round that can never commit is not retried for ever)
    /// [default: 10].
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Fraction of merchants that are malicious [default: 0].
    #[arg(long)]
    pub malicious: Option<f64>,
    /// What malicious merchants do to their update: `scale:X` or `signflip` [default: scale:10].
    #[arg(long)]
    pub attack: Option<String>,
    /// Seed of everything random [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads (0 = one per core; at most 1024) [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory for metrics.json, metrics.csv, report.html and the plots.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Differential privacy: L2 clip norm C of each merchant's delta, or
    /// `adaptive` (a private quantile estimate). Turns DP-FedAvg on.
    #[arg(long)]
    #[serde(default, deserialize_with = "number_or_text")]
    pub dp_clip: Option<String>,
    /// DP noise multiplier σ (noise std = σ·C on the sum); or --target-epsilon.
    #[arg(long, allow_hyphen_values = true)]
    pub dp_noise: Option<f64>,
    /// Solve σ up front so that ε after --rounds rounds is at most E.
    #[arg(long, allow_hyphen_values = true)]
    pub target_epsilon: Option<f64>,
    /// δ of the DP guarantee [default: 1e-5].
    #[arg(long, allow_hyphen_values = true)]
    pub dp_delta: Option<f64>,
    /// Who adds the noise: `central` (coordinator) or `distributed` (agents,
    /// under --secagg) [default: central].
    #[arg(long)]
    pub dp_mode: Option<DpModeName>,
    /// How merchants reach the engine: `inproc` (direct calls, a rayon pool)
    /// or `grpc` (the real coordinator service on loopback and the real
    /// merchant agent per merchant, for fidelity and overhead) [default: inproc].
    #[arg(long)]
    pub transport: Option<Transport>,
    /// Column mapping and churn labelling of `--data orders:PATH` (the
    /// `[orders]` table of the config file).
    #[command(flatten)]
    pub orders: OrdersArgs,
    /// How rounds are driven: `sync` (select, wait for every selected
    /// merchant, commit) or `fedbuff` (buffered asynchronous aggregation:
    /// merchants train concurrently on the version they downloaded; every
    /// --buffer updates, weighted by --staleness, make one version). With
    /// fedbuff, --rounds counts committed versions [default: sync].
    #[arg(long)]
    pub mode: Option<ModeName>,
    /// FedBuff: K, the updates buffered per committed version
    /// [default: max(1, concurrency/4)].
    #[arg(long, value_name = "K")]
    pub buffer: Option<usize>,
    /// FedBuff: C, the merchants training at the same time
    /// [default: ⌈fraction × merchants⌉].
    #[arg(long, value_name = "C")]
    pub concurrency: Option<usize>,
    /// FedBuff: weight s(τ) of an update τ versions stale: `sqrt` = 1/√(1+τ),
    /// `const` = 1, `poly:A` = (1+τ)^-A [default: sqrt].
    #[arg(long, value_name = "F")]
    pub staleness: Option<String>,
    /// FedBuff: server learning rate η multiplying the buffered mean step
    /// [default: 1].
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// Virtual clock: log-standard-deviation σ of the merchants' speed factors,
    /// drawn once per merchant from a lognormal with median 1 (0 = all
    /// equally fast; 1 = heavy-tailed, the slowest of 100 ~10× the median)
    /// [default: 0.5].
    #[arg(long, value_name = "SIGMA")]
    pub speed_sigma: Option<f64>,
    /// Virtual clock: seconds one training example takes for one local epoch
    /// at speed 1; a task lasts this × examples × epochs × speed [default: 0.001].
    #[arg(long, value_name = "SECONDS")]
    pub example_seconds: Option<f64>,
    /// Virtual clock: fraction of merchants online in each availability period
    /// (the rest, chosen by seed per period, cannot be handed work) [default: 1].
    #[arg(long, value_name = "FRACTION")]
    pub availability: Option<f64>,
    /// Virtual clock: length of an availability period in virtual seconds
    /// [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub availability_period: Option<f64>,
}

/// How the simulated merchants reach the round engine (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Direct calls into the engine from a rayon pool.
    Inproc,
    /// The real gRPC service on loopback and one real agent per merchant.
    Grpc,
}

/// How rounds are driven (`--mode`); FedBuff's parameters come from their
/// own flags (see [`Mode`](crate::mode::Mode)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// Synchronous rounds.
    Sync,
    /// Buffered asynchronous aggregation.
    Fedbuff,
}

/// Who adds the differential-privacy noise (`--dp-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpModeName {
    /// The coordinator, to the aggregate.
    Central,
    /// The agents, each a share, under secure aggregation.
    Distributed,
}

/// Parses the names `--help` lists, for callers that build [`SimArgs`] in
/// code (tests, scripts).
macro_rules! from_str_by_value_enum {
    ($($t:ty),*) => {$(
        impl std::str::FromStr for $t {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                <Self as ValueEnum>::from_str(s, false)
            }
        }
    )*};
}

from_str_by_value_enum!(Transport, ModeName, DpModeName);

impl SimArgs {
    /// Makes the relative input paths of a `--config` file (data, schema,
    /// train and test tables) relative to `base`, its folder, where they
    /// exist there; the output directory stays the working directory's.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        // A path that exists beside the file is the file's; one that does
        // not stays as written (relative to the working directory, as the
        // examples run from the repository root are).
        let join = |p: &mut PathBuf| {
            let beside = base.join(&*p);
            if p.is_relative() && !base.as_os_str().is_empty() && beside.exists() {
                *p = beside;
            }
        };
        for p in [&mut self.schema, &mut self.train, &mut self.test]
            .into_iter()
            .flatten()
        {
            join(p);
        }
        if let Some(data) = &mut self.data {
            data.resolve_paths(base);
        }
    }
}

/// `--min-support`: a whole number of baskets (not a fraction of them).
fn baskets(text: &str) -> Result<u64, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "`{text}` is not a number of baskets: give the minimum support as a whole number of \
             baskets across the federation, at least 1 (not a fraction: for 1 % of a \
             federation's 20,000 baskets, say, give 200)"
        )
    })
}

/// A key that takes a number or a word (`dp_clip = 1.0` or `"adaptive"`),
/// kept as the text the flag would carry.
fn number_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(String),
    }
    Ok(Some(match Value::deserialize(d)? {
        Value::Number(x) => x.to_string(),
        Value::Text(t) => t,
    }))
}
