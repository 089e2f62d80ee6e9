//! The merchant's own data, from its orders export to everything fedcart
//! trains on: interactions for the recommenders, per-customer RFM features
//! for the churn models, and churn labels.
//!
//! The pipeline has three steps, each its own module:
//! - [`mapping`]: which column of the export is which field, and how
//!   timestamps are written;
//! - [`read`]: the export → `Vec<Order>`, every bad row reported with the
//!   file, line and column, failing or skipping (and counting) per policy;
//! - [`derive`]: orders + a cutoff date → interactions (orders before the
//!   cutoff), RFM features and churn labels (no purchase within the churn
//!   window after the cutoff);
//! - [`export`]: the derived data as CSV for the merchant to inspect.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod derive;
pub mod export;
pub mod mapping;
pub mod read;

pub use derive::{ChurnConfig, Prepared, derive};
pub use mapping::{AmountIs, DecimalMark, Delimiter, OrdersMapping, TimestampFormat};
pub use read::{id_key, read_orders, read_orders_from};

/// One order line of the export, after mapping and validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The merchant's customer id.
    pub customer: String,
    /// Catalogue item id, when the export has an item column.
    pub item: Option<String>,
    /// Unix seconds (UTC).
    pub timestamp: i64,
    /// Units bought (1 when the export has no quantity column); never negative.
    pub quantity: f32,
    /// Line value; never negative.
    pub amount: f32,
    /// Explicit rating, when mapped.
    pub rating: Option<f32>,
    /// Merchant or store, when mapped.
    pub merchant: Option<String>,
}

/// The times of the first and last orders (Unix seconds), or `None` when
/// there is no order.
pub fn time_span(orders: &[Order]) -> Option<(i64, i64)> {
    orders.iter().fold(None, |span, o| match span {
        None => Some((o.timestamp, o.timestamp)),
        Some((first, last)) => Some((first.min(o.timestamp), last.max(o.timestamp))),
    })
}

/// What to do with a row that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BadRowPolicy {
    /// Stop at the first bad row with an error naming it.
    #[default]
    Fail,
    /// Leave the row out and count it under its reason, unless one reason
    /// that points to a setting (a date layout, a decimal mark, the field
    /// count) leaves out more than a tenth of the rows: then the read fails
    /// with [`OrdersError::TooManySkipped`].
    Skip,
    /// [`BadRowPolicy::Skip`] without that limit.
    SkipAll,
}

impl BadRowPolicy {
    /// Whether bad rows are left out (and counted) rather than refused.
    pub fn skips(self) -> bool {
        self != Self::Fail
    }
}

impl std::str::FromStr for BadRowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail" => Ok(Self::Fail),
            "skip" => Ok(Self::Skip),
            "skip-all" | "skip_all" => Ok(Self::SkipAll),
            other => Err(format!(
                "bad-row policy must be `fail`, `skip` or `skip-all`, not `{other}`"
            )),
        }
    }
}

/// Why a data row was rejected; the key under which skipped rows are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRowReason {
    /// The row has more or fewer fields than the header.
    FieldCount,
    /// The customer id is blank.
    BlankCustomer,
    /// The item id is blank (no longer a bad row: such a line counts
    /// toward its customer's features, not the interactions; kept so that
    /// older summaries read).
    BlankItem,
    /// The timestamp does not parse in the mapped format.
    BadTimestamp,
    /// The quantity is not a finite number.
    BadQuantity,
    /// The quantity is below zero in a form that is not a return's `-2`
    /// (`(2)`, `2-`): a plain negative quantity is a return, netted against
    /// the purchase it returns.
    NegativeQuantity,
    /// The amount is not a finite number.
    BadAmount,
    /// The amount is below zero.
    NegativeAmount,
    /// The rating is not a finite number.
    BadRating,
    /// The merchant (store) cell is blank.
    BlankMerchant,
}

impl BadRowReason {
    /// The snake_case name used in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FieldCount => "field_count",
            Self::BlankCustomer => "blank_customer",
            Self::BlankItem => "blank_item",
            Self::BadTimestamp => "bad_timestamp",
            Self::BadQuantity => "bad_quantity",
            Self::NegativeQuantity => "negative_quantity",
            Self::BadAmount => "bad_amount",
            Self::NegativeAmount => "negative_amount",
            Self::BadRating => "bad_rating",
            Self::BlankMerchant => "blank_merchant",
        }
    }

    /// Whether rows left out for this reason point to a setting (a date
    /// layout, a decimal mark, the delimiter) rather than to lines that are
    /// bad on their own (a guest order without a customer id, a custom line
    /// without an item): [`BadRowPolicy::Skip`] refuses a read where one
    /// such reason leaves out more than a tenth of the rows.
    pub fn points_to_a_setting(self) -> bool {
        matches!(
            self,
            Self::FieldCount
                | Self::BadTimestamp
                | Self::BadQuantity
                | Self::BadAmount
                | Self::BadRating
        )
    }
}

/// Errors of the orders pipeline. Every data error names the file and the
/// 1-based line, and the column when one is at fault.
#[derive(Debug, Error)]
pub enum OrdersError {
    /// The file could not be opened or read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A mapped column is not in the header.
    #[error(
        "{file}: line 1: missing column `{column}`, the mapping's `{key}` (header has: {header}){hint}"
    )]
    MissingColumn {
        /// The file.
        file: PathBuf,
        /// The mapped column name that was not found.
        column: String,
        /// The mapping's key that names it (`customer`, `amount`, …).
        key: &'static str,
        /// The header fields as read, each in backticks.
        header: String,
        /// A hint when the delimiter looks wrong (empty otherwise).
        hint: String,
    },
    /// A field of a data row is unusable.
    #[error("{file}: line {line}, column `{column}`: {message}")]
    Cell {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: u64,
        /// Header name of the column.
        column: String,
        /// Why the row was rejected.
        reason: BadRowReason,
        /// What was wrong, quoting the value.
        message: String,
    },
    /// A row's structure is broken (wrong field count, bad quoting or encoding).
    #[error("{file}: line {line}: {message}")]
    Row {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: u64,
        /// What was wrong.
        message: String,
    },
    /// The mapping cannot read this export (a setting needs a column the
    /// mapping does not name).
    #[error("{file}: {message}")]
    Mapping {
        /// The file.
        file: PathBuf,
        /// What is missing, naming the keys.
        message: String,
    },
    /// The file has no header line.
    #[error("{file}: empty file (no header line)")]
    Empty {
        /// The file.
        file: PathBuf,
    },
    /// The bad-row policy `skip` left every row out: what was wrong with
    /// the first is what to fix (a decimal comma, a date layout), not the
    /// churn window or the file being empty.
    #[error(
        "{file}: every one of its {rows} rows was left out as unusable (the bad-row policy `skip`); the first: {first}"
    )]
    AllSkipped {
        /// The file.
        file: PathBuf,
        /// Rows read.
        rows: u64,
        /// The first row's error, with its line and column.
        first: String,
    },
    /// The bad-row policy `skip` would leave out so many rows for one reason
    /// that points to a setting ([`BadRowReason::points_to_a_setting`]) that
    /// the setting is wrong, not a few lines: half a file left out for its
    /// dates, the other half dated with day and month swapped.
    #[error(
        "{file}: {count} of its {rows} rows would be left out as {reason} (the bad-row policy `skip`): so many point to a setting, not to a few bad lines; the first: {first}{hint}. Fix the setting, or leave such rows out anyway with `--on-bad-row skip-all` (`on_bad_row = \"skip_all\"`)"
    )]
    TooManySkipped {
        /// The file.
        file: PathBuf,
        /// Rows left out for that reason.
        count: u64,
        /// Rows read.
        rows: u64,
        /// The reason (`bad_timestamp`, …).
        reason: &'static str,
        /// The first such row's error, with its line and column.
        first: String,
        /// What a column blank on most of those lines may mean (empty
        /// otherwise).
        hint: String,
    },
    /// The cutoff or window settings are unusable.
    #[error("invalid churn settings: {0}")]
    Config(String),
    /// A customer's derived feature is beyond what the models standardise
    /// (`standardize::MAX_FEATURE_MAGNITUDE`; each cell may be within f32's
    /// range, but their sum or its square is not).
    #[error(
        "customer `{customer}`: {feature} comes to {value:.3e}, beyond ±1e15, the largest feature the models standardise (its square must stay within their 32-bit numbers): check that customer's quantity and amount cells"
    )]
    OutOfRange {
        /// The customer.
        customer: String,
        /// The feature.
        feature: &'static str,
        /// Its value.
        value: f64,
    },
}

/// Counts from reading an export.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadReport {
    /// Data rows seen (header and blank lines excluded).
    pub rows_read: u64,
    /// Rows read as purchases, those later returned whole included (a
    /// return line is counted in [`ReadReport::returns`] or
    /// [`ReadReport::returns_unmatched`], a bad row in
    /// [`ReadReport::skipped`]).
    pub rows_ok: u64,
    /// Rows skipped, by reason (only under [`BadRowPolicy::Skip`] and
    /// [`BadRowPolicy::SkipAll`]).
    pub skipped: BTreeMap<BadRowReason, u64>,
    /// The first few skip messages, so a merchant can see real examples.
    pub examples: Vec<String>,
    /// Order lines dated far outside the rest of the export (a placeholder
    /// such as `1900-01-01`, a mistyped year): what a merchant should check,
    /// naming lines and dates. Such lines are kept, so callers warn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stray_dates: Option<String>,
    /// Amounts read with a decimal point that read as other numbers with a
    /// decimal comma (`1.890`: 1.89 or 1890), in an export no amount of
    /// which settles it: the cell to check and the setting to give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decimal_note: Option<String>,
    /// An amount column named for a price (`UnitPrice`) read as each line's
    /// total, with lines of more than one unit: the setting to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_note: Option<String>,
    /// Customer ids that differ from another only in case, named: read as
    /// different customers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_note: Option<String>,
    /// Return lines (a negative quantity) netted against the customer's
    /// earlier purchases of the item: their units and value come off those
    /// purchases, and a purchase returned whole is left out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub returns: u64,
    /// Return lines with no earlier purchase of the item by the customer in
    /// the export (bought before it starts): left out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub returns_unmatched: u64,
    /// Purchases returned whole, and left out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub returned_whole: u64,
    /// Lines with a blank item id (a gift card, a custom line): they count
    /// toward their customers' features, not toward the interactions.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blank_items: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ReadReport {
    /// What callers warn the merchant about: lines kept that may be read
    /// wrongly ([`ReadReport::stray_dates`], [`ReadReport::decimal_note`]),
    /// and lines netted or left out without being bad rows
    /// ([`ReadReport::returns_note`]).
    pub fn warnings(&self) -> Vec<String> {
        [
            &self.decimal_note,
            &self.amount_note,
            &self.stray_dates,
            &self.case_note,
        ]
        .into_iter()
        .filter_map(|n| n.clone())
        .chain(self.returns_note())
        .collect()
    }

    /// What was netted, kept or left out without being a bad row: returns
    /// and lines without an item, as one sentence (`None` when there were
    /// none). Lines of quantity 0 are kept
    /// as purchases: the bundled grocery log has 1,162 (of sales value 0),
    /// and its reference figures count them.
    pub fn returns_note(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.returns > 0 {
            parts.push(format!(
                "{} return line{} (a negative quantity) netted against the customer's earlier \
                 purchases of the item ({} purchase{} returned whole left out)",
                self.returns,
                if self.returns == 1 { "" } else { "s" },
                self.returned_whole,
                if self.returned_whole == 1 { "" } else { "s" },
            ));
        }
        if self.blank_items > 0 {
            parts.push(format!(
                "{} line{} with a blank item id count toward {} customer's spend and orders, \
                 not toward the recommender's purchases",
                self.blank_items,
                if self.blank_items == 1 { "" } else { "s" },
                if self.blank_items == 1 {
                    "its"
                } else {
                    "their"
                },
            ));
        }
        if self.returns_unmatched > 0 {
            parts.push(format!(
                "{} return line{} with no earlier purchase of the item by the customer in the \
                 export left out",
                self.returns_unmatched,
                if self.returns_unmatched == 1 { "" } else { "s" },
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Total rows skipped.
    pub fn rows_skipped(&self) -> u64 {
        self.skipped.values().sum()
    }
}

#[cfg(test)]
mod tests;
