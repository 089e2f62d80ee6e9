//! Loads the merchant's files into `LocalData`, splitting held-out rows off
//! locally with a seeded split (they never leave the agent either).

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use fedcart_common::data::catalogue::{Catalogue, HashedItems, ItemIndex};
use fedcart_common::data::interactions::Interaction;
use fedcart_common::data::orders::{self, ChurnConfig, Order, mapping::SECONDS_PER_DAY};
use fedcart_common::data::tabular::{self, Schema, TabularDataset};
use fedcart_common::data::{movielens, split};
use fedcart_common::itemsets::{self, Basket};
use fedcart_common::model::mf::MfData;
use fedcart_common::train::{ChurnData, LocalData};

use crate::config::AgentConfig;

/// Item rows assumed for hashed item ids before any task names the run's
/// row count (the example recommender run's, so the usual first task needs
/// no re-mapping); the agent re-maps its interactions when a task's model
/// has another (see [`Interactions::mf`]).
pub const HASHED_ROWS_BEFORE_A_TASK: usize = 1 << 17;

/// Churn window when `[data.churn]` gives none (as `prepare`).
const DEFAULT_CHURN_WINDOW_DAYS: u32 = 90;

/// Why the merchant's data could not be loaded. The source names the file,
/// and the line and column when a row is at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The churn CSV (`data.churn_csv`) could not be read.
    /// The source names the file (and line, column): not repeated here.
    #[error("reading the customer table")]
    Churn {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: tabular::DataError,
    },
    /// `data.churn_csv` is not configured but a command needs it.
    #[error("`data.churn_csv` is not configured")]
    NoChurnCsv,
    /// `data.ratings_csv` is not configured but a command needs it.
    #[error("`data.ratings_csv` is not configured")]
    NoRatings,
    /// The item names file (`data.item_names`) could not be read: what,
    /// with the line an editor shows.
    #[error("loading item names {}: {what}", path.display())]
    ItemNames {
        /// The file.
        path: PathBuf,
        /// What failed and where.
        what: String,
    },
    /// Item-based data without a catalogue while `data.hash_items` is off.
    #[error("`data.hash_items` = false needs `data.catalogue`")]
    NoCatalogue,
    /// No recommender data: neither `data.ratings_csv` nor an orders export
    /// with an `item` column.
    #[error(
        "no recommender data: set `data.ratings_csv`, or `data.orders_csv` with an `item` \
         column in `[data.orders]`"
    )]
    NoInteractions,
    /// No customer table: neither `data.churn_csv` nor `data.orders_csv`.
    #[error("no customer data: set `data.orders_csv` (with `[data.orders]`) or `data.churn_csv`")]
    NoCustomers,
    /// The run's model has another number of item rows than the catalogue
    /// file lists: the run uses another catalogue, or hashed item ids.
    #[error(
        "the run's model has {rows} item rows and `data.catalogue` lists {listed} items: the run \
         uses another catalogue, or hashed item ids (leave `data.catalogue` out to hash this \
         merchant's ids as the run's other merchants do)"
    )]
    CatalogueRows {
        /// The model's item rows.
        rows: usize,
        /// Items the catalogue file lists.
        listed: usize,
    },
    /// The run's model has a row count hashed item ids cannot use.
    #[error("the model has {rows} item rows; hashed item ids need 1 to 4294967295")]
    Rows {
        /// The model's item rows.
        rows: usize,
    },
    /// Frequent-itemset baskets need the shared catalogue.
    #[error(
        "baskets need `data.catalogue`: the federation's rules name items of other merchants, \
         which hashed ids cannot"
    )]
    NoBasketCatalogue,
    /// No customer of the orders export ordered before the churn cutoff:
    /// nothing to learn churn from.
    #[error("deriving churn labels from the orders export {}: {message}", path.display())]
    NoChurnHistory {
        /// The file.
        path: PathBuf,
        /// The dates, the cutoff and what to change.
        message: String,
    },
    /// The orders export could not be turned into features or labels.
    #[error("deriving from the orders export {}: {message}", path.display())]
    Derive {
        /// The export.
        path: PathBuf,
        /// What is wrong (no orders, no customers before the cutoff, …).
        message: String,
    },
    /// The ratings file (`data.ratings_csv`) could not be read.
    /// The source names the file (and line, column): not repeated here.
    #[error("reading the ratings file")]
    Ratings {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: tabular::DataError,
    },
    /// `data.orders_csv` is set without an `item` column in `[data.orders]`.
    #[error("baskets need `data.orders_csv` with an `item` column in `[data.orders]`")]
    NoBasketsMapping,
    /// The orders export (`data.orders_csv`) could not be read.
    /// The source names the file (and line, column), or is a churn
    /// setting: not repeated here; a file that is not there is named with
    /// the setting it came from.
    #[error(
        "reading the orders export{}",
        if missing_file(source) {
            " (`data.orders_csv` in merchant.toml, or FEDCART_DATA_ORDERS_CSV)"
        } else {
            ""
        }
    )]
    Orders {
        /// The file.
        path: PathBuf,
        /// The reader's error (file, line, column, value), boxed to keep
        /// the error small.
        #[source]
        source: Box<fedcart_common::data::orders::OrdersError>,
    },
    /// A row of the orders export cannot be used, and the policy is to
    /// stop. The source names the file, line and column.
    #[error(
        "reading the orders export (`on_bad_row = \"skip\"` under [data] in merchant.toml \
         leaves unusable rows out and logs how many)"
    )]
    OrdersRow {
        /// The file.
        path: PathBuf,
        /// The reader's error (file, line, column, value), boxed to keep
        /// the error small.
        #[source]
        source: Box<fedcart_common::data::orders::OrdersError>,
    },
    /// A cell of the orders export does not read in a way that may point to
    /// a setting of the mapping (a date layout, a decimal mark): when every
    /// row fails alike, skipping rows is no way on, so the setting comes
    /// first (it led with `on_bad_row = "skip"`, which then refuses).
    #[error(
        "reading the orders export (if every row fails alike, a setting of `[data.orders]` in \
         merchant.toml does not match the export, such as `timestamp_format` for dates; if only \
         a few rows are bad, `on_bad_row = \"skip\"` under [data] leaves them out)"
    )]
    OrdersSetting {
        /// The file.
        path: PathBuf,
        /// The reader's error (file, line, column, value), boxed to keep
        /// the error small.
        #[source]
        source: Box<fedcart_common::data::orders::OrdersError>,
    },
    /// The shared catalogue (`data.catalogue`) could not be read.
    /// The source names the file (and line, column): not repeated here.
    #[error("reading the catalogue")]
    Catalogue {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: tabular::DataError,
    },
}

/// Whether the export could not be read because it is not there.
fn missing_file(e: &fedcart_common::data::orders::OrdersError) -> bool {
    matches!(
        e,
        fedcart_common::data::orders::OrdersError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
    )
}

/// The merchant's customer table: `data.churn_csv` read with its schema
/// (Telco's when none is configured), or else the RFM features derived from
/// `data.orders_csv` over each customer's whole history. What `score`,
/// `segments` and `serve` read.
#[derive(Debug, Clone)]
pub struct CustomerTable {
    /// The file.
    pub path: PathBuf,
    /// How it is read.
    source: TableSource,
}

#[derive(Debug, Clone)]
enum TableSource {
    Csv { schema: Schema, delimiter: u8 },
    Orders(Box<AgentConfig>),
}

impl CustomerTable {
    /// A customer CSV read with `schema`.
    pub fn csv(path: PathBuf, schema: Schema, delimiter: u8) -> Self {
        Self {
            path,
            source: TableSource::Csv { schema, delimiter },
        }
    }

    /// The table named in the configuration.
    pub fn from_config(cfg: &AgentConfig) -> Result<Self, DataError> {
        if let Some(path) = &cfg.data.churn_csv {
            return Ok(Self {
                path: path.clone(),
                source: TableSource::Csv {
                    schema: cfg.data.schema.clone().unwrap_or_else(Schema::telco),
                    delimiter: cfg.data.delimiter_byte(),
                },
            });
        }
        match &cfg.data.orders_csv {
            Some(path) => Ok(Self {
                path: path.clone(),
                source: TableSource::Orders(Box::new(cfg.clone())),
            }),
            None => Err(DataError::NoCustomers),
        }
    }

    /// Reads every row's features, for scoring and labelling. A customer
    /// table needs no label (a row with none, or with a value that is not a
    /// label, reads label 0: the customers to score are those whose outcome
    /// is not known yet). From an orders export: one row per customer, the
    /// features as of the day after the last order (labels unobserved, 0).
    pub fn load(&self) -> Result<tabular::TabularDataset, DataError> {
        match &self.source {
            TableSource::Csv { schema, delimiter } => {
                let (ds, notes) = schema
                    .load_features_noting(&self.path, *delimiter)
                    .map_err(|source| DataError::Churn {
                        path: self.path.clone(),
                        source,
                    })?;
                for note in notes {
                    tracing::warn!("{note}");
                }
                Ok(ds)
            }
            TableSource::Orders(cfg) => {
                let rows = read_orders(&self.path, cfg)?;
                let window = window_days(cfg);
                let cutoff = after_last(&rows, &self.path)?;
                let cc = ChurnConfig {
                    trend_window_days: trend_days(cfg),
                    ..ChurnConfig::new(cutoff, window)
                };
                Ok(derive(&rows, &cc, &self.path)?.features)
            }
        }
    }
}

fn window_days(cfg: &AgentConfig) -> u32 {
    cfg.data
        .churn
        .churn_window_days
        .unwrap_or(DEFAULT_CHURN_WINDOW_DAYS)
}

fn trend_days(cfg: &AgentConfig) -> u32 {
    cfg.data.churn.trend_window_days.unwrap_or(90)
}

/// Midnight (UTC) after the last order: a cutoff that keeps every order.
fn after_last(rows: &[Order], path: &Path) -> Result<i64, DataError> {
    let last = rows
        .iter()
        .map(|o| o.timestamp)
        .max()
        .ok_or_else(|| DataError::Derive {
            path: path.to_owned(),
            message: "no orders".into(),
        })?;
    Ok((last.div_euclid(SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY)
}

/// Reads the orders export with the configured mapping (bad rows fail,
/// naming file, line and column).
fn read_orders(path: &Path, cfg: &AgentConfig) -> Result<Vec<Order>, DataError> {
    let map = cfg
        .data
        .orders
        .as_ref()
        .ok_or(DataError::NoBasketsMapping)?;
    let (rows, report) =
        orders::read_orders(path, map, cfg.data.on_bad_row).map_err(|source| match source {
            orders::OrdersError::Cell { reason, .. } if reason.points_to_a_setting() => {
                DataError::OrdersSetting {
                    path: path.to_owned(),
                    source: Box::new(source),
                }
            }
            orders::OrdersError::Cell { .. } | orders::OrdersError::Row { .. } => {
                DataError::OrdersRow {
                    path: path.to_owned(),
                    source: Box::new(source),
                }
            }
            source => DataError::Orders {
                path: path.to_owned(),
                source: Box::new(source),
            },
        })?;
    if report.rows_skipped() > 0 {
        let reasons: Vec<String> = report
            .skipped
            .iter()
            .map(|(reason, n)| format!("{n} {}", reason.as_str()))
            .collect();
        tracing::warn!(
            "{}: left out {} of {} rows (`on_bad_row = \"{}\"`): {}; first: {}",
            path.display(),
            report.rows_skipped(),
            report.rows_read,
            if cfg.data.on_bad_row == orders::BadRowPolicy::SkipAll {
                "skip_all"
            } else {
                "skip"
            },
            reasons.join(", "),
            report.examples.first().map_or("", String::as_str)
        );
    }
    for note in report.warnings() {
        tracing::warn!("{}: {note}", path.display());
    }
    Ok(rows)
}

fn derive(rows: &[Order], cc: &ChurnConfig, path: &Path) -> Result<orders::Prepared, DataError> {
    orders::derive(rows, cc).map_err(|source| DataError::Orders {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// The churn training data derived from the orders export: history before
/// the cutoff (`[data.churn]`, default the day after the last order minus
/// the window), label = no order within the window after it; a seeded
/// stratified hold-out as for `churn_csv`.
fn churn_from_orders(
    path: &Path,
    rows: &[Order],
    cfg: &AgentConfig,
) -> Result<ChurnData, DataError> {
    let window = window_days(cfg);
    let cutoff = match &cfg.data.churn.cutoff {
        // Checked when the configuration was read.
        Some(c) => orders::TimestampFormat::parse_setting(c.trim()).map_err(|message| {
            DataError::Derive {
                path: path.to_owned(),
                message: format!("`data.churn.cutoff`: {message}"),
            }
        })?,
        None => after_last(rows, path)? - i64::from(window) * SECONDS_PER_DAY,
    };
    // A cutoff after the last order labels every customer churned: nothing
    // to learn, and a model that would be measured on nothing; a window the
    // export only partly covers labels late returners churned.
    if let Some((_, last)) = orders::time_span(rows) {
        use orders::derive::LabelCoverage;
        let date = orders::derive::format_date;
        let fix = format!(
            "set it to {} or earlier (the last order minus `data.churn.churn_window_days` \
             {window}), or leave it out",
            date(last - i64::from(window) * SECONDS_PER_DAY)
        );
        match LabelCoverage::of(last, cutoff, window) {
            LabelCoverage::Covered => {}
            LabelCoverage::Nothing => {
                return Err(DataError::Derive {
                    path: path.to_owned(),
                    message: format!(
                        "`data.churn.cutoff` {} is after the last order ({}), so every customer \
                         would be labelled churned; {fix}",
                        date(cutoff),
                        date(last)
                    ),
                });
            }
            LabelCoverage::Partial { days } => tracing::warn!(
                "{}: the orders end {}, {days} of the {window} days of the churn window after \
                 `data.churn.cutoff` {}: a customer who came back later is labelled churned; {fix}",
                path.display(),
                date(last),
                date(cutoff)
            ),
        }
    }
    let cc = ChurnConfig {
        trend_window_days: trend_days(cfg),
        ..ChurnConfig::new(cutoff, window)
    };
    let ds = derive(rows, &cc, path)?.features;
    if ds.ids.is_empty() {
        let date = orders::derive::format_date;
        let span = orders::time_span(rows)
            .map(|(first, last)| {
                let days = match (last - first).div_euclid(SECONDS_PER_DAY) {
                    1 => "1 day".to_string(),
                    n => format!("{n} days"),
                };
                format!(
                    "the orders run from {} to {} ({days}), ",
                    date(first),
                    date(last),
                )
            })
            .unwrap_or_default();
        let setting = match &cfg.data.churn.cutoff {
            Some(_) => "`data.churn.cutoff`",
            None => "the cutoff (the last order minus `data.churn.churn_window_days`)",
        };
        return Err(DataError::NoChurnHistory {
            path: path.to_owned(),
            message: format!(
                "no customer ordered before the churn cutoff {}: {span}and {setting} leaves no \
                 history before it; set a shorter `churn_window_days` or a later `cutoff` under \
                 [data.churn]",
                date(cutoff)
            ),
        });
    }
    if let Some(span) = orders::time_span(rows)
        && let Some(note) =
            orders::derive::one_label_note(ds.y.iter().copied(), span, cutoff, window)
    {
        tracing::warn!("{}: {note} (`[data.churn]`)", path.display());
    }
    Ok(split_churn(&ds, cfg, path))
}

/// Splits a merchant's customers into training and held-out rows
/// (`data.holdout`, stratified), saying when none is held out: such a
/// merchant trains, but has nothing to evaluate on (a 3-row table was
/// refused at every evaluation without a word of why).
fn split_churn(ds: &TabularDataset, cfg: &AgentConfig, path: &Path) -> ChurnData {
    let labels = ds.y.to_vec();
    let (train, valid) =
        split::stratified_train_test(&labels, cfg.data.holdout, cfg.data.split_seed);
    if valid.is_empty() {
        tracing::warn!(
            "{}: {} customers, and `data.holdout` = {} keeps none of them aside to test on: this \
             merchant trains, but declines every evaluation, so the run's validation and model \
             selection do not count it; give a table of more customers, or a larger \
             `data.holdout`",
            path.display(),
            labels.len(),
            cfg.data.holdout
        );
    }
    ChurnData {
        train: ds.select(&train),
        valid: ds.select(&valid),
    }
}

/// How the merchant's item ids map to rows of the federated item model,
/// and back.
#[derive(Debug, Clone)]
pub enum Items {
    /// The platform's shared catalogue file (`data.catalogue`).
    Listed(Catalogue),
    /// Item ids hashed into the run's rows ([`HashedItems`]).
    Hashed {
        /// The hash.
        space: HashedItems,
        /// The merchant's own item ids in each row, bought by the most
        /// customers first (a row holds several only when their hashes
        /// collide).
        own: HashMap<u32, Vec<String>>,
        /// How many of the merchant's customers bought each of its items:
        /// an item's own count, not its row's (best sellers rank items).
        buyers: HashMap<String, u32>,
    },
}

impl Items {
    /// Number of rows.
    pub fn len(&self) -> usize {
        ItemIndex::len(self)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item ids of a row: the catalogue's one id, or the merchant's own
    /// items hashed there (none if it sells nothing in that row).
    pub fn ids(&self, row: u32) -> Vec<&str> {
        match self {
            Items::Listed(c) => c.id(row).into_iter().collect(),
            Items::Hashed { own, .. } => own
                .get(&row)
                .map(|v| v.iter().map(String::as_str).collect())
                .unwrap_or_default(),
        }
    }

    /// How many of the merchant's customers bought item `id`, where the
    /// rows cannot tell (hashed ids: a row sums its items); `None` for a
    /// catalogue, whose rows are items.
    pub fn buyers(&self, id: &str) -> Option<u32> {
        match self {
            Items::Listed(_) => None,
            Items::Hashed { buyers, .. } => Some(buyers.get(id).copied().unwrap_or(0)),
        }
    }

    /// The row's best-known item id (the catalogue's, or the merchant's
    /// item there bought by the most customers).
    pub fn label(&self, row: u32) -> Option<&str> {
        self.ids(row).into_iter().next()
    }

    /// With hashed ids, how many of the merchant's items share a row with
    /// another of its items, and how many it has: a ranking cannot tell the
    /// items of one row apart (they tie). `None` for a catalogue.
    pub fn shared_rows(&self) -> Option<(usize, usize)> {
        let Items::Hashed { own, .. } = self else {
            return None;
        };
        let total = own.values().map(Vec::len).sum();
        let shared = own.values().filter(|v| v.len() > 1).map(Vec::len).sum();
        Some((shared, total))
    }

    /// A warning when more than a tenth of the merchant's items share a
    /// hashed row (recommendations then list tied items of one row); the
    /// simulator says the same of `--hash-items`.
    pub fn collision_note(&self) -> Option<String> {
        let (shared, total) = self.shared_rows()?;
        (shared * 10 > total).then(|| {
            format!(
                "{shared} of this merchant's {total} items share one of the recommender's {} item \
                 rows with another of its items: a row's items get one score, so lists rank rows \
                 and tie their items (the run needs several times as many rows as items: \
                 `num_items` of its [run.model])",
                self.len()
            )
        })
    }
}

impl ItemIndex for Items {
    fn index(&self, id: &str) -> Option<u32> {
        match self {
            Items::Listed(c) => c.index(id),
            Items::Hashed { space, .. } => Some(space.row(id)),
        }
    }
    fn len(&self) -> usize {
        match self {
            Items::Listed(c) => c.len(),
            Items::Hashed { space, .. } => space.rows() as usize,
        }
    }
}

/// The recommender's interactions with their local splits, before item ids
/// are mapped to rows: from `data.ratings_csv`, or derived from
/// `data.orders_csv` (every order; implicit unless the mapping has a
/// `rating` column).
#[derive(Debug, Clone)]
pub struct Interactions {
    train: Vec<Interaction>,
    valid: Vec<Interaction>,
    test: Vec<Interaction>,
    catalogue: Option<Catalogue>,
}

impl Interactions {
    /// Whether item ids are hashed (no catalogue file): the rows then follow
    /// the run's model.
    pub fn hashed(&self) -> bool {
        self.catalogue.is_none()
    }

    /// The item rows a run's model of `rows` item rows is trained on: the
    /// catalogue's, which must then list exactly `rows` items (its row `i`
    /// is the federation's row `i` only when every merchant reads the same
    /// file), or ids hashed into `rows` rows.
    pub fn items_for_run(&self, rows: usize) -> Result<Items, DataError> {
        match &self.catalogue {
            Some(c) if c.len() != rows => Err(DataError::CatalogueRows {
                rows,
                listed: c.len(),
            }),
            _ => self.items(rows),
        }
    }

    /// The item rows: the catalogue, or ids hashed into `rows` rows.
    pub fn items(&self, rows: usize) -> Result<Items, DataError> {
        if let Some(c) = &self.catalogue {
            return Ok(Items::Listed(c.clone()));
        }
        let space = u32::try_from(rows)
            .ok()
            .and_then(|r| HashedItems::new(r).ok())
            .ok_or(DataError::Rows { rows })?;
        let mut count: HashMap<&str, usize> = HashMap::new();
        for r in self.train.iter().chain(&self.valid).chain(&self.test) {
            *count.entry(&r.item).or_default() += 1;
        }
        let mut own: HashMap<u32, Vec<(usize, &str)>> = HashMap::new();
        // One interaction per (customer, item): an item's count is its
        // buyers.
        let buyers = count
            .iter()
            .map(|(id, &n)| (id.to_string(), u32::try_from(n).unwrap_or(u32::MAX)))
            .collect();
        for (id, n) in count {
            own.entry(space.row(id)).or_default().push((n, id));
        }
        let own = own
            .into_iter()
            .map(|(row, mut v)| {
                v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
                (row, v.into_iter().map(|(_, id)| id.to_owned()).collect())
            })
            .collect();
        Ok(Items::Hashed { space, own, buyers })
    }

    /// The merchant's recommender data mapped through `items`.
    pub fn mf(&self, items: &Items) -> MfData {
        MfData::with_validation(&self.train, &self.valid, &self.test, items)
    }
}

/// The recommender's interactions named in the configuration, or `None`
/// when it has none.
pub fn interactions(cfg: &AgentConfig) -> Result<Option<Interactions>, DataError> {
    interactions_with(cfg, None)
}

fn interactions_with(
    cfg: &AgentConfig,
    orders_read: Option<&[Order]>,
) -> Result<Option<Interactions>, DataError> {
    let catalogue = match &cfg.data.catalogue {
        Some(p) => Some(catalogue(p)?),
        None if cfg.data.hash_items => None,
        None => return Err(DataError::NoCatalogue),
    };
    if let Some(path) = &cfg.data.ratings_csv {
        let rows = movielens::load_ratings_delimited(path, cfg.data.delimiter_byte()).map_err(
            |source| DataError::Ratings {
                path: path.to_owned(),
                source,
            },
        )?;
        let (train, test) = movielens::random_split(&rows, cfg.data.holdout, cfg.data.split_seed);
        return Ok(Some(Interactions {
            train,
            valid: Vec::new(),
            test,
            catalogue,
        }));
    }
    let (Some(path), Some(map)) = (&cfg.data.orders_csv, &cfg.data.orders) else {
        return Ok(None);
    };
    if map.item.is_none() {
        return Ok(None);
    }
    let owned;
    let rows = match orders_read {
        Some(r) => r,
        None => {
            owned = read_orders(path, cfg)?;
            &owned
        }
    };
    let all = derive(
        rows,
        &ChurnConfig::new(after_last(rows, path)?, window_days(cfg)),
        path,
    )?
    .interactions;
    let implicit = map.rating.is_none();
    let (train, test) = if implicit {
        movielens::leave_last_out(&all)
    } else {
        movielens::random_split(&all, cfg.data.holdout, cfg.data.split_seed)
    };
    let seed = fedcart_common::seed::derive(cfg.data.split_seed, &[&cfg.merchant_id]);
    let (train, valid) = movielens::validation_split_by_basket(&train, &test, implicit, seed);
    Ok(Some(Interactions {
        train,
        valid,
        test,
        catalogue,
    }))
}

/// Display names of catalogue items, from `data.item_names`: a file with a
/// header whose first column is the item id and second the name.
pub fn item_names(
    path: &Path,
    delimiter: u8,
) -> Result<std::collections::HashMap<String, String>, DataError> {
    use fedcart_common::data::csv_lines;
    let err = |what: String| DataError::ItemNames {
        path: path.to_owned(),
        what,
    };
    // The same reader as every merchant file's: lines as an editor shows
    // them, and a compressed or non-UTF-8 file named with its fix (a Latin-1
    // name read "record 0 (line 1 …): invalid utf-8" for its line 2).
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let records = csv_lines::line_records(file, delimiter, path).map_err(|e| err(e.to_string()))?;
    let mut out = std::collections::HashMap::new();
    let mut named_at: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut twice: Vec<(String, u64, u64)> = Vec::new();
    let mut header = true;
    for record in records {
        let (line, record) =
            record.map_err(|(line, e)| err(format!("line {line}: {}", csv_lines::message(&e))))?;
        if std::mem::take(&mut header) {
            // One column: the file's delimiter is not the data's (a
            // semicolon file gave no names and no word).
            if record.len() < 2 {
                return Err(err(format!(
                    "line {line}: the header `{}` is one column split at `{}`: an item-names \
                     file holds the item id and its name, separated as the data are \
                     (`data.delimiter`)",
                    record.get(0).unwrap_or_default(),
                    char::from(delimiter).escape_default()
                )));
            }
            continue;
        }
        let (Some(id), Some(name)) = (record.get(0), record.get(1)) else {
            continue;
        };
        let (id, name) = (id.trim(), name.trim());
        // A blank name is no name: the API leaves the key out.
        if id.is_empty() || name.is_empty() {
            continue;
        }
        match named_at.get(id) {
            Some(&first) => twice.push((id.to_owned(), first, line)),
            None => {
                named_at.insert(id.to_owned(), line);
                out.insert(id.to_owned(), name.to_owned());
            }
        }
    }
    if let Some((id, first, again)) = twice.first() {
        tracing::warn!(
            file = %path.display(),
            items = twice.len(),
            "item `{id}` is named on lines {first} and {again} ({} item(s) named more than \
             once): the first name is kept",
            twice.len()
        );
    }
    Ok(out)
}

/// The item names of the configuration, or none when `data.item_names` is unset.
pub fn configured_item_names(
    cfg: &AgentConfig,
) -> Result<std::collections::HashMap<String, String>, DataError> {
    match &cfg.data.item_names {
        Some(p) => item_names(p, cfg.data.delimiter_byte()),
        None => Ok(Default::default()),
    }
}

/// Reads every dataset named in the configuration; hashed item ids are
/// mapped into [`HASHED_ROWS_BEFORE_A_TASK`] rows.
pub fn load(cfg: &AgentConfig) -> Result<LocalData, DataError> {
    Ok(load_all(cfg, HASHED_ROWS_BEFORE_A_TASK)?.0)
}

/// Reads every dataset named in the configuration, the orders export once:
/// the local data (hashed item ids mapped into `hashed_rows` rows) and the
/// recommender's interactions, which the agent maps again when a run's
/// model has another row count.
pub fn load_all(
    cfg: &AgentConfig,
    hashed_rows: usize,
) -> Result<(LocalData, Option<Interactions>), DataError> {
    let mut data = LocalData {
        merchant_id: cfg.merchant_id.clone(),
        ..Default::default()
    };
    let orders = match &cfg.data.orders_csv {
        Some(path) => Some((path, read_orders(path, cfg)?)),
        None => None,
    };
    for note in cfg.data.shadowed() {
        tracing::info!("{note}");
    }
    if let Some(path) = &cfg.data.churn_csv {
        let schema = cfg.data.schema.clone().unwrap_or_else(Schema::telco);
        let (ds, notes) = schema
            .load_csv_noting(path, cfg.data.delimiter_byte())
            .map_err(|source| DataError::Churn {
                path: path.clone(),
                source,
            })?;
        for note in notes {
            tracing::warn!("{note}");
        }
        data.churn = Some(split_churn(&ds, cfg, path));
    } else if let Some((path, rows)) = &orders {
        data.churn = match churn_from_orders(path, rows, cfg) {
            Ok(churn) => Some(churn),
            // An export shorter than the default churn window still serves
            // the recommender, rules and segments: churn tasks are declined
            // (the coordinator counts a dropout) and the merchant is told why.
            Err(e @ DataError::NoChurnHistory { .. }) if cfg.data.churn.cutoff.is_none() => {
                tracing::warn!("{e}; churn tasks will be declined");
                None
            }
            Err(e) => return Err(e),
        };
    }
    let inter = interactions_with(cfg, orders.as_ref().map(|(_, r)| r.as_slice()))?;
    if let Some(i) = &inter {
        data.mf = Some(i.mf(&i.items(hashed_rows)?));
    }
    if let (Some((path, rows)), Some(cat)) = (&orders, &cfg.data.catalogue)
        && cfg.data.orders.as_ref().is_some_and(|m| m.item.is_some())
    {
        data.baskets = Some(baskets_of(path, rows, &catalogue(cat)?));
    }
    Ok((data, inter))
}

/// The merchant's baskets (one per customer and timestamp) from its orders
/// export, items mapped through the shared catalogue (frequent itemsets
/// need `data.catalogue`: their rules name items of other merchants too).
/// Lines of items the catalogue does not know are left out and counted in
/// a warning.
pub fn load_baskets(path: &Path, cfg: &AgentConfig) -> Result<Vec<Basket>, DataError> {
    let Some(cat_path) = &cfg.data.catalogue else {
        return Err(DataError::NoBasketCatalogue);
    };
    if cfg.data.orders.as_ref().is_none_or(|m| m.item.is_none()) {
        return Err(DataError::NoBasketsMapping);
    }
    let rows = read_orders(path, cfg)?;
    Ok(baskets_of(path, &rows, &catalogue(cat_path)?))
}

fn baskets_of(path: &Path, rows: &[Order], catalogue: &Catalogue) -> Vec<Basket> {
    let unknown = rows
        .iter()
        .filter(|o| {
            o.item
                .as_deref()
                .is_some_and(|i| catalogue.index(i).is_none())
        })
        .count();
    if unknown > 0 {
        tracing::warn!(
            file = %path.display(),
            lines = unknown,
            "order lines whose item is not in the catalogue are left out of the baskets"
        );
    }
    itemsets::baskets(rows, catalogue)
}

/// Reads the shared catalogue.
pub fn catalogue(path: &Path) -> Result<Catalogue, DataError> {
    Catalogue::load(path).map_err(|source| DataError::Catalogue {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merchant whose one data source is a small orders export: `c1`
    /// orders until the end, `c2` stops early (a churner), `c3` buys once.
    /// An item-names file that could not be used gave no names and no word
    /// (another delimiter), or the csv crate's text for the wrong line (a
    /// Latin-1 name on line 2 read "record 0 (line 1 …)").
    #[test]
    fn item_names_say_what_is_wrong_with_their_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let semi = file("semi.csv", b"Artikel-Nr;Bezeichnung\n6534178;Milch\n");
        let e = item_names(&semi, b',').unwrap_err().to_string();
        assert!(
            e.contains("line 1: the header `Artikel-Nr;Bezeichnung` is one column split at `,`")
                && e.contains("data.delimiter"),
            "{e}"
        );
        assert_eq!(item_names(&semi, b';').unwrap()["6534178"], "Milch");
        let latin1 = file("latin1.csv", b"id,name\n6534178,Caf\xe9\n");
        let e = item_names(&latin1, b',').unwrap_err().to_string();
        assert!(
            e.contains("latin1.csv: line 2: field 2 is not UTF-8 text") && e.contains("iconv"),
            "{e}"
        );
        // Named twice: the first name is kept; a blank name is none.
        let twice = file("twice.csv", b"id,name\r\na,First\r\na,Second\r\nb,\r\n");
        let names = item_names(&twice, b',').unwrap();
        assert_eq!(names.get("a").map(String::as_str), Some("First"));
        assert!(!names.contains_key("b"));
    }

    /// Best sellers rank items by their own buyers: where hashed ids share
    /// a row, each item keeps its count (a probe saw an item bought once
    /// listed fourth with its row's 14).
    #[test]
    fn best_sellers_count_each_items_own_buyers_where_items_share_a_row() {
        use crate::recommend::{Purchases, RecommendOptions};
        let dir = tempfile::tempdir().unwrap();
        let inter = interactions(&merchant(dir.path())).unwrap().unwrap();
        let listed = |rows: usize| -> Vec<(String, f32)> {
            let items = inter.items(rows).unwrap();
            let mf = inter.mf(&items);
            Purchases::of(&mf, items.len())
                .naming(&items)
                .popular(None, &items, &RecommendOptions::top(10))
                .into_iter()
                .map(|r| (r.item, r.score))
                .collect()
        };
        // milk, bread and jam have two buyers each, eggs one; ties by id.
        let want: Vec<(String, f32)> = [("bread", 2.0), ("jam", 2.0), ("milk", 2.0), ("eggs", 1.0)]
            .map(|(i, n)| (i.to_string(), n))
            .to_vec();
        assert_eq!(listed(1 << 17), want);
        // One row holds all four (its row has three buyers): the same list.
        assert_eq!(listed(1), want);
    }

    fn merchant(dir: &Path) -> AgentConfig {
        let orders = dir.join("orders.csv");
        let mut text = String::from("customer,item,timestamp,quantity,amount\n");
        for day in 1..=60 {
            text.push_str(&format!(
                "c1,milk,2024-01-{:02}T10:00:00,1,1.5\n",
                day.min(28)
            ));
        }
        for (c, item, date) in [
            ("c1", "bread", "2024-06-01"),
            ("c1", "jam", "2024-06-30"),
            ("c2", "milk", "2024-01-03"),
            ("c2", "bread", "2024-02-01"),
            ("c2", "eggs", "2024-02-02"),
            ("c3", "jam", "2024-05-01"),
        ] {
            text.push_str(&format!("{c},{item},{date}T09:00:00,1,2.0\n"));
        }
        std::fs::write(&orders, text).unwrap();
        let path = dir.join("merchant.toml");
        std::fs::write(
            &path,
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n\
             [data]\norders_csv = \"orders.csv\"\nholdout = 0.34\n\
             [data.orders]\ncustomer = \"customer\"\nitem = \"item\"\n\
             timestamp = \"timestamp\"\nquantity = \"quantity\"\namount = \"amount\"\n",
        )
        .unwrap();
        AgentConfig::load_with_env(&path, |_| None).unwrap()
    }

    #[test]
    fn a_churn_cutoff_after_the_last_order_is_refused_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let _ = merchant(dir.path());
        let path = dir.path().join("merchant.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text + "[data.churn]\ncutoff = \"2024-09-01\"\n").unwrap();
        let cfg = AgentConfig::load_with_env(&path, |_| None).unwrap();
        let e = format!("{:#}", anyhow::Error::new(load(&cfg).unwrap_err()));
        assert!(
            e.contains("`data.churn.cutoff` 2024-09-01 is after the last order (2024-06-30)")
                && e.contains("set it to 2024-04-01 or earlier"),
            "{e}"
        );
    }

    #[test]
    fn a_data_error_names_the_file_once_with_its_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = merchant(dir.path());
        let orders = dir.path().join("orders.csv");
        let chain = |e: DataError| {
            let e = anyhow::Error::new(e);
            format!("{e:#}")
        };
        std::fs::write(
            &orders,
            "customer,item,timestamp,quantity,amount\nc1,milk,2024-01-01,1,x\n",
        )
        .unwrap();
        let table = CustomerTable::from_config(&cfg).unwrap();
        let bad_cell = chain(table.load().unwrap_err());
        let file = orders.display().to_string();
        assert_eq!(bad_cell.matches(&file).count(), 1, "{bad_cell}");
        assert!(
            bad_cell.starts_with(
                "reading the orders export (if every row fails alike, a setting of \
                 `[data.orders]`"
            ) && bad_cell.contains("`on_bad_row = \"skip\"` under [data]")
                && bad_cell.contains("line 2, column `amount`"),
            "{bad_cell}"
        );
        std::fs::remove_file(&orders).unwrap();
        let missing = chain(table.load().unwrap_err());
        assert_eq!(missing.matches(&file).count(), 1, "{missing}");
        // Not there: the setting the path came from is named.
        assert!(
            missing.starts_with(
                "reading the orders export (`data.orders_csv` in merchant.toml, or \
                 FEDCART_DATA_ORDERS_CSV): "
            ),
            "{missing}"
        );
        assert!(!bad_cell.contains("FEDCART_DATA_ORDERS_CSV"), "{bad_cell}");
    }

    /// Two months of orders against the default 90-day churn window: no
    /// customer has history before the cutoff. The agent still starts (its
    /// recommender data is there) and says why churn tasks are declined; a
    /// cutoff the merchant set is refused with the dates and the fix.
    #[test]
    fn an_export_shorter_than_the_churn_window_still_serves_the_recommender() {
        let dir = tempfile::tempdir().unwrap();
        let _ = merchant(dir.path());
        let orders = dir.path().join("orders.csv");
        let text = std::fs::read_to_string(&orders).unwrap();
        let short: String = text
            .lines()
            .filter(|l| !l.contains("2024-06") && !l.contains("2024-05"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&orders, short).unwrap();
        let path = dir.path().join("merchant.toml");
        let cfg = AgentConfig::load_with_env(&path, |_| None).unwrap();
        let data = load(&cfg).unwrap();
        assert!(data.churn.is_none());
        assert!(data.mf.is_some());
        let e = churn_from_orders(&orders, &read_orders(&orders, &cfg).unwrap(), &cfg).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("no customer ordered before the churn cutoff 2023-11-05")
                && e.contains("the orders run from 2024-01-01 to 2024-02-02 (31 days)")
                && e.contains("set a shorter `churn_window_days`"),
            "{e}"
        );
        let toml = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, toml + "[data.churn]\ncutoff = \"2023-12-01\"\n").unwrap();
        let cfg = AgentConfig::load_with_env(&path, |_| None).unwrap();
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("`data.churn.cutoff` leaves no history"), "{e}");
    }

    /// A refund line (a negative amount on a positive quantity) stops the
    /// agent naming the setting that leaves it out; a return (a negative
    /// quantity) is netted, not refused.
    #[test]
    fn a_refund_line_stops_the_agent_naming_the_setting_that_leaves_it_out() {
        let dir = tempfile::tempdir().unwrap();
        let _ = merchant(dir.path());
        let orders = dir.path().join("orders.csv");
        let mut text = std::fs::read_to_string(&orders).unwrap();
        text.push_str("c2,eggs,2024-02-05T09:00:00,1,-2.0\n");
        std::fs::write(&orders, &text).unwrap();
        let path = dir.path().join("merchant.toml");
        let cfg = AgentConfig::load_with_env(&path, |_| None).unwrap();
        let e = format!("{:#}", anyhow::Error::new(load(&cfg).unwrap_err()));
        assert!(
            e.contains("`on_bad_row = \"skip\"` under [data] in merchant.toml")
                && e.contains("line 68, column `amount`: `-2.0` is negative"),
            "{e}"
        );
        let returned = text.replace(
            "c2,eggs,2024-02-05T09:00:00,1,-2.0\n",
            "c2,eggs,2024-02-05T09:00:00,-1,-2.0\n",
        );
        std::fs::write(&orders, &returned).unwrap();
        read_orders(&orders, &cfg).unwrap();
        std::fs::write(&orders, &text).unwrap();
        // The setting the message names is accepted and leaves the row out.
        let toml = std::fs::read_to_string(&path).unwrap();
        let toml = toml.replace("[data]\n", "[data]\non_bad_row = \"skip\"\n");
        std::fs::write(&path, toml).unwrap();
        let cfg = AgentConfig::load_with_env(&path, |_| None).unwrap();
        assert_eq!(cfg.data.on_bad_row, orders::BadRowPolicy::Skip);
        let rows = read_orders(&orders, &cfg).unwrap();
        assert_eq!(rows.len(), 66);
        assert!(rows.iter().all(|o| o.quantity >= 0.0));
        load(&cfg).unwrap();
    }

    #[test]
    fn one_orders_export_gives_churn_labels_interactions_and_a_whole_history_table() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = merchant(dir.path());
        let (local, inter) = load_all(&cfg, 64).unwrap();
        // Labels: history before 90 days ahead of the last order (2024-06-30):
        // c1 and c2 ordered before, only c1 again after.
        let churn = local.churn.unwrap();
        let mut labelled: Vec<(String, f32)> = churn
            .train
            .ids
            .iter()
            .chain(&churn.valid.ids)
            .cloned()
            .zip(churn.train.y.iter().chain(churn.valid.y.iter()).copied())
            .collect();
        labelled.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(labelled, [("c1".into(), 0.0), ("c2".into(), 1.0)]);
        // The table `score` reads covers every customer, c3 too.
        let table = CustomerTable::from_config(&cfg).unwrap().load().unwrap();
        assert_eq!(table.ids, ["c1", "c2", "c3"]);
        assert_eq!(table.x.ncols(), orders::derive::FEATURE_NAMES.len());
        // Interactions from every order; hashed into 64 rows, no catalogue.
        let inter = inter.unwrap();
        assert!(inter.hashed());
        let mf = local.mf.unwrap();
        assert_eq!(mf.users.len(), 3);
        let rows = HashedItems::new(64).unwrap();
        let test_items: Vec<u32> = mf.test.iter().map(|r| r.item).collect();
        // Leave-last-out: each user's latest item (c3 keeps its only one).
        assert!(test_items.contains(&rows.row("jam")), "{test_items:?}");
        assert!(
            mf.train
                .iter()
                .chain(&mf.valid)
                .chain(&mf.test)
                .all(|r| r.item < 64)
        );
        assert!(local.baskets.is_none(), "baskets need a catalogue");
    }

    #[test]
    fn hashed_rows_name_the_merchants_own_items_most_bought_first() {
        let dir = tempfile::tempdir().unwrap();
        let inter = interactions(&merchant(dir.path())).unwrap().unwrap();
        // One row: every item collides, named by how many customers bought
        // it, then by id.
        let one = inter.items(1).unwrap();
        assert_eq!(one.ids(0), ["bread", "jam", "milk", "eggs"]);
        assert_eq!(one.label(0), Some("bread"));
        let many = inter.items(1 << 20).unwrap();
        let milk = HashedItems::new(1 << 20).unwrap().row("milk");
        assert_eq!(many.ids(milk), ["milk"]);
        assert_eq!(many.len(), 1 << 20);
        // A row none of the merchant's items hash to names nothing.
        let empty = (0..).find(|r| many.ids(*r).is_empty()).unwrap();
        assert!(many.label(empty).is_none());
        assert!(matches!(inter.items(0), Err(DataError::Rows { rows: 0 })));
        // Items sharing rows are said (lists would tie them), spread ones not.
        assert_eq!(one.shared_rows(), Some((4, 4)));
        let note = one.collision_note().expect("every item shares the one row");
        assert!(
            note.starts_with(
                "4 of this merchant's 4 items share one of the recommender's 1 item rows"
            ),
            "{note}"
        );
        assert_eq!(many.shared_rows(), Some((0, 4)));
        assert!(many.collision_note().is_none());
    }

    /// A merchant with a catalogue file joining a run of another item count
    /// (a hashed-items run, say) trained its catalogue's row i on the run's
    /// row i, another item for the others, and could not recommend after:
    /// the run's tasks are now refused for it, saying what to change.
    #[test]
    fn a_catalogue_of_another_length_than_the_runs_rows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = merchant(dir.path());
        let list = dir.path().join("catalogue.txt");
        std::fs::write(&list, "bread\njam\nmilk\neggs\n").unwrap();
        cfg.data.catalogue = Some(list);
        let inter = interactions(&cfg).unwrap().unwrap();
        assert!(matches!(inter.items_for_run(4), Ok(Items::Listed(_))));
        let e = inter.items_for_run(1 << 17).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::CatalogueRows {
                    rows: 131072,
                    listed: 4
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("leave `data.catalogue` out"), "{e}");
        // Without a catalogue, ids are hashed into whatever the run has.
        let hashed = interactions(&merchant(dir.path())).unwrap().unwrap();
        assert_eq!(hashed.items_for_run(1 << 17).unwrap().len(), 1 << 17);
    }
}
