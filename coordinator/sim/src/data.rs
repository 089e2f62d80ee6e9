//! Builds the simulated merchants and the model of one experiment from a
//! dataset spec (`movielens:PATH`, `telco:PATH`, `csv:PATH` with a schema,
//! `orders:PATH`, `noop`) and a partitioner.

pub mod orders;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedcart_common::data::catalogue::{Catalogue, ItemIndex};
use fedcart_common::data::interactions::Interaction;
use fedcart_common::data::movielens;
use fedcart_common::data::partition::Partitioner;
use fedcart_common::data::split;
use fedcart_common::data::tabular::{DataError, Schema, TabularDataset};
use fedcart_common::model::mf::{MfData, MfHyper};
use fedcart_common::model::segments;
use fedcart_common::task::ModelSpec;
use fedcart_common::train::{ChurnData, LocalData};

/// Where the bundled MovieLens ratings live, relative to the repository root.
pub const DEFAULT_MOVIELENS: &str = "data/ml-latest-small/ratings.csv";
/// Where the bundled Telco churn table lives, relative to the repository root.
pub const DEFAULT_TELCO: &str = "data/telco-churn/Telco-Customer-Churn.csv";

/// The bundled file `rel` (`data/...`): relative to the working directory,
/// as the README runs it from the repository root; from elsewhere, the
/// repository this binary was built from, when it is still there (a new
/// user's `target/release/fedcart-sim` run from their home directory used to
/// fail with "data/...: No such file or directory").
pub fn bundled(rel: &str) -> PathBuf {
    bundled_from(rel, Path::new(""))
}

/// [`bundled`] with the working directory `cwd` (relative paths stay
/// relative to it).
pub fn bundled_from(rel: &str, cwd: &Path) -> PathBuf {
    let here = cwd.join(rel);
    if here.exists() {
        return here;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::canonicalize(&repo).unwrap_or(here)
}

/// A parsed `--data` value.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DataSpec {
    /// MovieLens-format ratings CSV.
    MovieLens(PathBuf),
    /// Telco-churn-format CSV.
    Telco(PathBuf),
    /// Any customer table read through a schema file (`csv:PATH`, or `csv`
    /// with `--train`/`--test`).
    Csv(Box<CsvSource>),
    /// A merchant orders export read through a column mapping.
    Orders(Box<orders::OrdersSource>),
    /// No data (for `noop:D`).
    None,
}

impl DataSpec {
    /// Makes a relative path of the spec relative to `base` (a `--config`
    /// file's folder); the bundled files are found on their own.
    pub fn resolve_paths(&mut self, base: &Path) {
        // A path that exists beside the file is the file's; one that does
        // not stays as written (relative to the working directory, as the
        // examples run from the repository root are).
        let join = |p: &mut PathBuf| {
            let beside = base.join(&*p);
            if p.is_relative() && !base.as_os_str().is_empty() && beside.exists() {
                *p = beside;
            }
        };
        match self {
            DataSpec::MovieLens(p) | DataSpec::Telco(p) => join(p),
            DataSpec::Csv(c) => {
                if let Some(p) = &mut c.path {
                    join(p);
                }
            }
            DataSpec::Orders(o) if !o.bundled => join(&mut o.path),
            DataSpec::Orders(_) | DataSpec::None => {}
        }
    }

    /// Parses `movielens:PATH`, `telco:PATH`, `csv:PATH`, `orders:PATH`, or
    /// `movielens`, `telco`, `orders` (the bundled files), `csv` (the tables
    /// come from `--train`/`--test`). An orders source still needs
    /// [`DataSpec::with_orders`] for its mapping, a CSV source
    /// [`DataSpec::with_schema`] for its schema.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (kind, path) = match s.split_once(':') {
            // `orders:` alone read as the file "" ("error: : No such file").
            Some((k, p)) if p.trim().is_empty() => {
                bail!("`{s}` names no file: give {k}:PATH, or `{k}` alone for the bundled data")
            }
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (s, None),
        };
        match kind {
            "movielens" => Ok(Self::MovieLens(
                path.unwrap_or_else(|| bundled(DEFAULT_MOVIELENS)),
            )),
            "telco" => Ok(Self::Telco(path.unwrap_or_else(|| bundled(DEFAULT_TELCO)))),
            "orders" => Ok(Self::Orders(Box::new(orders::OrdersSource::new(path)))),
            "csv" => Ok(Self::Csv(Box::new(CsvSource { path, schema: None }))),
            other => {
                bail!(
                    "unknown dataset `{other}` (known: movielens:PATH, telco:PATH, \
                     csv:PATH, orders:PATH)"
                )
            }
        }
    }

    /// The dataset's kind, as `--data` names it (`movielens`, `telco`,
    /// `orders`, `csv`; `none`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MovieLens(_) => "movielens",
            Self::Telco(_) => "telco",
            Self::Orders(_) => "orders",
            Self::Csv(_) => "csv",
            Self::None => "none",
        }
    }

    /// Short name for reports.
    pub fn name(&self) -> String {
        let path = match self {
            Self::MovieLens(p) | Self::Telco(p) => Some(p.as_path()),
            Self::Orders(o) => Some(o.path.as_path()),
            Self::Csv(c) => c.path.as_deref(),
            Self::None => None,
        };
        match path {
            Some(p) => format!("{}:{}", self.kind(), p.display()),
            None => self.kind().into(),
        }
    }

    /// The value as a user writes it for `--data`: the bare kind for a
    /// bundled dataset, `kind:PATH` otherwise (the `data` of the reported
    /// settings).
    pub fn written(&self) -> String {
        match self {
            // The bundled file, wherever the working directory found it.
            Self::MovieLens(p) if p.ends_with(DEFAULT_MOVIELENS) => "movielens".into(),
            Self::Telco(p) if p.ends_with(DEFAULT_TELCO) => "telco".into(),
            Self::Orders(o) if o.bundled => "orders".into(),
            other => other.name(),
        }
    }

    /// Reads and checks the schema of a CSV source from `schema` (the
    /// `--schema` file); other datasets refuse a schema. `flag` names where
    /// the schema came from, for errors.
    ///
    /// `auto` drafts the schema from the table itself (read with
    /// `delimiter`) and prints the draft, with its notes, to standard error.
    pub fn with_schema(
        self,
        schema: Option<&Path>,
        flag: &str,
        delimiter: u8,
    ) -> anyhow::Result<Self> {
        match (self, schema) {
            (Self::Csv(c), Some(p)) if p == Path::new("auto") => {
                let Some(table) = c.path.clone() else {
                    bail!(
                        "{flag} auto drafts the schema from `--data csv:PATH`; with --train and \
                         --test give a schema file (`fedcart-client schema --csv TRAIN` drafts one)"
                    );
                };
                let file = std::fs::File::open(&table)
                    .with_context(|| format!("reading {}", table.display()))?;
                let draft = Schema::draft(file, &table, delimiter, &Default::default()).map_err(
                    |e| match e {
                        // The option that settles it is the client's
                        // `schema` command's: the simulator has none.
                        // An orders export: the simulator reads it as one
                        // (the draft's hint names the agent's settings).
                        DataError::DraftNeeds { file, detail, .. }
                            if detail.contains("looks like an orders export") =>
                        {
                            let table_note = detail
                                .split("; this looks like")
                                .next()
                                .unwrap_or_default()
                                .to_string();
                            anyhow::anyhow!(
                                "{flag} auto: {}: this looks like an orders export, one line per \
                                 order, not a customer table of one row per customer {table_note}: \
                                 give it as `--data orders:{}` with its columns (`--customer-col`, \
                                 `--item-col`, `--timestamp-col`, `--amount-col`, …), and the \
                                 simulator derives each customer's features and churn label",
                                file.display(),
                                table.display()
                            )
                        }
                        DataError::DraftNeeds {
                            file,
                            what,
                            option,
                            detail,
                        } => anyhow::anyhow!(
                            "{flag} auto: {}: cannot tell {what} {detail}; `fedcart-client \
                             schema --csv {}{} {option} --out schema.toml` drafts the schema with \
                             it, then give {flag} schema.toml",
                            file.display(),
                            table.display(),
                            separator(delimiter)
                        ),
                        e => anyhow::anyhow!("{flag} auto: {e}"),
                    },
                )?;
                eprintln!(
                    "{flag} auto: drafted this schema (to keep it: `fedcart-client schema --csv \
                     {}{} --out schema.toml`, then {flag} schema.toml):\n{}",
                    table.display(),
                    separator(delimiter),
                    draft.to_toml(&table, None)
                );
                Ok(Self::Csv(Box::new(CsvSource {
                    path: c.path,
                    schema: Some((p.to_path_buf(), draft.schema)),
                })))
            }
            (Self::Csv(c), Some(p)) => Ok(Self::Csv(Box::new(CsvSource {
                path: c.path,
                schema: Some((p.to_path_buf(), load_schema(p)?)),
            }))),
            (Self::Csv(_), None) => {
                bail!(
                    "--data csv needs a schema: give {flag} FILE (the `[data.schema]` table), or \
                     `{flag} auto` to draft one from the table"
                )
            }
            (other, None) => Ok(other),
            (other, Some(_)) => bail!(
                "{flag} applies to --data csv only, not to `{}`",
                other.name()
            ),
        }
    }

    /// Resolves an orders source's mapping and churn labelling from the
    /// settings (other datasets pass through).
    pub fn with_orders(self, args: &orders::OrdersArgs) -> anyhow::Result<Self> {
        Ok(match self {
            Self::Orders(o) => Self::Orders(Box::new(o.resolve(args)?)),
            other => other,
        })
    }
}

/// The `--delimiter` of a `fedcart-client schema` command that reads the
/// table as `delimiter` does, with its leading space; empty for a comma.
fn separator(delimiter: u8) -> String {
    match (delimiter as char).to_string().parse() {
        Ok(fedcart_common::data::orders::Delimiter::Comma) | Err(_) => String::new(),
        Ok(d) => format!(" --delimiter {}", d.name()),
    }
}

/// A customer table of `--data csv[:PATH]` and the schema it is read with.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvSource {
    /// The table, split into training and held-out rows per merchant; `None`
    /// when `--train` and `--test` give the tables.
    pub path: Option<PathBuf>,
    /// The `--schema` file and the schema read from it, once resolved.
    pub schema: Option<(PathBuf, Schema)>,
}

/// Reads a schema file: the TOML table a merchant writes under
/// `[data.schema]`. Errors name the file (and the line and column of a TOML
/// error, or the rule the schema breaks).
pub fn load_schema(path: &Path) -> anyhow::Result<Schema> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // What `fedcart-client schema --out` writes: the table under its
    // `[data.schema]` header, ready to paste into merchant.toml. Read as is.
    let doc: toml::Table = toml::from_str(&text).map_err(|e| {
        let e = fedcart_common::config_errors::explain(&e.to_string(), &text);
        anyhow::anyhow!("{}: {e}", path.display())
    })?;
    let nested = doc.len() == 1
        && doc
            .get("data")
            .and_then(|d| d.as_table())
            .is_some_and(|d| d.len() == 1 && d.contains_key("schema"));
    let schema: Schema = if nested {
        let table = doc["data"]["schema"].clone();
        table
            .try_into()
            .map_err(|e| anyhow::anyhow!("{} [data.schema]: {e}", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| {
            let e = fedcart_common::config_errors::explain(&e.to_string(), &text);
            anyhow::anyhow!("{}: {e}", path.display())
        })?
    };
    schema
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(schema)
}

/// A parsed `--task` value.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum TaskChoice {
    /// Explicit MF (RMSE).
    Mf,
    /// Implicit MF (BPR, HR@10).
    MfImplicit,
    /// Implicit MF trained by iALS (`mf-ials`; HR@10).
    MfIals,
    /// Churn logistic regression.
    ChurnLr,
    /// Churn multi-layer perceptron with one or two hidden layers
    /// (`h2 == 0`: one layer).
    ChurnMlp {
        /// First hidden layer width.
        h1: usize,
        /// Second hidden layer width, 0 for none.
        h2: usize,
    },
    /// Churn gradient-boosted trees (`churn-gbdt`; hyper-parameters from
    /// `--trees`, `--max-depth`, `--lr`, `--min-child-weight`, `--l2`).
    ChurnGbdt,
    /// Random updates of this length, no training.
    Noop(usize),
    /// Federated k-means segmentation of customers' RFM features into k
    /// segments (`segments:K`), or into the k the federated inertia elbow
    /// chooses (`segments`, `None`; see `fedcart_common::model::segments`).
    Segments(Option<usize>),
    /// Federated frequent itemsets and association rules with this minimum
    /// support in baskets across the federation (`rules[:MIN]`).
    Rules(u64),
}

/// Minimum support of `--task rules` without `:MIN`, in baskets.
pub const DEFAULT_MIN_SUPPORT: u64 = 100;

impl TaskChoice {
    /// Parses `mf`, `mf-implicit`, `churn-lr`, `churn-mlp[:H1[,H2]]` (hidden
    /// widths, default 16) and `noop:D`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "mf" => Self::Mf,
            "mf-implicit" => Self::MfImplicit,
            "mf-ials" => Self::MfIals,
            "churn-lr" => Self::ChurnLr,
            "churn-gbdt" => Self::ChurnGbdt,
            "segments" => Self::Segments(None),
            "rules" => Self::Rules(DEFAULT_MIN_SUPPORT),
            "churn-mlp" => Self::ChurnMlp {
                h1: DEFAULT_HIDDEN,
                h2: 0,
            },
            _ => {
                if let Some(widths) = s.strip_prefix("churn-mlp:") {
                    let w: Vec<usize> = widths
                        .split(',')
                        .map(|w| w.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .ok()
                        .filter(|w: &Vec<usize>| (1..=2).contains(&w.len()))
                        .filter(|w| w.iter().all(|&x| (1..=4096).contains(&x)))
                        .with_context(|| {
                            format!(
                                "`{s}`: give one or two hidden widths in 1..=4096, \
                                 e.g. churn-mlp:32 or churn-mlp:32,16"
                            )
                        })?;
                    return Ok(Self::ChurnMlp {
                        h1: w[0],
                        h2: w.get(1).copied().unwrap_or(0),
                    });
                }
                if let Some(k) = s.strip_prefix("segments:") {
                    return match k.trim().parse::<usize>() {
                        Ok(k) if (1..=256).contains(&k) => Ok(Self::Segments(Some(k))),
                        _ => bail!("`{s}`: give k in 1..=256, e.g. segments:4"),
                    };
                }
                if let Some(m) = s.strip_prefix("rules:") {
                    return match m.trim().parse::<u64>() {
                        Ok(m) if m >= 1 => Ok(Self::Rules(m)),
                        _ => bail!(
                            "`{s}`: give the minimum support in baskets (>= 1), e.g. rules:100"
                        ),
                    };
                }
                match s.strip_prefix("noop:").map(|d| d.trim().parse::<usize>()) {
                    Some(Ok(d)) if d > 0 => Self::Noop(d),
                    Some(_) => {
                        bail!("`{s}`: give the update's length D (>= 1 values), e.g. noop:100000")
                    }
                    None => bail!(
                        "unknown task `{s}` (known: mf, mf-implicit, mf-ials, churn-lr, \
                         churn-mlp[:H1[,H2]], churn-gbdt, segments[:K], rules[:MIN], noop:D)"
                    ),
                }
            }
        })
    }

    /// Whether this is a recommender (explicit or implicit MF).
    pub fn is_mf(self) -> bool {
        matches!(self, Self::Mf | Self::MfImplicit | Self::MfIals)
    }

    /// Whether this is an implicit recommender (BPR or iALS).
    pub fn is_implicit_mf(self) -> bool {
        matches!(self, Self::MfImplicit | Self::MfIals)
    }

    /// Whether this is a churn family (LR, MLP or trees).
    pub fn is_churn(self) -> bool {
        matches!(
            self,
            Self::ChurnLr | Self::ChurnMlp { .. } | Self::ChurnGbdt
        )
    }

    /// The churn model of this task over `num_features` encoded features.
    pub fn churn_model(self, num_features: usize) -> ModelSpec {
        match self {
            Self::ChurnMlp { h1, h2 } => ModelSpec::churn_mlp(
                num_features,
                [h1, h2].into_iter().filter(|&h| h > 0).collect(),
            ),
            // Default hyper-parameters: the simulator sets the flags' values.
            Self::ChurnGbdt => ModelSpec::ChurnGbdt {
                num_features,
                params: Default::default(),
                level_len: 0,
            },
            // Without k, every k of the default range is tried and the
            // elbow chosen; `lloyd_rounds` is set from `--rounds` by the run.
            Self::Segments(k) => ModelSpec::Segments {
                num_features,
                ks: k.map_or_else(|| segments::DEFAULT_KS.collect(), |k| vec![k]),
                choose_rounds: segments::DEFAULT_CHOOSE_ROUNDS,
                lloyd_rounds: 0,
                exchange: Default::default(),
            },
            _ => ModelSpec::churn_lr(num_features),
        }
    }

    /// The dataset this task uses when `--data` is not given.
    pub fn default_data(self) -> DataSpec {
        match self {
            Self::Mf | Self::MfImplicit | Self::MfIals => {
                DataSpec::MovieLens(bundled(DEFAULT_MOVIELENS))
            }
            Self::ChurnLr | Self::ChurnMlp { .. } | Self::ChurnGbdt => {
                DataSpec::Telco(bundled(DEFAULT_TELCO))
            }
            Self::Noop(_) => DataSpec::None,
            Self::Segments(_) | Self::Rules(_) => {
                DataSpec::Orders(Box::new(orders::OrdersSource::new(None)))
            }
        }
    }

    /// Short name for reports.
    pub fn name(self) -> String {
        match self {
            Self::Mf => "mf".into(),
            Self::MfImplicit => "mf-implicit".into(),
            Self::MfIals => "mf-ials".into(),
            Self::ChurnLr => "churn-lr".into(),
            Self::ChurnGbdt => "churn-gbdt".into(),
            Self::ChurnMlp { h1, h2: 0 } if h1 == DEFAULT_HIDDEN => "churn-mlp".into(),
            Self::ChurnMlp { h1, h2: 0 } => format!("churn-mlp:{h1}"),
            Self::ChurnMlp { h1, h2 } => format!("churn-mlp:{h1},{h2}"),
            Self::Noop(d) => format!("noop:{d}"),
            Self::Segments(None) => "segments".into(),
            Self::Segments(Some(k)) => format!("segments:{k}"),
            Self::Rules(m) => format!("rules:{m}"),
        }
    }

    /// The headline metric and whether larger is better.
    pub fn headline(self) -> Option<(&'static str, bool)> {
        match self {
            Self::Mf => Some(("rmse", false)),
            Self::MfImplicit | Self::MfIals => Some(("hr@10", true)),
            Self::ChurnLr | Self::ChurnMlp { .. } | Self::ChurnGbdt => Some(("auc", true)),
            Self::Segments(_) => Some(("inertia", false)),
            Self::Noop(_) | Self::Rules(_) => None,
        }
    }
}

impl std::str::FromStr for DataSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for DataSpec {
    type Error = anyhow::Error;

    fn try_from(s: String) -> anyhow::Result<Self> {
        Self::parse(&s)
    }
}

impl std::str::FromStr for TaskChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for TaskChoice {
    type Error = anyhow::Error;

    fn try_from(s: String) -> anyhow::Result<Self> {
        Self::parse(&s)
    }
}

/// Hidden width of `churn-mlp` without explicit widths (the width the MLP
/// tests in `fedcart_common::model::churn` reach Telco's LR AUC with).
pub const DEFAULT_HIDDEN: usize = 16;

/// The merchants of an experiment and the model they federate.
pub struct Population {
    /// One entry per merchant, in merchant order.
    pub merchants: Vec<LocalData>,
    /// The model family and shape.
    pub model: ModelSpec,
    /// What the report says about the data as read (rows skipped, stray
    /// dates): empty when there is nothing to say.
    pub notes: Vec<String>,
}

/// The encoded features' names of the data's customer rows: the orders
/// pipeline's on an orders export, the schema's on a customer table (empty
/// for data without customer rows).
pub fn feature_names(data: &Option<DataSpec>) -> Vec<String> {
    match data {
        Some(DataSpec::Orders(_)) => fedcart_common::data::orders::derive::FEATURE_NAMES
            .map(String::from)
            .to_vec(),
        Some(DataSpec::Telco(_)) => Schema::telco().feature_names(),
        Some(DataSpec::Csv(c)) => c
            .schema
            .as_ref()
            .map_or_else(Vec::new, |(_, s)| s.feature_names()),
        _ => Vec::new(),
    }
}

/// Loads the data and deals it into `n` merchants. `delimiter` separates
/// the fields of a ratings file or customer table (an orders export carries
/// its own, in its mapping).
pub fn build(
    task: TaskChoice,
    data: &DataSpec,
    files: Option<(&Path, &Path)>,
    delimiter: u8,
    n: usize,
    partitioner: Partitioner,
    mf: MfHyper,
    factors: usize,
    seed: u64,
) -> anyhow::Result<Population> {
    let id = |k: usize| format!("m{k:04}");
    match (task, data) {
        (TaskChoice::Noop(dim), _) => Ok(Population {
            merchants: (0..n)
                .map(|k| LocalData {
                    merchant_id: id(k),
                    ..Default::default()
                })
                .collect(),
            model: ModelSpec::Noop { dim },
            notes: Vec::new(),
        }),
        (t, DataSpec::MovieLens(path)) if t.is_mf() => {
            let implicit = task.is_implicit_mf();
            let (all, train, test) = match files {
                Some((tr, te)) => {
                    let train = load_split_ratings(tr, delimiter)?;
                    let test = load_split_ratings(te, delimiter)?;
                    let all = [train.clone(), test.clone()].concat();
                    (all, train, test)
                }
                None => {
                    let rows = load_ratings(path, delimiter)?;
                    let (train, test) = if implicit {
                        movielens::leave_last_out(&movielens::implicit(&rows, 4.0))
                    } else {
                        movielens::random_split(&rows, 0.2, seed)
                    };
                    (rows, train, test)
                }
            };
            let catalogue = Catalogue::from_interactions(&all);
            let users: Vec<String> = all
                .iter()
                .map(|r| r.user.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let labels = popularity_buckets(&all, &users);
            let parts = partitioner.deal(&labels, None, n, seed)?;
            let merchants = parts
                .iter()
                .enumerate()
                .map(|(k, part)| {
                    let set: BTreeSet<String> = part.iter().map(|&u| users[u].clone()).collect();
                    LocalData {
                        merchant_id: id(k),
                        mf: Some(with_validation(
                            &movielens::rows_of(&train, &set),
                            &movielens::rows_of(&test, &set),
                            &catalogue,
                            implicit,
                            false,
                            seed,
                            &id(k),
                        )),
                        ..Default::default()
                    }
                })
                .collect();
            Ok(Population {
                merchants,
                model: mf_model(implicit, catalogue.len(), factors, mf),
                notes: Vec::new(),
            })
        }
        (t, DataSpec::Orders(src)) => orders::build(t, src, n, partitioner, mf, factors, seed),
        (
            TaskChoice::ChurnLr
            | TaskChoice::ChurnMlp { .. }
            | TaskChoice::ChurnGbdt
            | TaskChoice::Segments(_),
            DataSpec::Telco(_) | DataSpec::Csv(_),
        ) => {
            let (schema, path) = match data {
                DataSpec::Telco(path) => (Schema::telco(), Some(path.as_path())),
                DataSpec::Csv(c) => (
                    c.schema
                        .as_ref()
                        .context("--data csv needs --schema")?
                        .1
                        .clone(),
                    c.path.as_deref(),
                ),
                _ => unreachable!("matched above"),
            };
            // Every loading error names the file (and line) itself.
            let mut notes = Vec::new();
            let telco = matches!(data, DataSpec::Telco(_));
            let mut load = |p: &Path| -> anyhow::Result<TabularDataset> {
                let (ds, unseen) = schema.load_csv_noting(p, delimiter).map_err(|e| {
                    // `telco:` reads Telco's own columns: another customer
                    // table missing one is read with a schema instead.
                    match e {
                        DataError::MissingColumn { .. } if telco => {
                            anyhow::Error::new(e).context(format!(
                                "`--data telco:` reads the IBM Telco table's own columns; for \
                                 another customer table give `--data csv:{} --schema auto` \
                                 (a schema drafted from the table), or a schema file",
                                p.display()
                            ))
                        }
                        e => anyhow::Error::new(e),
                    }
                })?;
                notes.extend(unseen);
                Ok(ds)
            };
            let (train, test) = match (files, path) {
                (Some((tr, te)), _) => (load(tr)?, Some(load(te)?)),
                (None, Some(path)) => (load(path)?, None),
                (None, None) => bail!("--data csv without a PATH needs --train and --test"),
            };
            if let (Some(test), Some(id)) = (&test, &schema.id) {
                notes.extend(held_out_in_training(&train, test, id));
            }
            let labels =
                |ds: &TabularDataset| -> Vec<u32> { ds.y.iter().map(|&y| y as u32).collect() };
            let parts = partitioner.deal(&labels(&train), None, n, seed)?;
            let test_parts = match &test {
                Some(t) => Some(partitioner.deal(&labels(t), None, n, seed ^ 1)?),
                None => None,
            };
            let merchants = parts
                .iter()
                .enumerate()
                .map(|(k, rows)| {
                    let part = train.select(rows);
                    let churn = match (&test, &test_parts) {
                        (Some(t), Some(tp)) => ChurnData {
                            train: part,
                            valid: t.select(&tp[k]),
                        },
                        _ => {
                            let y = part.y.as_slice().expect("contiguous labels").to_vec();
                            // Segments describe every customer: nothing
                            // is held out.
                            let holdout = if task.is_churn() { 0.2 } else { 0.0 };
                            let (tr, va) = split::merchant_train_test(&y, holdout, seed, &id(k));
                            ChurnData {
                                train: part.select(&tr),
                                valid: part.select(&va),
                            }
                        }
                    };
                    LocalData {
                        merchant_id: id(k),
                        churn: Some(churn),
                        ..Default::default()
                    }
                })
                .collect();
            Ok(Population {
                merchants,
                model: task.churn_model(schema.num_features()),
                notes,
            })
        }
        (t, d) => {
            let fits = match d {
                DataSpec::MovieLens(_) => "mf, mf-implicit or mf-ials",
                DataSpec::Telco(_) | DataSpec::Csv(_) => {
                    "churn-lr, churn-mlp, churn-gbdt or segments"
                }
                DataSpec::None => "noop:D",
                DataSpec::Orders(_) => "any task its columns serve",
            };
            bail!(
                "task `{}` cannot run on dataset `{}`, which runs {fits}; an orders export \
                 (`--data orders:PATH`) serves the recommender, churn, segment and rule tasks",
                t.name(),
                d.name()
            )
        }
    }
}

/// The MF model spec of an experiment.
/// A merchant's [`MfData`] with its validation slice carved out of its own
/// training interactions, seeded per merchant: `movielens::validation_split`
/// for ratings, `validation_split_by_basket` when `baskets` (rows derived
/// from an orders log, where the test item is the last line of a basket).
pub fn with_validation(
    train: &[Interaction],
    test: &[Interaction],
    catalogue: &dyn ItemIndex,
    implicit: bool,
    baskets: bool,
    seed: u64,
    merchant: &str,
) -> MfData {
    let seed = fedcart_common::seed::derive(seed, &[merchant]);
    let (train, valid) = if baskets {
        movielens::validation_split_by_basket(train, test, implicit, seed)
    } else {
        movielens::validation_split(train, implicit, seed)
    };
    MfData::with_validation(&train, &valid, test, catalogue)
}

fn mf_model(implicit: bool, num_items: usize, factors: usize, hyper: MfHyper) -> ModelSpec {
    if implicit {
        ModelSpec::MfImplicit {
            num_items,
            factors,
            hyper,
        }
    } else {
        ModelSpec::Mf {
            num_items,
            factors,
            hyper,
        }
    }
}

fn load_ratings(path: &Path, delimiter: u8) -> anyhow::Result<Vec<Interaction>> {
    // Every loading error names the file (and line) itself.
    Ok(movielens::load_ratings_delimited(path, delimiter)?)
}

/// The report's note when `--test` rows are also `--train` rows: customers
/// of both files (by the schema's `id` column), and how many of those rows
/// are identical (features and label), which the held-out figures then
/// count as unseen; `None` when no customer is in both. A later snapshot of
/// the same customers (other features or labels) is a fair test; the note
/// says which it is.
fn held_out_in_training(train: &TabularDataset, test: &TabularDataset, id: &str) -> Option<String> {
    let rows: HashMap<&str, usize> = train
        .ids
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let (mut shared, mut identical) = (0usize, 0usize);
    for (j, c) in test.ids.iter().enumerate() {
        let Some(&i) = rows.get(c.as_str()) else {
            continue;
        };
        shared += 1;
        if train.y[i] == test.y[j] && train.x.row(i) == test.x.row(j) {
            identical += 1;
        }
    }
    if shared == 0 {
        return None;
    }
    let n = test.ids.len();
    Some(if identical > 0 {
        format!(
            "warning: {identical} of the {n} --test rows are identical to --train rows (same \
             `{id}`, features and label): the held-out figures count rows the models trained on \
             ({shared} test customers are in both files)"
        )
    } else {
        format!(
            "note: {shared} of the {n} --test customers (by `{id}`) are in --train too, with \
             other features or labels (a later snapshot of the same customers)"
        )
    })
}

/// [`load_ratings`] for `--train`/`--test`: a file without the ratings'
/// columns is more likely another kind of data than a broken ratings file,
/// and without `--data` the files are read as ratings, so the error says how
/// to read a customer table or an orders export instead.
fn load_split_ratings(path: &Path, delimiter: u8) -> anyhow::Result<Vec<Interaction>> {
    movielens::load_ratings_delimited(path, delimiter).map_err(|e| match e {
        fedcart_common::data::tabular::DataError::MissingColumn { .. } => anyhow::anyhow!(
            "{e}\n--train and --test are read as ratings (userId,movieId,rating,timestamp or \
             user,item,value,timestamp) unless --data says otherwise: for a customer table give \
             --data csv --schema FILE (or --schema auto), for an orders export --data orders \
             with its column flags"
        ),
        e => e.into(),
    })
}

/// Each user's label for Dirichlet skew: the quintile (0–4) of the mean
/// popularity rank of the items they rated, so a skewed split gives some
/// merchants blockbuster audiences and others long-tail ones.
fn popularity_buckets(rows: &[Interaction], users: &[String]) -> Vec<u32> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *count.entry(&r.item).or_default() += 1;
    }
    let mut items: Vec<(&str, usize)> = count.into_iter().collect();
    items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let n_items = items.len().max(1) as f64;
    let rank: HashMap<&str, f64> = items
        .iter()
        .enumerate()
        .map(|(r, (i, _))| (*i, r as f64 / n_items))
        .collect();
    let mut sums: HashMap<&str, (f64, usize)> = HashMap::new();
    for r in rows {
        let e = sums.entry(&r.user).or_default();
        e.0 += rank[r.item.as_str()];
        e.1 += 1;
    }
    let mut means: Vec<(f64, usize)> = users
        .iter()
        .enumerate()
        .map(|(u, id)| {
            let (s, c) = sums[id.as_str()];
            (s / c as f64, u)
        })
        .collect();
    means.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut labels = vec![0u32; users.len()];
    for (pos, (_, u)) in means.iter().enumerate() {
        labels[*u] = (pos * 5 / users.len().max(1)) as u32;
    }
    labels
}

#[cfg(test)]
mod csv_tests;
