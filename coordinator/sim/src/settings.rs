//! The simulator's settings: command-line flags over an optional TOML file
//! over the defaults, validated once into [`Settings`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedcart_common::data::partition::Partitioner;
use fedcart_common::federation::strategy::strategy_by_name;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::model::mf::MfHyper;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::args::SimArgs;
use super::data::{DataSpec, TaskChoice};

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
    pub mode: super::mode::Mode,
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
        let mode =
            super::mode::Mode::from_args(&args, &file, pick!(merchants, 10), pick!(fraction, 1.0))?;
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
            check_grpc(&s)?;
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

/// Refuses the settings the gRPC transport cannot honour, naming the flag.
fn check_grpc(s: &Settings) -> anyhow::Result<()> {
    if s.mode != super::mode::Mode::Sync {
        bail!(
            "--mode fedbuff is not available with --transport grpc: the service runs \
             synchronous rounds only (the engine accepts updates for the open task); \
             run FedBuff with --transport inproc"
        );
    }
    if s.malicious > 0.0 {
        bail!(
            "--malicious is not available with --transport grpc: the real agent only sends \
             its honest update; study attacks with --transport inproc"
        );
    }
    Ok(())
}
