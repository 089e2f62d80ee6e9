//! The simulator's settings: command-line flags over an optional TOML file
//! over the defaults, validated once into [`Settings`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedcart_common::data::partition::Partitioner;
use fedcart_common::federation::strategy::StrategySpec;
use fedcart_common::model::lr::SgdParams;
use fedcart_common::model::mf::{IMPLICIT_FACTORS, MF_DP_FACTORS, MF_FACTORS, MfHyper};
use rand::seq::SliceRandom;
use serde::Serialize;

use super::args::{SimArgs, Transport};
use super::data::{DataSpec, TaskChoice};
use fedcart_common::data::orders::Delimiter;

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
    /// `--data`, if given, with an orders export's mapping resolved.
    #[serde(serialize_with = "written_data")]
    pub data: Option<DataSpec>,
    /// Explicit train/test files.
    pub train_test: Option<(PathBuf, PathBuf)>,
    /// `--task`, if given.
    #[serde(serialize_with = "task_name")]
    pub task: Option<TaskChoice>,
    /// Merchants.
    pub merchants: usize,
    /// Rounds.
    pub rounds: u64,
    /// Selection fraction.
    pub fraction: f64,
    /// Local epochs (None = per-task default).
    pub epochs: Option<usize>,
    /// Early-stopping patience (None = per-task default, 0 = off).
    pub patience: Option<u64>,
    /// Hyper-parameters of `--task churn-gbdt`.
    pub gbdt: fedcart_common::model::gbdt::GbdtParams,
    /// The churn models' validation share (`--valid-fraction`).
    pub valid_fraction: f64,
    /// Local learning rate (None = per-task default).
    pub lr: Option<f32>,
    /// Churn mini-batch size.
    pub batch_size: usize,
    /// MF factors (None = per-task default, [`Settings::factors`]).
    pub factors: Option<usize>,
    /// L2 penalty on MF factors (None = per-task default; the bias penalty
    /// keeps its default ratio to it).
    pub reg: Option<f32>,
    /// BPR negatives per purchase (None = the default, 4).
    pub negatives: Option<usize>,
    /// `--search ROUNDS`: the hyper-parameter search's budget in training
    /// rounds (`search.rs`), when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<u64>,
    /// Configurations the search starts from (reported by the search
    /// section, which lists them all).
    #[serde(skip)]
    pub search_candidates: usize,
    /// Partitioner.
    #[serde(serialize_with = "debug_str")]
    pub partition: Partitioner,
    /// The server strategy (reported by name).
    pub strategy: StrategySpec,
    /// Secure aggregation.
    pub secagg: bool,
    /// Secure-aggregation clip (None = per-task default).
    pub secagg_clip: Option<f32>,
    /// Secure-aggregation graph degree (None = the per-round default).
    pub secagg_neighbours: Option<usize>,
    /// Where BPR draws negatives from (`--negatives-from`).
    pub negatives_from: fedcart_common::model::mf::NegativePool,
    /// iALS confidence scale (`--alpha`; None = default).
    pub alpha: Option<f32>,
    /// iALS proximal weight (`--proximal`; None = default).
    pub proximal: Option<f32>,
    /// Explicit MF serves users solved on validation too (`--refit-users`).
    pub refit_users: bool,
    /// Personalisation's local epochs (`--personalise`; None or 0 = off).
    pub personalise: Option<usize>,
    /// Personalisation's proximal weight (`--personalise-proximal`; None =
    /// the task's default).
    pub personalise_proximal: Option<f32>,
    /// Wire form of models and updates (`--traffic`).
    pub traffic: crate::traffic::TrafficMode,
    /// Precision of downloaded factor rows (`--download-precision`).
    pub download_precision: fedcart_common::federation::sparse::RowPrecision,
    /// Per-task dropout probability.
    pub dropout: f64,
    /// Attempts of one round before the run stops (`run.max_attempts`).
    pub max_attempts: u32,
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
    /// Draw progress bars on stderr (set by the command: a terminal and no
    /// `-q`); never in the reports.
    #[serde(skip)]
    pub progress: bool,
}

fn debug_str<S: serde::Serializer, T: std::fmt::Debug>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:?}"))
}

fn written_data<S: serde::Serializer>(v: &Option<DataSpec>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_some(&d.written()),
        None => s.serialize_none(),
    }
}

fn task_name<S: serde::Serializer>(v: &Option<TaskChoice>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_some(&t.name()),
        None => s.serialize_none(),
    }
}

/// Names a setting in an error the way the user wrote it: the flag, or the
/// key of the `--config` file when the value came from there.
struct Names<'a> {
    /// The `--config` file, if any.
    file: Option<&'a Path>,
}

impl Names<'_> {
    /// `--flag`, or `` `flag` in FILE `` when `from_flag` is false and a file was read.
    fn of(&self, flag: &str, from_flag: bool) -> String {
        match self.file {
            Some(f) if !from_flag => format!(
                "`{}` in {}",
                flag.trim_start_matches("--").replace('-', "_"),
                f.display()
            ),
            _ => flag.to_string(),
        }
    }
}

/// Applies `--k` and `--min-support` (with the flag or key they came from)
/// to the task they belong to; refuses them with another task.
fn with_task_flags(
    task: Option<TaskChoice>,
    k: Option<(usize, String)>,
    min_support: Option<(u64, String)>,
) -> anyhow::Result<Option<TaskChoice>> {
    let mut task = task;
    if let Some((k, name)) = k {
        match task {
            Some(TaskChoice::Segments(_)) if (1..=256).contains(&k) => {
                task = Some(TaskChoice::Segments(Some(k)))
            }
            Some(TaskChoice::Segments(_)) => bail!("{name}: give k in 1..=256, not {k}"),
            _ => bail!("{name} sets the segments of --task segments; give --task segments"),
        }
    }
    if let Some((m, name)) = min_support {
        match task {
            Some(TaskChoice::Rules(_)) if m >= 1 => task = Some(TaskChoice::Rules(m)),
            Some(TaskChoice::Rules(_)) => {
                bail!("{name}: the minimum support is a number of baskets, at least 1")
            }
            _ => bail!("{name} sets the minimum support of --task rules; give --task rules"),
        }
    }
    Ok(task)
}

/// Where a key the `--config` file refuses belongs, for the keys a user
/// writes from the flags' names: the orders column flags go under
/// `[orders]` by their own names, and the output flags are the command
/// line's only.
fn config_key_hint(error: &str) -> Option<String> {
    let key = error.split("unknown field `").nth(1)?.split('`').next()?;
    let orders = |name: &str| {
        format!(
            "hint: the orders flags go under an `[orders]` table, by their own names: \
             `--{}` is `[orders]` `{name} = ...`",
            key.replace('_', "-")
        )
    };
    match key {
        "orders_mapping" => Some(orders("mapping")),
        k if k.ends_with("_col") => Some(orders(k.trim_end_matches("_col"))),
        "cutoff" | "churn_window_days" | "timestamp_format" | "delimiter" | "decimal"
        | "amount_is" | "on_bad_row" | "hash_items" => Some(orders(key)),
        "format" | "quiet" | "verbose" | "log_json" | "config" => Some(format!(
            "hint: `--{}` is a command-line flag only, not a key of the configuration file",
            key.replace('_', "-")
        )),
        _ => None,
    }
}

impl Settings {
    /// Merges flags over the TOML file over the defaults and validates every
    /// rule in one place; errors name the flag or config key.
    pub fn from_args(args: SimArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                // As the other configuration files: types in words, a
                // misspelt key or an unquoted date named.
                let mut file = toml::from_str::<SimArgs>(&text).map_err(|e| {
                    let raw = e.to_string();
                    let mut explained = fedcart_common::config_errors::explain(&raw, &text);
                    if let Some(hint) = config_key_hint(&raw) {
                        explained.push_str(&format!("\n{hint}"));
                    }
                    anyhow::anyhow!(explained).context(format!("parsing {}", p.display()))
                })?;
                // As the merchant's and the coordinator's files: relative
                // paths are the file's folder's, not the working directory's.
                let base = p.parent().unwrap_or(Path::new(""));
                file.resolve_paths(base);
                file
            }
            None => SimArgs::default(),
        };
        let names = Names {
            file: args.config.as_deref(),
        };
        macro_rules! pick {
            ($f:ident, $d:expr) => {
                args.$f.clone().or(file.$f.clone()).unwrap_or($d)
            };
        }
        // The name of the flag or key a value came from, for errors.
        macro_rules! name {
            ($f:ident, $flag:expr) => {
                names.of($flag, args.$f.is_some())
            };
        }
        let clock = super::clock::ClockSettings::from_args(&args, &file)?;
        let mode =
            super::mode::Mode::from_args(&args, &file, pick!(merchants, 10), pick!(fraction, 1.0))?;
        let train_test = match (
            args.train.clone().or(file.train.clone()),
            args.test.clone().or(file.test.clone()),
        ) {
            (Some(a), Some(b)) => Some((a, b)),
            (None, None) => None,
            _ => bail!("--train and --test go together"),
        };
        if let Some((train, test)) = &train_test {
            let same = train == test
                || matches!(
                    (std::fs::canonicalize(train), std::fs::canonicalize(test)),
                    (Ok(a), Ok(b)) if a == b
                );
            if same {
                bail!(
                    "--train and --test name the same file ({}): every test figure would be \
                     measured on rows the model trained on; give a held-out file as --test",
                    test.display()
                );
            }
        }
        let strategy = pick!(strategy, StrategySpec::FedAvg);
        let task = with_task_flags(
            args.task.or(file.task),
            args.k.or(file.k).map(|k| (k, name!(k, "--k"))),
            args.min_support
                .or(file.min_support)
                .map(|m| (m, name!(min_support, "--min-support"))),
        )?;
        let orders = args.orders.clone().or(file.orders.clone());
        let schema = args.schema.clone().or(file.schema.clone());
        let data = match args.data.clone().or(file.data.clone()) {
            // The orders settings' errors name their own flag or `orders:PATH`.
            Some(d) => Some(d.with_orders(&orders)?.with_schema(
                schema.as_deref(),
                &name!(schema, "--schema"),
                orders.delimiter.and_then(Delimiter::byte).unwrap_or(b','),
            )?),
            // Segments and rules default to the bundled orders (CDNOW).
            None => match task {
                Some(t @ (TaskChoice::Segments(_) | TaskChoice::Rules(_))) => {
                    Some(t.default_data().with_orders(&orders)?)
                }
                _ => None,
            },
        };
        if !matches!(data, Some(DataSpec::Orders(_))) {
            // A config file's [orders] table is refused only when the file's
            // own data is not an export: with --data on the command line it
            // may be a base shared with runs on other data.
            let given = match args.orders.first_orders_only() {
                Some((flag, _)) => Some(flag.to_string()),
                None if args.data.is_none() => file
                    .orders
                    .first_orders_only()
                    .map(|(_, key)| format!("`{key}` in the config's [orders] table")),
                None => None,
            };
            if let Some(given) = given {
                bail!(
                    "{given} reads an orders export, but the data is not one: give --data \
                     orders:PATH (or `data = \"orders:PATH\"` in the config file)"
                );
            }
        }
        // Read by ratings and customer-table data only: an orders export
        // ignored them while the report named them as what it read.
        if train_test.is_some()
            && let Some(d @ DataSpec::Orders(_)) = &data
        {
            bail!(
                "{} and {} are not read with an orders export ({}): the export is split inside, \
                 per merchant (the recommender holds out each customer's latest item, churn \
                 labels come from the cutoff); give the whole export as --data orders:PATH and \
                 leave them out",
                name!(train, "--train"),
                name!(test, "--test"),
                d.name()
            );
        }
        if schema.is_some() && !matches!(data, Some(DataSpec::Csv(_))) {
            bail!("{} applies to --data csv only", name!(schema, "--schema"));
        }
        if orders.delimiter == Some(Delimiter::Whitespace)
            && !matches!(data, Some(DataSpec::Orders(_)))
        {
            bail!(
                "{}: whitespace separates only orders exports; a ratings file or customer \
                 table takes comma, tab, semicolon or pipe",
                names.of("--delimiter", args.orders.delimiter.is_some())
            );
        }
        let secagg = if args.no_secagg {
            false
        } else if args.secagg || file.secagg {
            true
        } else {
            // The no-argument demo shows the product as merchants get it:
            // secure aggregation on (unless the strategy needs every update).
            let demo = task.is_none() && data.is_none() && train_test.is_none();
            demo && strategy.require_streaming("secure aggregation").is_ok()
        };
        let valid_fraction = pick!(
            valid_fraction,
            fedcart_common::model::churn::DEFAULT_VALID_FRACTION
        );
        if !(0.0..0.5).contains(&valid_fraction) {
            bail!(
                "{} {valid_fraction} is not in [0, 0.5): the share of each merchant's training \
                 rows kept aside for validation (0 keeps none)",
                name!(valid_fraction, "--valid-fraction")
            );
        }
        let threads = pick!(threads, 0);
        if threads > MAX_THREADS {
            // Each is an OS thread: 100,000 of them never started the run.
            bail!(
                "{} {threads} is more worker threads than a simulation uses: give at most \
                 {MAX_THREADS} (0 = one per core)",
                name!(threads, "--threads")
            );
        }
        let gbdt = {
            let d = fedcart_common::model::gbdt::GbdtParams::default();
            let p = fedcart_common::model::gbdt::GbdtParams {
                trees: pick!(trees, d.trees),
                max_depth: pick!(max_depth, d.max_depth),
                min_child_weight: pick!(min_child_weight, d.min_child_weight),
                l2: pick!(l2, d.l2),
                valid_fraction,
                learning_rate: match task {
                    Some(TaskChoice::ChurnGbdt) => pick!(lr, d.learning_rate),
                    _ => d.learning_rate,
                },
                ..d
            };
            p.check().map_err(|e| {
                anyhow::anyhow!("{e} (--trees, --max-depth, --lr, --min-child-weight, --l2)")
            })?;
            p
        };
        let s = Self {
            data,
            train_test,
            task,
            merchants: pick!(merchants, 10),
            rounds: args.rounds.or(file.rounds).unwrap_or(match task {
                // Every tree's levels after the sketch round.
                Some(TaskChoice::ChurnGbdt) => 1 + gbdt.trees as u64 * gbdt.max_depth as u64,
                _ => 20,
            }),
            valid_fraction,
            gbdt,
            fraction: pick!(fraction, 1.0),
            epochs: args.epochs.or(file.epochs),
            patience: args.patience.or(file.patience),
            lr: args.lr.or(file.lr),
            batch_size: pick!(batch_size, 32),
            factors: args.factors.or(file.factors),
            reg: args.reg.or(file.reg),
            negatives: args.negatives.or(file.negatives),
            search: args.search.or(file.search),
            search_candidates: pick!(search_candidates, DEFAULT_SEARCH_CANDIDATES),
            partition: pick!(partition, "iid".into())
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", name!(partition, "--partition")))?,
            strategy,
            secagg,
            secagg_clip: args.secagg_clip.or(file.secagg_clip),
            secagg_neighbours: args.secagg_neighbours.or(file.secagg_neighbours),
            negatives_from: pick!(negatives_from, Default::default()),
            alpha: args.alpha.or(file.alpha),
            proximal: args.proximal.or(file.proximal),
            refit_users: args.refit_users || file.refit_users,
            personalise: args.personalise.or(file.personalise),
            personalise_proximal: args.personalise_proximal.or(file.personalise_proximal),
            traffic: pick!(traffic, Default::default()),
            download_precision: pick!(download_precision, Default::default()),
            dropout: pick!(dropout, 0.0),
            max_attempts: pick!(
                max_attempts,
                fedcart_coordinator::config::DEFAULT_MAX_ATTEMPTS
            ),
            malicious: pick!(malicious, 0.0),
            attack: Attack::parse(&pick!(attack, "scale:10".into()))
                .map_err(|e| anyhow::anyhow!("{}: {e}", name!(attack, "--attack")))?,
            seed: pick!(seed, 42),
            threads,
            out: args.out.clone().or(file.out.clone()),
            progress: false,
            dp: super::dp::settings(
                args.dp_clip.clone().or(file.dp_clip.clone()),
                args.dp_noise.or(file.dp_noise),
                args.target_epsilon.or(file.target_epsilon),
                args.dp_delta.or(file.dp_delta),
                args.dp_mode.or(file.dp_mode),
                |flag| match flag {
                    "--dp-clip" => name!(dp_clip, flag),
                    "--dp-noise" => name!(dp_noise, flag),
                    "--target-epsilon" => name!(target_epsilon, flag),
                    "--dp-delta" => name!(dp_delta, flag),
                    _ => flag.to_string(),
                },
            )?,
            orders,
            transport: pick!(transport, Transport::Inproc),
            mode,
            clock,
        };
        if s.merchants == 0 {
            bail!("{} must be ≥ 1", name!(merchants, "--merchants"));
        }
        if s.partition == Partitioner::Natural
            && (args.merchants.is_some() || file.merchants.is_some())
        {
            tracing::warn!(
                "{} {} is ignored with --partition natural: each store of the export is one \
                 merchant",
                name!(merchants, "--merchants"),
                s.merchants
            );
        }
        // The flag only: a mapping file may be shared with natural runs.
        if args.orders.merchant.is_some() && s.partition != Partitioner::Natural {
            bail!(
                "--merchant-col names the store of each order, which only --partition natural \
                 reads (one merchant per store); with {} {} the customers are dealt into {} \
                 merchants whatever their store: give --partition natural, or leave \
                 --merchant-col out",
                name!(partition, "--partition"),
                pick!(partition, String::from("iid")),
                s.merchants
            );
        }
        if s.rounds == 0 {
            bail!("{} must be ≥ 1", name!(rounds, "--rounds"));
        }
        // FedBuff folds buffered gradient updates; an analysis builds each
        // version from the exact sums of one synchronous round (a tree
        // level, a k-means step, an itemset level) and cannot take them.
        if matches!(s.mode, super::mode::Mode::FedBuff(_))
            && matches!(
                s.task,
                Some(TaskChoice::ChurnGbdt | TaskChoice::Segments(_) | TaskChoice::Rules(_))
            )
        {
            bail!(
                "--mode fedbuff is for models trained from updates (mf, mf-implicit, churn-lr, \
                 churn-mlp, noop): `{}` builds each version from the exact sums of one \
                 synchronous round; leave --mode out",
                s.task.map(TaskChoice::name).unwrap_or_default()
            );
        }
        // FedBuff's driver runs the churn models' feature-statistics step in
        // the clear only: refused here with the flags, not after loading.
        if matches!(s.mode, super::mode::Mode::FedBuff(_))
            && s.secagg
            && matches!(
                s.task,
                Some(TaskChoice::ChurnLr | TaskChoice::ChurnMlp { .. })
            )
        {
            bail!(
                "--mode fedbuff with --secagg: FedBuff runs {}'s feature-statistics step only \
                 without secure aggregation; leave out --secagg, or run it synchronously (leave \
                 out --mode)",
                s.task.map(TaskChoice::name).unwrap_or_default()
            );
        }
        let first_tree = 1 + s.gbdt.max_depth as u64;
        if matches!(s.task, Some(TaskChoice::ChurnGbdt)) && s.rounds < first_tree {
            bail!(
                "{} {} ends before the first tree is grown: churn-gbdt spends one round on the \
                 feature sketch, then one per level of each tree ({} {}); give at least \
                 {first_tree}, or leave it out and set the number of trees with {} (the rounds \
                 are then counted for you)",
                name!(rounds, "--rounds"),
                s.rounds,
                name!(max_depth, "--max-depth"),
                s.gbdt.max_depth,
                name!(trees, "--trees"),
            );
        }
        if !(s.fraction > 0.0 && s.fraction <= 1.0) {
            bail!(
                "{} {} is not in (0, 1]",
                name!(fraction, "--fraction"),
                s.fraction
            );
        }
        if s.max_attempts == 0 {
            bail!("{} must be ≥ 1", name!(max_attempts, "--max-attempts"));
        }
        for (name, v) in [
            (name!(dropout, "--dropout"), s.dropout),
            (name!(malicious, "--malicious"), s.malicious),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} {v} is not in [0, 1)");
            }
        }
        if let Some(mu) = s.personalise_proximal
            && !(mu.is_finite() && mu >= 0.0)
        {
            bail!(
                "{} {mu} must be finite and >= 0",
                name!(personalise_proximal, "--personalise-proximal")
            );
        }
        if s.personalise.is_some_and(|e| e > 0) && !s.task.is_some_and(TaskChoice::is_mf) {
            bail!(
                "{} fine-tunes a recommender: give --task mf, mf-implicit or mf-ials",
                name!(personalise, "--personalise")
            );
        }
        // Flags of one model family given with another task would be
        // ignored without a word. Only flags: a config file may be a base
        // shared by several tasks, its other families' keys unused.
        if let Some(task) = s.task {
            let gbdt = task == TaskChoice::ChurnGbdt;
            for (set, flag, what, applies) in [
                (args.trees.is_some(), "--trees", "boosted trees", gbdt),
                (
                    args.max_depth.is_some(),
                    "--max-depth",
                    "boosted trees",
                    gbdt,
                ),
                (
                    args.min_child_weight.is_some(),
                    "--min-child-weight",
                    "boosted trees",
                    gbdt,
                ),
                (args.l2.is_some(), "--l2", "boosted trees", gbdt),
                (
                    args.valid_fraction.is_some(),
                    "--valid-fraction",
                    "churn models",
                    task.is_churn(),
                ),
                (
                    args.factors.is_some(),
                    "--factors",
                    "matrix factorisation",
                    task.is_mf(),
                ),
                (
                    args.reg.is_some(),
                    "--reg",
                    "matrix factorisation",
                    task.is_mf(),
                ),
                (
                    args.negatives.is_some(),
                    "--negatives",
                    "BPR's negative samples (mf-implicit)",
                    task == TaskChoice::MfImplicit,
                ),
                (
                    args.negatives_from.is_some(),
                    "--negatives-from",
                    "BPR's negative samples (mf-implicit)",
                    task == TaskChoice::MfImplicit,
                ),
                (
                    args.alpha.is_some(),
                    "--alpha",
                    "iALS's confidence scale (mf-ials)",
                    task == TaskChoice::MfIals,
                ),
                (
                    args.proximal.is_some(),
                    "--proximal",
                    "iALS's proximal weight (mf-ials)",
                    task == TaskChoice::MfIals,
                ),
                (
                    args.lr.is_some(),
                    "--lr",
                    "a gradient step (iALS, k-means and rules solve in closed form)",
                    !matches!(
                        task,
                        TaskChoice::MfIals
                            | TaskChoice::Noop(_)
                            | TaskChoice::Segments(_)
                            | TaskChoice::Rules(_)
                    ),
                ),
                (
                    args.batch_size.is_some(),
                    "--batch-size",
                    "the mini-batch of churn-lr and churn-mlp",
                    matches!(task, TaskChoice::ChurnLr | TaskChoice::ChurnMlp { .. }),
                ),
                (
                    args.epochs.is_some(),
                    "--epochs",
                    "local epochs (boosted trees grow one level a round; k-means and rules \
                     take one pass)",
                    !matches!(
                        task,
                        TaskChoice::ChurnGbdt | TaskChoice::Segments(_) | TaskChoice::Rules(_)
                    ),
                ),
                (
                    args.traffic == Some(crate::traffic::TrafficMode::Rows),
                    "--traffic rows",
                    "row-sparse transfers of a recommender's item rows",
                    task.is_mf(),
                ),
                (
                    args.orders.hash_items.is_some(),
                    "--hash-items",
                    "the hashed item rows of a recommender",
                    task.is_mf(),
                ),
                (
                    args.orders.rating.is_some(),
                    "--rating-col",
                    "the explicit ratings of `mf`",
                    task == TaskChoice::Mf,
                ),
                (
                    args.orders.churn_window_days.is_some(),
                    "--churn-window-days",
                    "the churn label and the default cutoff of customer features",
                    task.is_churn() || matches!(task, TaskChoice::Segments(_)),
                ),
            ] {
                if set && !applies {
                    bail!(
                        "{flag} sets {what}, not --task {}: leave it out, or give a task it sets",
                        task.name()
                    );
                }
            }
        }
        // FedProx's proximal term lives in churn-lr's and churn-mlp's local
        // training; elsewhere the run would be FedAvg reported as FedProx.
        if let (StrategySpec::FedProx { .. }, Some(task)) = (&s.strategy, s.task)
            && !matches!(task, TaskChoice::ChurnLr | TaskChoice::ChurnMlp { .. })
        {
            bail!(
                "{} {}: FedProx's proximal term is added by churn-lr and churn-mlp local \
                 training; --task {} has none, so the run would be plain FedAvg: leave \
                 --strategy out{}",
                name!(strategy, "--strategy"),
                s.strategy,
                task.name(),
                if task == TaskChoice::MfIals {
                    " (iALS's own proximal pull is --proximal)"
                } else {
                    ""
                }
            );
        }
        // The rules analysis counts every merchant's baskets at every level,
        // exactly: no sampling, no dropouts, no server strategy, no attack.
        if matches!(s.task, Some(TaskChoice::Rules(_))) {
            let ignored = [
                (
                    s.strategy != StrategySpec::FedAvg,
                    name!(strategy, "--strategy"),
                ),
                (s.fraction != 1.0, name!(fraction, "--fraction")),
                (s.dropout != 0.0, name!(dropout, "--dropout")),
                (s.malicious != 0.0, name!(malicious, "--malicious")),
            ];
            if let Some((_, flag)) = ignored.into_iter().find(|(set, _)| *set) {
                bail!(
                    "{flag}: the rules analysis counts every merchant's baskets at every level, \
                     exactly (no sampling, dropouts, server strategy or attack); leave it out"
                );
            }
        }
        // The rules run builds its own run configuration (no noise): the
        // DP flags would be ignored while the report shows them.
        if matches!(s.task, Some(TaskChoice::Rules(_))) && s.dp.is_some() {
            bail!(
                "the rules analysis sums exact basket counts; differential privacy is not \
                 supported for it: leave out --dp-clip, --dp-noise and --target-epsilon"
            );
        }
        if s.refit_users && s.task.is_some_and(|t| t != TaskChoice::Mf) {
            bail!(
                "{} solves the users of explicit MF: give --task mf (iALS always serves \
                 users refitted on validation; BPR has no closed-form user solve)",
                names.of("--refit-users", args.refit_users)
            );
        }
        if s.transport == Transport::Grpc {
            check_grpc(&s)?;
            // The virtual clock's speeds shape in-process runs only; given
            // explicitly they would be ignored (their defaults are not).
            for (given, flag) in [
                (
                    args.speed_sigma.or(file.speed_sigma).is_some(),
                    "--speed-sigma",
                ),
                (
                    args.example_seconds.or(file.example_seconds).is_some(),
                    "--example-seconds",
                ),
            ] {
                if given {
                    bail!(
                        "{flag} is not available with --transport grpc: real agents train at the \
                         machine's speed, and the virtual clock runs in-process only; study \
                         merchant speeds with --transport inproc"
                    );
                }
            }
        }
        if let Some(lr) = s.lr
            && !(lr.is_finite() && lr > 0.0)
        {
            bail!("{} {lr} must be finite and positive", name!(lr, "--lr"));
        }
        if let Some(reg) = s.reg
            && !(reg.is_finite() && reg >= 0.0)
        {
            bail!("{} {reg} must be finite and ≥ 0", name!(reg, "--reg"));
        }
        if s.negatives == Some(0) {
            bail!("{} must be ≥ 1", name!(negatives, "--negatives"));
        }
        if let Some(budget) = s.search {
            let flag = name!(search, "--search");
            let candidates = name!(search_candidates, "--search-candidates");
            if !matches!(
                s.task,
                Some(TaskChoice::Mf | TaskChoice::MfImplicit | TaskChoice::MfIals)
            ) {
                bail!(
                    "{flag} tunes matrix factorisation: give --task mf, --task mf-implicit or \
                     --task mf-ials"
                );
            }
            if s.dp.is_some() {
                bail!(
                    "{flag} is refused with differential privacy: every trial releases models \
                     that ε would not account for; search without DP, then run the chosen \
                     settings with it (the report names them)"
                );
            }
            if s.search_candidates < 2 {
                bail!("{candidates} must be ≥ 2 (the given settings and at least one other)");
            }
            if super::halving::schedule(budget, s.search_candidates).is_none() {
                bail!(
                    "{flag} {budget} cannot give each of the {} candidates a round in the first \
                     of {} rungs: give at least {} rounds, or fewer {candidates}",
                    s.search_candidates,
                    super::halving::rungs(s.search_candidates),
                    super::halving::min_budget(s.search_candidates)
                );
            }
        }
        // Protections that hide individual updates need a streaming strategy.
        if s.secagg {
            s.strategy
                .require_streaming("secure aggregation")
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {e}; or pass --no-secagg",
                        name!(strategy, "--strategy")
                    )
                })?;
        }
        // FedBuff's driver moves whole vectors: row-sparse traffic would be
        // reported as dense, unannounced.
        if s.traffic == crate::traffic::TrafficMode::Rows
            && matches!(s.mode, super::mode::Mode::FedBuff(_))
        {
            bail!(
                "{} is measured for synchronous rounds; --mode fedbuff moves whole vectors: \
                 leave one of them out",
                name!(traffic, "--traffic rows")
            );
        }
        if s.download_precision != fedcart_common::federation::sparse::RowPrecision::F32
            && s.traffic != crate::traffic::TrafficMode::Rows
        {
            bail!(
                "{} applies to row-sparse downloads; add --traffic rows",
                name!(download_precision, "--download-precision")
            );
        }
        // A flag that only shapes another one's feature is refused without
        // it, as --secagg-neighbours without --secagg is, rather than ignored.
        let given = |flag: bool, file: bool| flag || file;
        for (set, needs, flag, missing) in [
            (
                given(args.secagg_clip.is_some(), file.secagg_clip.is_some()),
                s.secagg,
                name!(secagg_clip, "--secagg-clip"),
                "--secagg",
            ),
            (
                given(args.attack.is_some(), file.attack.is_some()),
                s.malicious > 0.0,
                name!(attack, "--attack"),
                "--malicious FRACTION",
            ),
            (
                given(
                    args.search_candidates.is_some(),
                    file.search_candidates.is_some(),
                ),
                s.search.is_some(),
                name!(search_candidates, "--search-candidates"),
                "--search ROUNDS",
            ),
            (
                given(
                    args.personalise_proximal.is_some(),
                    file.personalise_proximal.is_some(),
                ),
                s.personalise.is_some_and(|e| e > 0),
                name!(personalise_proximal, "--personalise-proximal"),
                "--personalise EPOCHS",
            ),
        ] {
            if set && !needs {
                bail!("{flag} has no effect without {missing}: add it, or leave {flag} out");
            }
        }
        if let Some(k) = s.secagg_neighbours {
            let flag = name!(secagg_neighbours, "--secagg-neighbours");
            if !s.secagg {
                bail!("{flag} sets the secure-aggregation graph; add --secagg");
            }
            let min = fedcart_common::privacy::secagg::MIN_NEIGHBOURS;
            if k < min {
                bail!(
                    "{flag} {k} is below the minimum {min}: in a sparse graph of low degree the \
                     coordinator could learn the sums of small groups of agents"
                );
            }
        }
        if s.dp.is_some() {
            s.strategy
                .require_streaming("differential privacy")
                .map_err(|e| anyhow::anyhow!("{}: {e}", name!(strategy, "--strategy")))?;
        }
        // FedBuff weighs each clipped update by η before the noise is
        // added: above 1 a merchant moves the sum by η·clip while the noise
        // and the ledger are sized for the clip, so ε would not hold.
        if s.dp.is_some()
            && let super::mode::Mode::FedBuff(f) = &s.mode
            && f.server_lr > 1.0
        {
            bail!(
                "{} {} above 1 with differential privacy: FedBuff scales each clipped update by it \
                 before the noise is added, so one merchant could move the sum by {}·clip while \
                 the noise and ε are sized for the clip; give 1 or less (or leave DP out)",
                name!(server_lr, "--server-lr"),
                f.server_lr,
                f.server_lr
            );
        }
        // Distributed noise clips each update to --dp-clip inside the
        // secure sum: a --secagg-clip was ignored while the report listed it.
        if let Some(dp) = &s.dp
            && dp.mode == fedcart_coordinator::config::DpMode::Distributed
            && s.secagg_clip.is_some()
        {
            bail!(
                "{} does not apply with --dp-mode distributed: each update is clipped to --dp-clip \
                 inside the secure sum, and that clip is the secure aggregation's; leave it out",
                name!(secagg_clip, "--secagg-clip")
            );
        }
        if let Some(dp) = &s.dp
            && dp.mode == fedcart_coordinator::config::DpMode::Distributed
            && !s.secagg
        {
            bail!("--dp-mode distributed adds the noise under secure aggregation; add --secagg");
        }
        Ok(s)
    }

    /// The (task, data) pairs to run: one, or the two of the demo.
    pub fn experiments(&self) -> Vec<(TaskChoice, DataSpec)> {
        match (self.task, &self.data) {
            (Some(t), Some(d)) => vec![(t, d.clone())],
            (Some(t), None) => vec![(t, t.default_data())],
            (None, Some(d)) => {
                let t = match d {
                    DataSpec::Telco(_) | DataSpec::Csv(_) | DataSpec::Orders(_) => {
                        TaskChoice::ChurnLr
                    }
                    _ => TaskChoice::Mf,
                };
                vec![(t, d.clone())]
            }
            (None, None) => vec![
                (TaskChoice::Mf, TaskChoice::Mf.default_data()),
                (TaskChoice::ChurnLr, TaskChoice::ChurnLr.default_data()),
            ],
        }
    }

    /// The secure-aggregation clip for `task`.
    pub fn secagg_clip(&self, task: TaskChoice) -> f32 {
        self.secagg_clip.unwrap_or(match task {
            TaskChoice::Noop(_) => 1.0,
            _ => 1e5,
        })
    }

    /// The field separator of a ratings file or customer table
    /// (`--delimiter`, default comma; orders exports take theirs from the mapping).
    pub fn delimiter(&self) -> u8 {
        self.orders.delimiter.and_then(|d| d.byte()).unwrap_or(b',')
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

    /// Latent factors of `task`'s model: `--factors`, or the default chosen
    /// on the merchants' validation slices ([`MF_FACTORS`] for explicit MF,
    /// [`MF_DP_FACTORS`] for it under DP, [`IMPLICIT_FACTORS`] for BPR and
    /// iALS).
    pub fn factors(&self, task: TaskChoice) -> usize {
        self.factors.unwrap_or(match task {
            TaskChoice::Mf if self.dp.is_some() => MF_DP_FACTORS,
            TaskChoice::Mf => MF_FACTORS,
            _ => IMPLICIT_FACTORS,
        })
    }

    /// MF hyper-parameters: [`MfHyper::explicit`] (under DP
    /// [`MfHyper::explicit_dp`]), [`MfHyper::bpr`] or [`MfHyper::ials`]
    /// (each chosen on the merchants' validation slices,
    /// BENCHMARKS.md) unless overridden. `--reg` sets the factors' penalty
    /// and, but for iALS, scales the biases' by the same factor.
    pub fn mf_hyper(&self, task: TaskChoice) -> MfHyper {
        if task == TaskChoice::MfIals {
            return self.ials_hyper();
        }
        let implicit = task == TaskChoice::MfImplicit;
        let d = match (implicit, self.dp.is_some()) {
            (true, _) => MfHyper::bpr(),
            (false, true) => MfHyper::explicit_dp(),
            (false, false) => MfHyper::explicit(),
        };
        let lr = self.lr.unwrap_or(d.learning_rate);
        let (reg_factors, reg_bias) = match self.reg {
            None => (d.reg_factors, d.reg_bias),
            // Exactly the default bias penalty when r is the default.
            Some(r) => (r, d.reg_bias * (r / d.reg_factors)),
        };
        MfHyper {
            learning_rate: lr,
            bias_learning_rate: lr,
            reg_factors,
            reg_bias,
            epochs: self.epochs.unwrap_or(d.epochs),
            negatives: self.negatives.unwrap_or(d.negatives),
            negatives_from: self.negatives_from,
            refit_users: self.refit_users && !implicit,
            ..d
        }
    }

    /// iALS hyper-parameters (`--task mf-ials`): [`MfHyper::ials`] unless
    /// overridden; `--epochs` counts local (items, users) sweeps per round.
    pub fn ials_hyper(&self) -> MfHyper {
        let d = MfHyper::ials();
        let reg = self.reg.unwrap_or(d.reg_factors);
        MfHyper {
            reg_factors: reg,
            reg_bias: reg,
            alpha: self.alpha.unwrap_or(d.alpha),
            proximal: self.proximal.unwrap_or(d.proximal),
            epochs: self.epochs.unwrap_or(d.epochs),
            ..d
        }
    }

    /// Personalisation of a recommender `task` (`--personalise EPOCHS`,
    /// `--personalise-proximal MU`), `None` when off or for another task.
    pub fn personalisation(
        &self,
        task: TaskChoice,
    ) -> Option<fedcart_common::model::mf::Personalise> {
        let epochs = self.personalise.filter(|&e| e > 0)?;
        let default = match task {
            TaskChoice::Mf | TaskChoice::MfImplicit => fedcart_common::model::mf::DEFAULT_PROXIMAL,
            TaskChoice::MfIals => fedcart_common::model::mf::DEFAULT_PROXIMAL_IALS,
            _ => return None,
        };
        Some(fedcart_common::model::mf::Personalise {
            epochs,
            proximal: self.personalise_proximal.unwrap_or(default),
        })
    }

    /// The early-stopping rule of `model`: `--patience` (0 = off), by
    /// default 5 evaluated rounds for models that report a validation metric.
    pub fn early_stopping(
        &self,
        model: &fedcart_common::task::ModelSpec,
    ) -> Option<fedcart_coordinator::config::EarlyStopping> {
        model.selection_metric()?;
        let default = match model {
            fedcart_common::task::ModelSpec::ChurnGbdt { .. } => DEFAULT_GBDT_PATIENCE,
            _ => DEFAULT_PATIENCE,
        };
        match self.patience.unwrap_or(default) {
            0 => None,
            patience => Some(fedcart_coordinator::config::EarlyStopping { patience }),
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

/// Configurations a `--search` starts from unless `--search-candidates`
/// says otherwise: three rungs of successive halving (8, 4, 2).
pub const DEFAULT_SEARCH_CANDIDATES: usize = 8;

/// The most worker threads `--threads` takes (each an OS thread).
pub const MAX_THREADS: usize = 1024;

/// Default early-stopping patience, in evaluated rounds: long enough to
/// ride out the round-to-round noise of HR@10 on a few hundred validation
/// purchases (one hit is ~0.1–0.2 %), short enough to stop a run that has
/// begun to overfit.
pub const DEFAULT_PATIENCE: u64 = 5;

/// Default early-stopping patience of `churn-gbdt`, in evaluated trees:
/// one tree moves the validation AUC little, and the validation slices are
/// small (BENCHMARKS.md, "Federated gradient-boosted trees").
pub const DEFAULT_GBDT_PATIENCE: u64 = 50;

/// Refuses the settings the gRPC transport cannot honour, naming the flag.
fn check_grpc(s: &Settings) -> anyhow::Result<()> {
    if s.mode != super::mode::Mode::Sync {
        bail!(
            "--mode fedbuff is not available with --transport grpc: the service runs \
             synchronous rounds only (the engine accepts updates for the open task); \
             run FedBuff with --transport inproc"
        );
    }
    if s.personalise.is_some_and(|e| e > 0) {
        bail!(
            "--personalise is not available with --transport grpc: real agents personalise \
             from their merchant.toml's [personalise] and keep the figures to themselves; \
             compare personalisation with --transport inproc"
        );
    }
    if s.malicious > 0.0 {
        bail!(
            "--malicious is not available with --transport grpc: the real agent only sends \
             its honest update; study attacks with --transport inproc"
        );
    }
    if s.clock.availability < 1.0 {
        bail!(
            "--availability is not available with --transport grpc: every real agent is \
             connected and selectable, and the virtual clock that takes merchants offline runs \
             in-process only; study availability with --transport inproc"
        );
    }
    Ok(())
}
