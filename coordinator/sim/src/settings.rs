//! The simulator's settings: command-line flags over an optional TOML file
//! over the defaults, validated once into [`Settings`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use fedcart_common::data::partition::Partitioner;
use fedcart_common::federation::strategy::strategy_by_name;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::model::mf::MfHyper;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::data::{DataSpec, TaskChoice};

/// Flags of `fedcart-sim`. Every flag may also be set in the
/// `--config` TOML file (same names, `-` as `_`); flags win over the file.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimArgs {
    /// TOML file with any of the settings below.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Dataset: `movielens:PATH`, `telco:PATH`, `orders:PATH` (an orders export
    /// read through the column mapping below; plain `orders` is the bundled
    /// CDNOW log). Without --data and --task the demo runs MovieLens MF and Telco churn.
    #[arg(long)]
    pub data: Option<String>,
    /// Explicit training file (used instead of splitting --data); needs --test.
    #[arg(long, requires = "test")]
    pub train: Option<PathBuf>,
    /// Explicit held-out file; needs --train.
    #[arg(long, requires = "train")]
    pub test: Option<PathBuf>,
    /// Task: `mf`, `mf-implicit`, `churn-lr`, `churn-mlp[:H1[,H2]]` (hidden widths,
    /// default 16), or `noop:D` (random D-float updates, no training).
    #[arg(long)]
    pub task: Option<String>,
    /// Number of virtual merchants [default: 10].
    #[arg(long)]
    pub merchants: Option<usize>,
    /// Training rounds [default: 20].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Fraction of merchants selected per round [default: 1].
    #[arg(long)]
    pub fraction: Option<f64>,
    /// Local epochs per round [default: 5 for MF, 3 for churn-mlp, 1 otherwise].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Local learning rate [default: 0.01 for MF, 0.05 for churn-lr, 0.001 (Adam) for churn-mlp].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Mini-batch size for churn models [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Latent factors of MF models [default: 32].
    #[arg(long)]
    pub factors: Option<usize>,
    /// Partitioner: `iid`, `dirichlet:ALPHA` (label skew: churn class, or the
    /// customers' item popularity for MF), `zipf:S` (size skew), `natural` (one
    /// merchant per store of an orders export's --merchant-col) [default: iid].
    #[arg(long)]
    pub partition: Option<String>,
    /// Strategy: fedavg, fedprox:MU, fedavgm[:β[:η]], fedadam[:η], fedyogi[:η],
    /// fedadagrad[:η], fedmedian, fedtrimmedavg:β, krum:F, multikrum:F:M [default: fedavg].
    #[arg(long)]
    pub strategy: Option<String>,
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
    /// Probability that a selected merchant drops out of a task [default: 0].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Fraction of merchants that are malicious [default: 0].
    #[arg(long)]
    pub malicious: Option<f64>,
    /// What malicious merchants do to their update: `scale:X` or `signflip` [default: scale:10].
    #[arg(long)]
    pub attack: Option<String>,
    /// Seed of everything random [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads (0 = one per core) [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory for metrics.json, metrics.csv, report.html and the plots.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Differential privacy: L2 clip norm C of each merchant's delta, or
    /// `adaptive` (a private quantile estimate). Turns DP-FedAvg on.
    #[arg(long)]
    pub dp_clip: Option<String>,
    /// DP noise multiplier σ (noise std = σ·C on the sum); or --target-epsilon.
    #[arg(long)]
    pub dp_noise: Option<f64>,
    /// Solve σ up front so that ε after --rounds rounds is at most E.
    #[arg(long)]
    pub target_epsilon: Option<f64>,
    /// δ of the DP guarantee [default: 1e-5].
    #[arg(long)]
    pub dp_delta: Option<f64>,
    /// Who adds the noise: `central` (coordinator) or `distributed` (agents,
    /// under --secagg) [default: central].
    #[arg(long)]
    pub dp_mode: Option<String>,
    /// How merchants reach the engine: `inproc` (direct calls, a rayon pool)
    /// or `grpc` (the real coordinator service on loopback and the real
    /// merchant agent per merchant, for fidelity and overhead) [default: inproc].
    #[arg(long)]
    pub transport: Option<String>,
    /// Column mapping and churn labelling of `--data orders:PATH` (the
    /// `[orders]` table of the config file).
    #[command(flatten)]
    pub orders: super::data::orders::OrdersArgs,
    /// How rounds are driven: `sync` (select, wait for every selected
    /// merchant, commit) or `fedbuff` (buffered asynchronous aggregation:
    /// merchants train concurrently on the version they downloaded; every
    /// --buffer updates, weighted by --staleness, make one version). With
    /// fedbuff, --rounds counts committed versions [default: sync].
    #[arg(long, value_name = "sync|fedbuff")]
    pub mode: Option<String>,
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

/// What malicious merchants send.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Attack {
    /// Their honest update times X.
    Scale(f32),
    /// Their honest update negated.
    SignFlip,
}

impl Attack {
    fn parse(s: &str) -> anyhow::Result<Self> {
        if s == "signflip" {
            return Ok(Self::SignFlip);
        }
        match s.strip_prefix("scale:").map(str::parse::<f32>) {
            Some(Ok(x)) if x.is_finite() => Ok(Self::Scale(x)),
            _ => bail!("unknown attack `{s}` (known: scale:X, signflip)"),
        }
    }

    /// Rewrites an honest update.
    pub fn apply(&self, values: &mut [f32]) {
        let f = match self {
            Self::Scale(x) => *x,
            Self::SignFlip => -1.0,
        };
        values.iter_mut().for_each(|v| *v *= f);
    }
}

/// Validated settings of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// `--data`, if given.
    pub data: Option<String>,
    /// Explicit train/test files.
    pub train_test: Option<(PathBuf, PathBuf)>,
    /// `--task`, if given.
    pub task: Option<String>,
    /// Merchants.
    pub merchants: usize,
    /// Rounds.
    pub rounds: u64,
    /// Selection fraction.
    pub fraction: f64,
    /// Local epochs (None = per-task default).
    pub epochs: Option<usize>,
    /// Local learning rate (None = per-task default).
    pub lr: Option<f32>,
    /// Churn mini-batch size.
    pub batch_size: usize,
    /// MF factors.
    pub factors: usize,
    /// Partitioner.
    #[serde(serialize_with = "debug_str")]
    pub partition: Partitioner,
    /// Strategy name.
    pub strategy: String,
    /// Secure aggregation.
    pub secagg: bool,
    /// Secure-aggregation clip (None = per-task default).
    pub secagg_clip: Option<f32>,
    /// Per-task dropout probability.
    pub dropout: f64,
    /// Malicious fraction.
    pub malicious: f64,
    /// Attack of malicious merchants.
    pub attack: Attack,
    /// Seed.
    pub seed: u64,
    /// Threads (0 = cores).
    #[serde(skip)]
    pub threads: usize,
    /// Output directory.
    #[serde(skip)]
    pub out: Option<PathBuf>,
    /// Differential privacy (population filled in per experiment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp: Option<fedcart_coordinator::config::DpSettings>,
    /// How to read an orders export (flags over the `[orders]` table).
    pub orders: super::data::orders::OrdersArgs,
    /// How merchants reach the engine.
    pub transport: Transport,
    /// Synchronous rounds or FedBuff.
    pub mode: super::fedbuff::Mode,
    /// The virtual clock (merchant speeds and availability).
    pub clock: super::clock::ClockSettings,
}

/// How the simulated merchants reach the round engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Direct calls into the engine from a rayon pool.
    Inproc,
    /// The real gRPC service on loopback and one real agent per merchant.
    Grpc,
}

impl Transport {
    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "inproc" => Ok(Self::Inproc),
            "grpc" => Ok(Self::Grpc),
            other => bail!("unknown transport `{other}` (known: inproc, grpc)"),
        }
    }
}

fn debug_str<S: serde::Serializer, T: std::fmt::Debug>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:?}"))
}

impl Settings {
    /// Merges flags over the TOML file over the defaults and validates.
    pub fn from_args(args: SimArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<SimArgs>(&text)
                    .with_context(|| format!("parsing {}", p.display()))?
            }
            None => SimArgs::default(),
        };
        macro_rules! pick {
            ($f:ident, $d:expr) => {
                args.$f.clone().or(file.$f.clone()).unwrap_or($d)
            };
        }
        let clock = super::clock::ClockSettings::from_args(&args, &file)?;
        let mode = super::fedbuff::Mode::from_args(
            &args,
            &file,
            pick!(merchants, 10),
            pick!(fraction, 1.0),
        )?;
        let train_test = match (args.train.or(file.train), args.test.or(file.test)) {
            (Some(a), Some(b)) => Some((a, b)),
            (None, None) => None,
            _ => bail!("--train and --test go together"),
        };
        let secagg = if args.no_secagg {
            false
        } else if args.secagg || file.secagg {
            true
        } else {
            // The no-argument demo shows the product as merchants get it:
            // secure aggregation on (unless the strategy needs every update).
            let demo = args.task.is_none()
                && file.task.is_none()
                && args.data.is_none()
                && file.data.is_none()
                && train_test.is_none();
            let strategy = args
                .strategy
                .as_deref()
                .or(file.strategy.as_deref())
                .unwrap_or("fedavg");
            demo && strategy_by_name(strategy).is_ok_and(|s| !s.needs_individual_updates())
        };
        let s = Self {
            data: args.data.or(file.data),
            train_test,
            task: args.task.or(file.task),
            merchants: pick!(merchants, 10),
            rounds: pick!(rounds, 20),
            fraction: pick!(fraction, 1.0),
            epochs: args.epochs.or(file.epochs),
            lr: args.lr.or(file.lr),
            batch_size: pick!(batch_size, 32),
            factors: pick!(factors, 32),
            partition: pick!(partition, "iid".into()).parse()?,
            strategy: pick!(strategy, "fedavg".into()),
            secagg,
            secagg_clip: args.secagg_clip.or(file.secagg_clip),
            dropout: pick!(dropout, 0.0),
            malicious: pick!(malicious, 0.0),
            attack: Attack::parse(&pick!(attack, "scale:10".into()))?,
            seed: pick!(seed, 42),
            threads: pick!(threads, 0),
            out: args.out.or(file.out),
            dp: super::dp::settings(
                args.dp_clip.or(file.dp_clip),
                args.dp_noise.or(file.dp_noise),
                args.target_epsilon.or(file.target_epsilon),
                args.dp_delta.or(file.dp_delta),
                args.dp_mode.or(file.dp_mode),
            )?,
            orders: args.orders.or(file.orders),
            transport: Transport::parse(&pick!(transport, "inproc".into()))?,
            mode,
            clock,
        };
        if s.merchants == 0 || s.rounds == 0 {
            bail!("--merchants and --rounds must be ≥ 1");
        }
        if !(s.fraction > 0.0 && s.fraction <= 1.0) {
            bail!("--fraction {} is not in (0, 1]", s.fraction);
        }
        for (name, v) in [("--dropout", s.dropout), ("--malicious", s.malicious)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} {v} is not in [0, 1)");
            }
        }
        if s.transport == Transport::Grpc {
            super::grpc::check(&s)?;
        }
        if let Some(lr) = s.lr
            && !(lr.is_finite() && lr > 0.0)
        {
            bail!("--lr {lr} must be finite and positive");
        }
        fedcart_common::federation::strategy::strategy_by_name(&s.strategy)
            .map_err(anyhow::Error::msg)?;
        if let Some(dp) = &s.dp
            && dp.mode == fedcart_coordinator::config::DpMode::Distributed
            && !s.secagg
        {
            bail!("--dp-mode distributed adds the noise under secure aggregation; add --secagg");
        }
        s.experiments()?;
        Ok(s)
    }

    /// The (task, data) pairs to run: one, or the two of the demo.
    pub fn experiments(&self) -> anyhow::Result<Vec<(TaskChoice, DataSpec)>> {
        let task = self.task.as_deref().map(TaskChoice::parse).transpose()?;
        let data = match self.data.as_deref() {
            Some(d) => Some(DataSpec::parse(d)?.with_orders(&self.orders)?),
            None => None,
        };
        Ok(match (task, data) {
            (Some(t), Some(d)) => vec![(t, d)],
            (Some(t), None) => vec![(t, t.default_data())],
            (None, Some(d)) => {
                let t = match d {
                    DataSpec::Telco(_) | DataSpec::Orders(_) => TaskChoice::ChurnLr,
                    _ => TaskChoice::Mf,
                };
                vec![(t, d)]
            }
            (None, None) => vec![
                (TaskChoice::Mf, TaskChoice::Mf.default_data()),
                (TaskChoice::ChurnLr, TaskChoice::ChurnLr.default_data()),
            ],
        })
    }

    /// The secure-aggregation clip for `task`.
    pub fn secagg_clip(&self, task: TaskChoice) -> f32 {
        self.secagg_clip.unwrap_or(match task {
            TaskChoice::Noop(_) => 1.0,
            _ => 1e5,
        })
    }

    /// The explicit train/test files, if given.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        self.train_test
            .as_ref()
            .map(|(a, b)| (a.as_path(), b.as_path()))
    }

    /// Local SGD parameters of a churn task.
    pub fn sgd(&self, task: TaskChoice) -> SgdParams {
        // The MLP trains with Adam, which wants a far smaller step than SGD.
        let mlp = matches!(task, TaskChoice::ChurnMlp { .. });
        SgdParams {
            epochs: self.epochs.unwrap_or(if mlp { 3 } else { 1 }),
            batch_size: self.batch_size,
            learning_rate: self.lr.unwrap_or(if mlp { 0.001 } else { 0.05 }),
            ..Default::default()
        }
    }

    /// MF hyper-parameters: the tuned ones of BENCHMARKS.md (k = 32, lr 0.01,
    /// reg 0.1/0.05, 5 local epochs) unless overridden.
    pub fn mf_hyper(&self, task: TaskChoice) -> MfHyper {
        let implicit = task == TaskChoice::MfImplicit;
        let lr = self.lr.unwrap_or(if implicit { 0.05 } else { 0.01 });
        MfHyper {
            learning_rate: lr,
            bias_learning_rate: lr,
            reg_factors: if implicit { 0.01 } else { 0.1 },
            reg_bias: if implicit { 0.01 } else { 0.05 },
            epochs: self.epochs.unwrap_or(5),
            negatives: 4,
            ..Default::default()
        }
    }

    /// The malicious merchants (indices), chosen by seed.
    pub fn malicious_set(&self, n: usize) -> BTreeSet<usize> {
        let count = (self.malicious * n as f64).round() as usize;
        let mut all: Vec<usize> = (0..n).collect();
        all.shuffle(&mut fedcart_common::seed::rng(self.seed, &["malicious"]));
        all.into_iter().take(count).collect()
    }
}
