//! Builds the simulated merchants and the model of one experiment from a
//! dataset spec (`movielens:PATH`, `telco:PATH`, `noop`) and a partitioner.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedcart_common::catalogue::Catalogue;
use fedcart_common::interactions::Interaction;
use fedcart_common::mf::{MfData, MfHyper};
use fedcart_common::movielens;
use fedcart_common::partition::Partitioner;
use fedcart_common::split;
use fedcart_common::tabular::{Schema, TabularDataset};
use fedcart_common::task::ModelSpec;
use fedcart_common::train::{ChurnData, LocalData};

/// Where the bundled MovieLens ratings live, relative to the repository root.
pub const DEFAULT_MOVIELENS: &str = "data/ml-latest-small/ratings.csv";
/// Where the bundled Telco churn table lives, relative to the repository root.
pub const DEFAULT_TELCO: &str = "data/telco-churn/Telco-Customer-Churn.csv";

/// A parsed `--data` value.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    /// MovieLens-format ratings CSV.
    MovieLens(PathBuf),
    /// Telco-churn-format CSV.
    Telco(PathBuf),
    /// No data (for `noop:D`).
    None,
}

impl DataSpec {
    /// Parses `movielens:PATH`, `telco:PATH`, `movielens`, `telco` (bundled
    /// files) or `orders:PATH` (refused in this build).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (kind, path) = match s.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (s, None),
        };
        match kind {
            "movielens" => Ok(Self::MovieLens(
                path.unwrap_or_else(|| DEFAULT_MOVIELENS.into()),
            )),
            "telco" => Ok(Self::Telco(path.unwrap_or_else(|| DEFAULT_TELCO.into()))),
            "orders" => bail!(
                "`orders:` data is not available in this build (the orders pipeline, \
                 common::orders, is not merged yet); use movielens:PATH or telco:PATH"
            ),
            other => bail!("unknown dataset `{other}` (known: movielens:PATH, telco:PATH)"),
        }
    }

    /// Short name for reports.
    pub fn name(&self) -> String {
        match self {
            Self::MovieLens(p) => format!("movielens:{}", p.display()),
            Self::Telco(p) => format!("telco:{}", p.display()),
            Self::None => "none".into(),
        }
    }
}

/// A parsed `--task` value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskChoice {
    /// Explicit MF (RMSE).
    Mf,
    /// Implicit MF (BPR, HR@10).
    MfImplicit,
    /// Churn logistic regression.
    ChurnLr,
    /// Random updates of this length, no training.
    Noop(usize),
}

impl TaskChoice {
    /// Parses `mf`, `mf-implicit`, `churn-lr`, `noop:D`; `churn-mlp` is refused.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "mf" => Self::Mf,
            "mf-implicit" => Self::MfImplicit,
            "churn-lr" => Self::ChurnLr,
            "churn-mlp" => bail!(
                "`churn-mlp` is not available in this build (the MLP model is not merged yet)"
            ),
            _ => match s.strip_prefix("noop:").map(str::parse::<usize>) {
                Some(Ok(d)) if d > 0 => Self::Noop(d),
                _ => bail!("unknown task `{s}` (known: mf, mf-implicit, churn-lr, noop:D)"),
            },
        })
    }

    /// The dataset this task uses when `--data` is not given.
    pub fn default_data(self) -> DataSpec {
        match self {
            Self::Mf | Self::MfImplicit => DataSpec::MovieLens(DEFAULT_MOVIELENS.into()),
            Self::ChurnLr => DataSpec::Telco(DEFAULT_TELCO.into()),
            Self::Noop(_) => DataSpec::None,
        }
    }

    /// Short name for reports.
    pub fn name(self) -> String {
        match self {
            Self::Mf => "mf".into(),
            Self::MfImplicit => "mf-implicit".into(),
            Self::ChurnLr => "churn-lr".into(),
            Self::Noop(d) => format!("noop:{d}"),
        }
    }

    /// The headline metric and whether larger is better.
    pub fn headline(self) -> Option<(&'static str, bool)> {
        match self {
            Self::Mf => Some(("rmse", false)),
            Self::MfImplicit => Some(("hr@10", true)),
            Self::ChurnLr => Some(("auc", true)),
            Self::Noop(_) => None,
        }
    }
}

/// The merchants of an experiment and the model they federate.
pub struct Population {
    /// One entry per merchant, in merchant order.
    pub merchants: Vec<LocalData>,
    /// The model family and shape.
    pub model: ModelSpec,
}

/// Loads the data and deals it into `n` merchants.
pub fn build(
    task: TaskChoice,
    data: &DataSpec,
    files: Option<(&Path, &Path)>,
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
        }),
        (TaskChoice::Mf | TaskChoice::MfImplicit, DataSpec::MovieLens(path)) => {
            let implicit = task == TaskChoice::MfImplicit;
            let (all, train, test) = match files {
                Some((tr, te)) => {
                    let train = load_ratings(tr)?;
                    let test = load_ratings(te)?;
                    let all = [train.clone(), test.clone()].concat();
                    (all, train, test)
                }
                None => {
                    let rows = load_ratings(path)?;
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
                        mf: Some(MfData::new(
                            &movielens::rows_of(&train, &set),
                            &movielens::rows_of(&test, &set),
                            &catalogue,
                        )),
                        ..Default::default()
                    }
                })
                .collect();
            let (num_items, hyper) = (catalogue.len(), mf);
            let model = if implicit {
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
            };
            Ok(Population { merchants, model })
        }
        (TaskChoice::ChurnLr, DataSpec::Telco(path)) => {
            let schema = Schema::telco();
            let load = |p: &Path| {
                schema
                    .load_csv(p)
                    .with_context(|| format!("loading {}", p.display()))
            };
            let (train, test) = match files {
                Some((tr, te)) => (load(tr)?, Some(load(te)?)),
                None => (load(path)?, None),
            };
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
                            let (tr, va) = split::stratified_train_test(&y, 0.2, seed);
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
                model: ModelSpec::ChurnLr {
                    num_features: schema.num_features(),
                },
            })
        }
        (t, d) => bail!("task `{}` cannot run on dataset `{}`", t.name(), d.name()),
    }
}

fn load_ratings(path: &Path) -> anyhow::Result<Vec<Interaction>> {
    movielens::load_ratings(path).with_context(|| format!("loading {}", path.display()))
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
