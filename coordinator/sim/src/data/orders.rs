//! `--data orders:PATH`: a merchant orders export read through a column
//! mapping (`fedcart_common::data::orders`) into per-merchant churn features and
//! recommender interactions — exactly what `fedcart-client prepare` derives
//! on a merchant's own machine.
//!
//! The mapping comes from `--orders-mapping FILE` (the TOML format of
//! `prepare --mapping`), the `[orders]` table of the simulator's config, and
//! the `--*-col` flags, later ones overriding earlier ones. With the
//! `natural` partitioner and a merchant column, every store of the export is
//! one merchant and derives its own features from its own orders; otherwise
//! the customers of the whole export are dealt into `--merchants` merchants.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fedcart_common::data::catalogue::{Catalogue, HashedItems, ItemIndex};
use fedcart_common::data::interactions::Interaction;
use fedcart_common::data::movielens;
use fedcart_common::data::orders::{
    self, AmountIs, BadRowPolicy, ChurnConfig, DecimalMark, Delimiter, Order, OrdersMapping,
    Prepared, TimestampFormat, derive::FEATURE_NAMES, mapping::MappingOverrides,
    mapping::SECONDS_PER_DAY,
};
use fedcart_common::data::partition::Partitioner;
use fedcart_common::data::split;
use fedcart_common::data::tabular::TabularDataset;
use fedcart_common::model::mf::MfHyper;
use fedcart_common::train::{ChurnData, LocalData};
use serde::{Deserialize, Serialize};

use super::{Population, TaskChoice};

/// Where the bundled CDNOW orders log lives, relative to the repository root.
pub const DEFAULT_CDNOW: &str = "data/cdnow/CDNOW_master.txt";

/// The churn cutoff used for the bundled CDNOW log (the window then ends
/// inside the file, so every label is observed).
const CDNOW_CUTOFF: &str = "1997-09-30";
const CDNOW_WINDOW_DAYS: u32 = 180;
/// Churn window when none is given (as `fedcart-client prepare`).
const DEFAULT_WINDOW_DAYS: u32 = 90;
/// Share of each merchant's customers held out for evaluation.
const HOLDOUT: f64 = 0.2;

/// How to read `--data orders:PATH`: the column mapping and the churn
/// labelling. On the command line every field is a flag; in the config file
/// they form the `[orders]` table (`customer = "…"`, `timestamp = "…"`, …,
/// the field names of the mapping file).
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrdersArgs {
    /// Orders column mapping as a TOML file (the format of `fedcart-client
    /// prepare --mapping`, e.g. client/examples/cdnow-mapping.toml); the
    /// column flags below override its entries.
    #[arg(long = "orders-mapping")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<PathBuf>,
    /// Orders: customer id column.
    #[arg(long = "customer-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Orders: item id column (needed by the MF tasks).
    #[arg(long = "item-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// Orders: order time column.
    #[arg(long = "timestamp-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Orders: order time format (auto, unix_seconds, unix_ms, iso8601, yyyymmdd, spreadsheet_days,
    /// or a strftime pattern such as `%d/%m/%Y %H:%M`).
    #[arg(long = "timestamp-format")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp_format: Option<TimestampFormat>,
    /// Orders: quantity column (default: every row is one unit).
    #[arg(long = "quantity-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<String>,
    /// Orders: line value column.
    #[arg(long = "amount-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// Orders: what the amount column holds: line_total, or unit_price (multiplied by the
    /// quantity column) [default: line_total].
    #[arg(long = "amount-is")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_is: Option<AmountIs>,
    /// Orders: explicit rating column (needed by `--task mf`).
    #[arg(long = "rating-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rating: Option<String>,
    /// Orders: merchant/store column (one merchant per store with `--partition natural`).
    #[arg(long = "merchant-col")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant: Option<String>,
    /// Field separator of the data files (comma, tab, semicolon, pipe; whitespace for orders
    /// exports only) [default: an orders mapping's, else comma].
    #[arg(long = "delimiter")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<Delimiter>,
    /// Orders: decimal mark of the quantity, amount and rating columns (point, comma)
    /// [default: an orders mapping's, else point].
    #[arg(long = "decimal")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decimal: Option<DecimalMark>,
    /// Orders: churn cutoff date [default: the last order minus the churn window]; given,
    /// the recommender tasks (`mf`, `mf-implicit`, `mf-ials`) learn from the orders before
    /// it only, else from every order.
    #[arg(long = "cutoff")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<String>,
    /// Orders: a customer churned if they bought nothing this many days after the cutoff [default: 90].
    #[arg(long = "churn-window-days", value_parser = clap::value_parser!(u32).range(1..))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn_window_days: Option<u32>,
    /// Orders: unreadable rows fail the run or are left out and counted (fail; skip, refused when
    /// one reason that points to a setting, such as unreadable dates, leaves out more than a tenth
    /// of the rows; skip-all) [default: fail].
    #[arg(long = "on-bad-row")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_bad_row: Option<BadRowPolicy>,
    /// Orders, recommender tasks: hash item ids into this many model rows, as agents without a
    /// catalogue file do [default: one row per distinct item of the export].
    #[arg(long = "hash-items")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_items: Option<u32>,
}

#[cfg(test)]
impl OrdersArgs {
    /// The column flags of the bundled grocery log (`data/grocery`), whose
    /// header names its columns: what the tests on it pass.
    pub fn grocery_columns() -> Self {
        Self {
            customer: Some("customer".into()),
            item: Some("item".into()),
            timestamp: Some("timestamp".into()),
            quantity: Some("quantity".into()),
            amount: Some("amount".into()),
            merchant: Some("merchant".into()),
            ..Default::default()
        }
    }
}

impl OrdersArgs {
    /// The first setting given that only an orders export reads, as its
    /// flag and its key in the `[orders]` table (`--delimiter` also reads
    /// customer tables and ratings files, so it is not one of them).
    pub fn first_orders_only(&self) -> Option<(&'static str, &'static str)> {
        [
            (self.mapping.is_some(), "--orders-mapping", "mapping"),
            (self.customer.is_some(), "--customer-col", "customer"),
            (self.item.is_some(), "--item-col", "item"),
            (self.timestamp.is_some(), "--timestamp-col", "timestamp"),
            (
                self.timestamp_format.is_some(),
                "--timestamp-format",
                "timestamp_format",
            ),
            (self.quantity.is_some(), "--quantity-col", "quantity"),
            (self.amount.is_some(), "--amount-col", "amount"),
            (self.amount_is.is_some(), "--amount-is", "amount_is"),
            (self.rating.is_some(), "--rating-col", "rating"),
            (self.merchant.is_some(), "--merchant-col", "merchant"),
            (self.decimal.is_some(), "--decimal", "decimal"),
            (self.cutoff.is_some(), "--cutoff", "cutoff"),
            (
                self.churn_window_days.is_some(),
                "--churn-window-days",
                "churn_window_days",
            ),
            (self.on_bad_row.is_some(), "--on-bad-row", "on_bad_row"),
            (self.hash_items.is_some(), "--hash-items", "hash_items"),
        ]
        .into_iter()
        .find(|(given, _, _)| *given)
        .map(|(_, flag, key)| (flag, key))
    }

    /// The column flags, to apply over the mapping file.
    fn overrides(&self) -> MappingOverrides {
        MappingOverrides {
            customer: self.customer.clone(),
            item: self.item.clone(),
            timestamp: self.timestamp.clone(),
            timestamp_format: self.timestamp_format.clone(),
            quantity: self.quantity.clone(),
            amount: self.amount.clone(),
            amount_is: self.amount_is,
            rating: self.rating.clone(),
            merchant: self.merchant.clone(),
            delimiter: self.delimiter,
            decimal: self.decimal,
        }
    }

    /// Field by field, `self` where set, else `file`.
    pub fn or(self, file: Self) -> Self {
        Self {
            mapping: self.mapping.or(file.mapping),
            customer: self.customer.or(file.customer),
            item: self.item.or(file.item),
            timestamp: self.timestamp.or(file.timestamp),
            timestamp_format: self.timestamp_format.or(file.timestamp_format),
            quantity: self.quantity.or(file.quantity),
            amount: self.amount.or(file.amount),
            amount_is: self.amount_is.or(file.amount_is),
            rating: self.rating.or(file.rating),
            merchant: self.merchant.or(file.merchant),
            delimiter: self.delimiter.or(file.delimiter),
            decimal: self.decimal.or(file.decimal),
            cutoff: self.cutoff.or(file.cutoff),
            churn_window_days: self.churn_window_days.or(file.churn_window_days),
            on_bad_row: self.on_bad_row.or(file.on_bad_row),
            hash_items: self.hash_items.or(file.hash_items),
        }
    }
}

/// A resolved orders source: the file, its mapping and the churn labelling.
#[derive(Debug, Clone, PartialEq)]
pub struct OrdersSource {
    /// The export.
    pub path: PathBuf,
    /// `orders` without a path: the bundled CDNOW log with its known mapping.
    pub bundled: bool,
    /// The column mapping (`None` until [`OrdersSource::resolve`]).
    pub mapping: Option<OrdersMapping>,
    /// Cutoff as unix seconds (`None`: the last order minus the window).
    pub cutoff: Option<i64>,
    /// Churn window in days.
    pub churn_window_days: u32,
    /// Bad-row policy.
    pub on_bad_row: BadRowPolicy,
    /// Item ids hashed into this many rows (`None`: the export's catalogue).
    pub hash_items: Option<HashedItems>,
}

impl OrdersSource {
    /// An unresolved source for `path` (`None`: the bundled CDNOW log).
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            bundled: path.is_none(),
            path: path.unwrap_or_else(|| super::bundled(DEFAULT_CDNOW)),
            mapping: None,
            cutoff: None,
            churn_window_days: DEFAULT_WINDOW_DAYS,
            on_bad_row: BadRowPolicy::Fail,
            hash_items: None,
        }
    }

    /// Applies the mapping file, the `[orders]` table and the flags.
    pub fn resolve(mut self, args: &OrdersArgs) -> anyhow::Result<Self> {
        let base = match &args.mapping {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| {
                    format!(
                        "--orders-mapping `{}`: reading the mapping file (a TOML table of \
                         column names, e.g. client/examples/cdnow-mapping.toml)",
                        p.display()
                    )
                })?;
                // Read as settings: the file may leave out a column a flag
                // gives, the flags winning where both name one.
                let file = toml::from_str::<MappingOverrides>(&text)
                    .with_context(|| format!("--orders-mapping `{}`", p.display()))?;
                let map = args.overrides().or(file).apply(None).map_err(|e| {
                    anyhow::anyhow!(
                        "--orders-mapping `{}` has no `{}` column: add it there, or give \
                         --{}-col",
                        p.display(),
                        e.field,
                        e.field
                    )
                })?;
                Some(map)
            }
            None if self.bundled => Some(OrdersMapping::cdnow()),
            None => None,
        };
        let map = match base {
            Some(map) if args.mapping.is_some() => map,
            base => args.overrides().apply(base).map_err(|e| {
                anyhow::anyhow!(
                    "`orders:{}` needs a column mapping: give --orders-mapping FILE, or \
                     --{}-col (`{}` in the config's [orders] table)",
                    self.path.display(),
                    e.field,
                    e.field
                )
            })?,
        };
        let (default_cutoff, default_window) = if self.bundled && args.mapping.is_none() {
            (Some(CDNOW_CUTOFF), CDNOW_WINDOW_DAYS)
        } else {
            (None, DEFAULT_WINDOW_DAYS)
        };
        self.cutoff = match args.cutoff.as_deref().or(default_cutoff) {
            Some(c) => Some(
                TimestampFormat::parse_setting(c.trim())
                    .map_err(|m| anyhow::anyhow!("--cutoff: {m}"))?,
            ),
            None => None,
        };
        self.churn_window_days = args.churn_window_days.unwrap_or(default_window);
        if self.churn_window_days == 0 {
            bail!("--churn-window-days must be at least 1");
        }
        self.on_bad_row = args.on_bad_row.unwrap_or_default();
        self.hash_items = match args.hash_items {
            Some(rows) => Some(
                HashedItems::new(rows)
                    .map_err(|_| anyhow::anyhow!("--hash-items must be at least 1"))?,
            ),
            None => None,
        };
        self.mapping = Some(map);
        Ok(self)
    }

    fn mapping(&self) -> &OrdersMapping {
        self.mapping
            .as_ref()
            .expect("Settings resolve every orders source before building")
    }

    /// Reads the export; the cutoff defaults to the last order minus the window.
    pub(crate) fn read(&self) -> anyhow::Result<(Vec<Order>, ChurnConfig)> {
        self.read_noting().map(|(rows, cfg, _)| (rows, cfg))
    }

    /// As [`OrdersSource::read`], with what the report should say about the
    /// export: rows skipped (`--on-bad-row skip`) and stray dates, which
    /// were on standard error only.
    pub(crate) fn read_noting(&self) -> anyhow::Result<(Vec<Order>, ChurnConfig, Vec<String>)> {
        // Every reading error names the file (and line) itself.
        let (rows, report) = orders::read_orders(&self.path, self.mapping(), self.on_bad_row)
            .map_err(|e| match e {
                orders::OrdersError::Config(_) => {
                    anyhow::Error::new(e).context(format!("reading orders {}", self.path.display()))
                }
                // As `prepare` says it: the two ways on (the error named the
                // cell and nothing to do), unless it names a flag already.
                orders::OrdersError::Cell { ref message, .. }
                    if self.on_bad_row == BadRowPolicy::Fail
                        && !message.contains("`--")
                        && !message.contains("bad-row policy") =>
                {
                    anyhow::anyhow!(
                        "{e} (fix that line, or leave such lines out and count them with \
                         `--on-bad-row skip`)"
                    )
                }
                e => anyhow::Error::new(e),
            })?;
        let mut notes = Vec::new();
        if report.rows_skipped() > 0 {
            tracing::warn!(file = %self.path.display(), skipped = report.rows_skipped(),
                examples = ?report.examples, "orders rows skipped");
            let reasons: Vec<String> = report
                .skipped
                .iter()
                .map(|(reason, n)| format!("{} {n}", reason.as_str()))
                .collect();
            notes.push(format!(
                "{}: {} of {} rows skipped (--on-bad-row {}): {}{}",
                self.path.display(),
                report.rows_skipped(),
                report.rows_read,
                if self.on_bad_row == BadRowPolicy::SkipAll {
                    "skip-all"
                } else {
                    "skip"
                },
                reasons.join(", "),
                report
                    .examples
                    .first()
                    .map_or(String::new(), |e| format!("; the first: {e}"))
            ));
        }
        for note in report.warnings() {
            tracing::warn!("{}: {note}", self.path.display());
            notes.push(format!("{}: {note}", self.path.display()));
        }
        let window = i64::from(self.churn_window_days) * SECONDS_PER_DAY;
        let cutoff = match self.cutoff {
            Some(c) => c,
            None => {
                let last =
                    rows.iter().map(|o| o.timestamp).max().with_context(|| {
                        format!("{}: no orders to learn from", self.path.display())
                    })?;
                // Midnight of the day after the last order, minus the window.
                (last.div_euclid(SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY - window
            }
        };
        Ok((
            rows,
            ChurnConfig::new(cutoff, self.churn_window_days),
            notes,
        ))
    }
}

/// Which store each merchant id stands for, the first [`SHOWN_STORES`] of
/// them: a report of `m0000`… could not be traced back to a store.
fn store_names(names: &[&str], id: &impl Fn(usize) -> String) -> String {
    let mut shown: Vec<String> = names
        .iter()
        .take(SHOWN_STORES)
        .enumerate()
        .map(|(k, name)| {
            format!(
                "{} = `{}`",
                id(k),
                name.chars().take(40).collect::<String>()
            )
        })
        .collect();
    if names.len() > SHOWN_STORES {
        shown.push(format!("{} more", names.len() - SHOWN_STORES));
    }
    shown.join(", ")
}

/// Stores named in the natural partition's report note.
const SHOWN_STORES: usize = 50;

/// Share of the churn window after the cutoff a store's export may miss
/// before its labels are called into question ([`short_stores`]). Set by
/// judgement, not tuned: the bundled grocery stores end within two days of
/// one another except one, which misses half of the window.
const SHORT_WINDOW_SHARE: f64 = 0.25;

/// Stores whose own orders end before the churn window after the cutoff
/// closes: a customer of theirs who bought again after their export ends
/// looks churned, and one whose orders all end before the cutoff's window
/// opens has every customer labelled churned. The cutoff is the whole
/// export's, while each store's own agent would take its own last order's
/// (`prepare`'s default): a store whose export ended months early was
/// trained on as 100 % churned, without a word (found by a data probe).
/// One warning (and report note) per store that misses at least
/// [`SHORT_WINDOW_SHARE`] of the window, the first [`SHOWN_STORES`] named.
fn short_stores(
    src: &OrdersSource,
    stores: &[&str],
    lasts: &BTreeMap<String, i64>,
    cfg: &ChurnConfig,
    id: &impl Fn(usize) -> String,
) -> Vec<String> {
    let date = orders::derive::format_date;
    let window_end = cfg
        .cutoff
        .saturating_add(i64::from(cfg.churn_window_days) * SECONDS_PER_DAY);
    // The latest cutoff whose window every kept store's export covers.
    let covered = stores
        .iter()
        .filter_map(|s| lasts.get(*s))
        .min()
        .map(|&last| {
            (last.div_euclid(SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY
                - i64::from(cfg.churn_window_days) * SECONDS_PER_DAY
        });
    let mut notes = Vec::new();
    for (k, store) in stores.iter().enumerate() {
        let Some(&last) = lasts.get(*store) else {
            continue;
        };
        // The day of the last order is covered; a window missed by a few
        // days (stores whose last day was quiet) is not worth a warning.
        let covered_to = (last.div_euclid(SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY;
        let missed = (window_end - covered_to) as f64 / (window_end - cfg.cutoff).max(1) as f64;
        if last >= cfg.cutoff && missed < SHORT_WINDOW_SHARE {
            continue;
        }
        let what = if last < cfg.cutoff {
            "no order of it falls after the cutoff, so every one of its customers is labelled \
             churned"
                .to_string()
        } else {
            "a customer of it who bought again after its export ends looks churned".to_string()
        };
        let note = format!(
            "{}: store `{}` ({}): its orders end {}, before the churn window after the cutoff \
             {} ({} days) closes on {}: {what}. Its own agent would take its own last order's \
             cutoff; --cutoff {} (or earlier) gives a window every store's export covers",
            src.path.display(),
            store.chars().take(40).collect::<String>(),
            id(k),
            date(last),
            date(cfg.cutoff),
            cfg.churn_window_days,
            date(window_end),
            covered.map_or_else(|| "?".into(), date),
        );
        tracing::warn!("{note}");
        if notes.len() < SHOWN_STORES {
            notes.push(note);
        }
    }
    notes
}

/// A churn model learns from the orders before the cutoff: refuses an
/// export with none, saying where the cutoff fell and how to move it
/// (otherwise every store is left out, or zero customers are dealt).
fn no_history_check(src: &OrdersSource, rows: &[Order], cfg: &ChurnConfig) -> anyhow::Result<()> {
    let Some((first, last)) = orders::time_span(rows) else {
        bail!("{}: no orders to learn from", src.path.display());
    };
    if first < cfg.cutoff {
        return Ok(());
    }
    let date = orders::derive::format_date;
    let how = match src.cutoff {
        Some(_) => "--cutoff".to_string(),
        None => format!(
            "the day after the last order minus --churn-window-days {}",
            cfg.churn_window_days
        ),
    };
    bail!(
        "{}: no order falls before the churn cutoff {} ({how}), so no customer has a history \
         to learn from; the orders run from {} to {} ({}): give a --cutoff between those \
         dates, or a --churn-window-days shorter than the span",
        src.path.display(),
        date(cfg.cutoff),
        date(first),
        date(last),
        match (last - first).div_euclid(SECONDS_PER_DAY) + 1 {
            1 => "1 day".to_string(),
            n => format!("{n} days"),
        },
    )
}

/// A churn label is "no order within the window after the cutoff": with no
/// order after the cutoff every customer is labelled churned, and a churn
/// model has nothing to learn or to be measured on; refused, with the
/// latest cutoff that works. A window the export only partly covers is a
/// warning for the report (a customer who came back later looks churned),
/// returned: it went to the log alone, which `-q` and the report dropped.
fn no_label_check(
    src: &OrdersSource,
    rows: &[Order],
    cfg: &ChurnConfig,
) -> anyhow::Result<Option<String>> {
    use orders::derive::LabelCoverage;
    let Some((first, last)) = orders::time_span(rows) else {
        return Ok(None);
    };
    let date = orders::derive::format_date;
    let window = cfg.churn_window_days;
    let fix = match LabelCoverage::latest_cutoff(first, last, window) {
        Some(latest) => format!(
            "give a --cutoff of {} or earlier (the last order minus --churn-window-days {window})",
            date(latest)
        ),
        None => format!(
            "the export spans {} days, fewer than the --churn-window-days {window}: shorten the \
             window",
            (last - first).div_euclid(SECONDS_PER_DAY)
        ),
    };
    match LabelCoverage::of(last, cfg.cutoff, window) {
        LabelCoverage::Covered => Ok(None),
        LabelCoverage::Nothing => bail!(
            "{}: no order falls after the churn cutoff {} (the orders run from {} to {}), so \
             every customer would be labelled churned and a churn model has nothing to learn \
             or to be measured on; {fix}",
            src.path.display(),
            date(cfg.cutoff),
            date(first),
            date(last)
        ),
        LabelCoverage::Partial { days } => Ok(Some(format!(
            "warning: {}: the orders end {}, {days} of the {window} days of the churn window \
             after the cutoff {}: a customer who came back later is labelled churned; {fix}",
            src.path.display(),
            date(last),
            date(cfg.cutoff)
        ))),
    }
}

/// Labels each customer 1 when their last order is more than `window_days`
/// before the cutoff (recency, the first feature), else 0: with the cutoff
/// just after the export's last order, the churn label at the cutoff
/// `window_days` earlier, for a customer who had bought by then; one who
/// first bought later is active.
fn relabel_lapsed(features: &mut TabularDataset, window_days: u32) {
    let window = window_days as f32;
    for (y, row) in features.y.iter_mut().zip(features.x.rows()) {
        *y = if row[0] > window { 1.0 } else { 0.0 };
    }
}

/// Builds the merchants of an experiment on orders data.
pub fn build(
    task: TaskChoice,
    src: &OrdersSource,
    n: usize,
    partitioner: Partitioner,
    mf: MfHyper,
    factors: usize,
    seed: u64,
) -> anyhow::Result<Population> {
    let (rows, mut cfg, mut notes) = src.read_noting()?;
    let segments = matches!(task, TaskChoice::Segments(_));
    if (task.is_mf() || segments) && src.cutoff.is_none() {
        // A recommender learns from every order: the default cutoff (the last
        // order minus the churn window) is a churn label's, and would hide
        // the latest purchases, the ones leave-last-out tests on. Segments
        // describe each customer's whole history, as the agent's `segments`
        // does (the churn cutoff left the last 90 days and the customers who
        // first bought in them out, unsaid). An explicit `--cutoff` still
        // cuts the history.
        let last = rows.iter().map(|o| o.timestamp).max().unwrap_or(0);
        cfg = ChurnConfig::new(last.saturating_add(1), cfg.churn_window_days);
        if segments {
            // After the last order no one buys: every label would read
            // "churned" (a report showed churn rate 1.000 for every segment).
            notes.push(format!(
                "{}: a segment's churn rate is the share of its customers with no order in the \
                 export's last {} days (--churn-window-days): the churn label at the cutoff \
                 that many days before its end",
                src.path.display(),
                cfg.churn_window_days
            ));
        }
    } else if segments {
        notes.push(format!(
            "{}: segments describe the orders before the cutoff {} (--cutoff)",
            src.path.display(),
            orders::derive::format_date(cfg.cutoff)
        ));
    }
    let cfg = cfg;
    // Segments over the whole history label each customer "lapsed" instead.
    let lapsed_after = (segments && src.cutoff.is_none()).then_some(cfg.churn_window_days);
    if !task.is_mf() {
        no_history_check(src, &rows, &cfg)?;
    }
    if task.is_churn() {
        notes.extend(no_label_check(src, &rows, &cfg)?);
    }
    let derive = |rows: &[Order]| {
        let mut p = orders::derive(rows, &cfg)
            .with_context(|| format!("deriving {}", src.path.display()))?;
        if let Some(window) = lapsed_after {
            relabel_lapsed(&mut p.features, window);
        }
        anyhow::Ok(p)
    };
    let id = |k: usize| format!("m{k:04}");
    // Natural: one merchant per store, each deriving from its own orders.
    let stores: Option<Vec<Prepared>> = if partitioner == Partitioner::Natural {
        let Some(col) = &src.mapping().merchant else {
            bail!(
                "the `natural` partitioner needs the orders' merchant column: give \
                 --merchant-col (`merchant` in the mapping) for {}",
                src.path.display()
            );
        };
        let mut by_store: BTreeMap<&str, Vec<Order>> = BTreeMap::new();
        for o in &rows {
            let store = o.merchant.as_deref().unwrap_or("");
            by_store.entry(store).or_default().push(o.clone());
        }
        if let Some(blank) = by_store.get("") {
            tracing::warn!(
                "{}: {} order lines have a blank `{col}` cell; together they make one more \
                 store, named \"\": fill the column or leave those lines out",
                src.path.display(),
                blank.len()
            );
        }
        let lasts: BTreeMap<String, i64> = by_store
            .iter()
            .filter_map(|(store, rows)| {
                let last = rows.iter().map(|o| o.timestamp).max()?;
                Some((store.to_string(), last))
            })
            .collect();
        let mut out = Vec::new();
        let mut names = Vec::new();
        for (store, rows) in by_store {
            let p = derive(&rows)?;
            if p.features.is_empty() {
                tracing::warn!(store, column = %col, "store has no customers before the cutoff; left out");
            } else {
                out.push(p);
                names.push(store);
            }
        }
        if out.is_empty() {
            bail!(
                "{}: no store has customers before the cutoff",
                src.path.display()
            );
        }
        if task.is_churn() {
            notes.extend(short_stores(src, &names, &lasts, &cfg, &id));
        }
        // Whether --merchants was given is the settings' to say (they warn
        // that it is ignored); here only the count the export makes.
        notes.push(format!(
            "{}: --partition natural makes one merchant per store: {} merchants, numbered in \
             the stores' sorted order ({})",
            src.path.display(),
            out.len(),
            store_names(&names, &id)
        ));
        Some(out)
    } else {
        None
    };
    match task {
        TaskChoice::ChurnLr
        | TaskChoice::ChurnMlp { .. }
        | TaskChoice::ChurnGbdt
        | TaskChoice::Segments(_) => {
            let model = task.churn_model(FEATURE_NAMES.len());
            // Every customer with one label: nothing to learn or measure.
            let one_label = |labels: Vec<f32>| -> anyhow::Result<()> {
                let span = orders::time_span(&rows).unwrap_or_default();
                match orders::derive::one_label_note(
                    labels,
                    span,
                    cfg.cutoff,
                    cfg.churn_window_days,
                ) {
                    Some(note) if task.is_churn() => bail!(
                        "{}: {note} (--cutoff, --churn-window-days)",
                        src.path.display()
                    ),
                    _ => Ok(()),
                }
            };
            let holdout = if task.is_churn() { HOLDOUT } else { 0.0 };
            let split_local = |k: usize, part: TabularDataset| {
                let y = part.y.as_slice().expect("contiguous labels").to_vec();
                // Segments describe every customer in the export's order:
                // nothing is held out.
                let (tr, va) = split::merchant_train_test(&y, holdout, seed, &id(k));
                LocalData {
                    merchant_id: id(k),
                    churn: Some(ChurnData {
                        train: part.select(&tr),
                        valid: part.select(&va),
                    }),
                    ..Default::default()
                }
            };
            let merchants = match stores {
                Some(stores) => {
                    one_label(
                        stores
                            .iter()
                            .flat_map(|p| p.features.y.iter().copied())
                            .collect(),
                    )?;
                    stores
                        .into_iter()
                        .enumerate()
                        .map(|(k, p)| split_local(k, p.features))
                        .collect()
                }
                None => {
                    let all = derive(&rows)?.features;
                    one_label(all.y.to_vec())?;
                    let labels: Vec<u32> = all.y.iter().map(|&y| y as u32).collect();
                    partitioner
                        .deal(&labels, None, n, seed)?
                        .into_iter()
                        .enumerate()
                        .map(|(k, part)| split_local(k, all.select(&part)))
                        .collect()
                }
            };
            Ok(Population {
                merchants,
                model,
                notes,
            })
        }
        TaskChoice::Mf | TaskChoice::MfImplicit | TaskChoice::MfIals => {
            let implicit = task.is_implicit_mf();
            if src.mapping().item.is_none() {
                bail!(
                    "task `{}` needs interactions: map the item column of {} (--item-col)",
                    task.name(),
                    src.path.display()
                );
            }
            if !implicit && src.mapping().rating.is_none() {
                bail!(
                    "task `mf` predicts explicit ratings: map the rating column of {} \
                     (--rating-col), or run `mf-implicit` on purchases",
                    src.path.display()
                );
            }
            let split_rows = |rows: &[Interaction]| {
                if implicit {
                    movielens::leave_last_out(rows)
                } else {
                    movielens::random_split(rows, HOLDOUT, seed)
                }
            };
            // Per merchant: (train, test) interactions.
            let parts: Vec<(Vec<Interaction>, Vec<Interaction>)> = match stores {
                Some(stores) => stores.iter().map(|p| split_rows(&p.interactions)).collect(),
                None => {
                    let all = derive(&rows)?.interactions;
                    let (train, test) = split_rows(&all);
                    let users: Vec<String> = all
                        .iter()
                        .map(|r| r.user.clone())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let labels = super::popularity_buckets(&all, &users);
                    partitioner
                        .deal(&labels, None, n, seed)?
                        .iter()
                        .map(|part| {
                            let set: BTreeSet<String> =
                                part.iter().map(|&u| users[u].clone()).collect();
                            (
                                movielens::rows_of(&train, &set),
                                movielens::rows_of(&test, &set),
                            )
                        })
                        .collect()
                }
            };
            let all: Vec<Interaction> = parts
                .iter()
                .flat_map(|(a, b)| a.iter().chain(b))
                .cloned()
                .collect();
            if all.is_empty() {
                bail!("{}: no interactions before the cutoff", src.path.display());
            }
            let listed = Catalogue::from_interactions(&all);
            let catalogue: &dyn ItemIndex = match &src.hash_items {
                Some(h) => h,
                None => &listed,
            };
            // Hashed rows too few for the items: many items share a row,
            // and a ranking cannot tell them apart (one row: every item ties).
            let (items, rows) = (listed.len() as f64, catalogue.len() as f64);
            let shared = 1.0 - (-items / rows).exp();
            if src.hash_items.is_some() && shared > 0.1 {
                notes.push(format!(
                    "{}: --hash-items {rows} for {items} distinct items: about {:.0} % of the items \
                     share a row with another, and the figures rank rows, not items (give several \
                     times as many rows as items)",
                    src.path.display(),
                    100.0 * shared
                ));
            }
            let merchants = parts
                .iter()
                .enumerate()
                .map(|(k, (train, test))| LocalData {
                    merchant_id: id(k),
                    mf: Some(super::with_validation(
                        train,
                        test,
                        catalogue,
                        implicit,
                        true,
                        seed,
                        &id(k),
                    )),
                    ..Default::default()
                })
                .collect();
            Ok(Population {
                merchants,
                model: super::mf_model(implicit, catalogue.len(), factors, mf),
                notes,
            })
        }
        TaskChoice::Noop(_) => bail!("task `{}` takes no data", task.name()),
        TaskChoice::Rules(_) => bail!("task `{}` runs through `rules::run`", task.name()),
    }
}

/// Every merchant's raw orders, for analyses that work on baskets: one
/// merchant per store with `natural` (needs the merchant column), otherwise
/// the export's customers dealt iid into `n` merchants (seeded).
pub fn merchant_orders(
    src: &OrdersSource,
    n: usize,
    partitioner: Partitioner,
    seed: u64,
) -> anyhow::Result<Vec<(String, Vec<Order>)>> {
    let (rows, _) = src.read()?;
    if partitioner == Partitioner::Natural {
        if src.mapping().merchant.is_none() {
            bail!(
                "the `natural` partitioner needs the orders' merchant column: give \
                 --merchant-col (`merchant` in the mapping) for {}",
                src.path.display()
            );
        }
        let mut by_store: BTreeMap<String, Vec<Order>> = BTreeMap::new();
        for o in rows {
            by_store
                .entry(o.merchant.clone().unwrap_or_default())
                .or_default()
                .push(o);
        }
        return Ok(by_store.into_iter().collect());
    }
    if partitioner != Partitioner::Iid {
        bail!("baskets are dealt to merchants `iid` or `natural` (by store)");
    }
    let customers: Vec<&str> = rows
        .iter()
        .map(|o| o.customer.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let index: Vec<usize> = (0..customers.len()).collect();
    let mut owner = BTreeMap::new();
    for (m, part) in split::iid_partition(&index, n, seed)
        .into_iter()
        .enumerate()
    {
        for c in part {
            owner.insert(customers[c].to_string(), m);
        }
    }
    let mut out: Vec<(String, Vec<Order>)> =
        (0..n).map(|k| (format!("m{k:04}"), Vec::new())).collect();
    for o in rows {
        let m = owner[&o.customer];
        out[m].1.push(o);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
