//! Orders + a cutoff date → what fedcart trains on: interactions for the
//! recommenders, per-customer RFM features and churn labels.
//!
//! Only orders strictly before the cutoff feed the interactions and the
//! features; the churn label of a customer is 1 when they bought nothing in
//! `[cutoff, cutoff + window)`. Customers without orders before the cutoff are
//! not rows (there is nothing to describe them by). Orders on or after the end
//! of the churn window are ignored.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use super::mapping::SECONDS_PER_DAY;
use super::{Order, OrdersError};
use crate::data::interactions::Interaction;
use crate::data::tabular::TabularDataset;

/// Names of the RFM feature columns, in feature order. Durations are in days,
/// rates in purchase occasions per 30 days.
pub const FEATURE_NAMES: [&str; 8] = [
    "recency_days",
    "frequency",
    "monetary",
    "tenure_days",
    "mean_basket_value",
    "mean_gap_days",
    "trend",
    "total_quantity",
];

/// When to cut the history and how to define churn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChurnConfig {
    /// Unix seconds; history is what happened strictly before it.
    pub cutoff: i64,
    /// A customer churned if they bought nothing within this many days after the cutoff.
    pub churn_window_days: u32,
    /// The "recent" part of the recent-vs-past trend: the last this-many days
    /// before the cutoff.
    pub trend_window_days: u32,
}

impl ChurnConfig {
    /// A configuration with the default 90-day trend window.
    pub fn new(cutoff: i64, churn_window_days: u32) -> Self {
        Self {
            cutoff,
            churn_window_days,
            trend_window_days: 90,
        }
    }
}

/// What the merchant can inspect about a derivation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeriveSummary {
    /// The cutoff, as a calendar date (UTC).
    pub cutoff: String,
    /// The churn window in days.
    pub churn_window_days: u32,
    /// Customers with at least one order before the cutoff (feature rows).
    pub customers: usize,
    /// Of those, customers labelled churned.
    pub churned: usize,
    /// `churned / customers`.
    pub label_rate: f64,
    /// Order lines before the cutoff.
    pub orders_before_cutoff: usize,
    /// Order lines within the churn window.
    pub orders_in_window: usize,
    /// Order lines after the churn window (not used).
    pub orders_after_window: usize,
    /// Interactions derived (0 without an item column).
    pub interactions: usize,
    /// Date of the first order in the file.
    pub first_order: Option<String>,
    /// Date of the last order in the file.
    pub last_order: Option<String>,
    /// False when the file ends before the churn window does: labels of 1
    /// may then only mean "not seen yet".
    pub window_covered: bool,
}

/// Everything derived from one orders log.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// One interaction per (customer, item) before the cutoff.
    pub interactions: Vec<Interaction>,
    /// RFM features (columns [`FEATURE_NAMES`]) and churn labels, one row per
    /// customer, ids in sorted order.
    pub features: TabularDataset,
    /// Counts and dates for the merchant's inspection.
    pub summary: DeriveSummary,
}

/// How much of the churn window after `cutoff` an export whose orders run
/// from `first` to `last` (unix seconds) observes. A label is "no order
/// within `window_days` after the cutoff": where the export ends before the
/// window does, a customer who came back later is labelled churned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelCoverage {
    /// The export runs to the window's last day: every label is observed.
    Covered,
    /// The export ends this many whole days into the window.
    Partial {
        /// Days of the window the export covers.
        days: i64,
    },
    /// No order falls after the cutoff: every customer is labelled churned.
    Nothing,
}

impl LabelCoverage {
    /// The coverage of the window after `cutoff` by orders ending at `last`.
    pub fn of(last: i64, cutoff: i64, window_days: u32) -> Self {
        let window_end = cutoff + i64::from(window_days) * SECONDS_PER_DAY;
        if last >= window_end - SECONDS_PER_DAY {
            Self::Covered
        } else if last < cutoff {
            Self::Nothing
        } else {
            Self::Partial {
                days: (last - cutoff).div_euclid(SECONDS_PER_DAY),
            }
        }
    }

    /// The latest cutoff whose labels an export from `first` to `last`
    /// observes (its last order minus the window), or `None` when the export
    /// is no longer than the window and no cutoff would.
    pub fn latest_cutoff(first: i64, last: i64, window_days: u32) -> Option<i64> {
        let cutoff = last - i64::from(window_days) * SECONDS_PER_DAY;
        (cutoff > first).then_some(cutoff)
    }
}

/// What to say when every customer got the same churn label: a churn model
/// then has nothing to learn or to be measured on. Names the export's dates
/// (`span`: first and last order), the cutoff and the window, so that a
/// placeholder date at the end of an export (`9999-12-31`, which drags the
/// default cutoff with it) or a window that does not fit these customers
/// shows. `None` when both labels occur, or there are no customers.
pub fn one_label_note(
    labels: impl IntoIterator<Item = f32>,
    (first, last): (i64, i64),
    cutoff: i64,
    window_days: u32,
) -> Option<String> {
    let (mut churned, mut total) = (0usize, 0usize);
    for y in labels {
        total += 1;
        churned += usize::from(y > 0.5);
    }
    if total == 0 || (churned > 0 && churned < total) {
        return None;
    }
    let what = if churned == total {
        format!(
            "all {total} customers are labelled churned (none ordered in the {window_days} days \
             after the cutoff {})",
            format_date(cutoff)
        )
    } else {
        format!(
            "none of the {total} customers is labelled churned (every one ordered in the \
             {window_days} days after the cutoff {})",
            format_date(cutoff)
        )
    };
    Some(format!(
        "{what}; the orders run from {} to {}: a churn model has nothing to learn. Check the \
         export for a placeholder or mistyped date, or set the cutoff and churn window",
        format_date(first),
        format_date(last)
    ))
}

/// Calendar date `YYYY-MM-DD` of unix seconds (H. Hinnant's `civil_from_days`).
pub fn format_date(ts: i64) -> String {
    let z = ts.div_euclid(SECONDS_PER_DAY) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// What one (customer, item) pair accumulates before the cutoff.
struct PairAgg {
    quantity: f32,
    last: i64,
    /// Position in the export of the line that set `last` (the later line
    /// on equal timestamps): orders the interactions like the file.
    last_line: usize,
    /// The latest rating and when it was given.
    rating: Option<(i64, f32)>,
}

#[derive(Default)]
struct History {
    /// Distinct purchase occasions (order lines sharing a timestamp are one basket).
    occasions: BTreeMap<i64, ()>,
    monetary: f64,
    quantity: f64,
    churned: bool,
}

/// Derives interactions, features and labels from `orders` as of `cfg.cutoff`.
///
/// Interaction values are the latest rating when the export has ratings,
/// otherwise the total quantity bought; the timestamp is the last purchase.
/// Interactions come grouped by customer, each customer's in the order of
/// their last purchase, equal times in the order of the export's lines, so
/// "the latest interaction, ties to the later one" (leave-last-out) is the
/// item on the customer's last order line, as the file tells it.
pub fn derive(orders: &[Order], cfg: &ChurnConfig) -> Result<Prepared, OrdersError> {
    if cfg.churn_window_days == 0 {
        return Err(OrdersError::Config(
            "the churn window must be at least one day".into(),
        ));
    }
    let window_end = cfg.cutoff + i64::from(cfg.churn_window_days) * SECONDS_PER_DAY;
    let mut hist: BTreeMap<&str, History> = BTreeMap::new();
    let mut pairs: BTreeMap<(&str, &str), PairAgg> = BTreeMap::new();
    let (mut before, mut within, mut after) = (0, 0, 0);
    for (line, o) in orders.iter().enumerate() {
        if o.timestamp < cfg.cutoff {
            before += 1;
            let h = hist.entry(&o.customer).or_default();
            h.occasions.insert(o.timestamp, ());
            h.monetary += f64::from(o.amount);
            h.quantity += f64::from(o.quantity);
            if let Some(item) = &o.item {
                let e = pairs.entry((&o.customer, item)).or_insert(PairAgg {
                    quantity: 0.0,
                    last: i64::MIN,
                    last_line: 0,
                    rating: None,
                });
                e.quantity += o.quantity;
                if o.timestamp >= e.last {
                    e.last = o.timestamp;
                    e.last_line = line;
                }
                if let Some(r) = o.rating
                    && e.rating.is_none_or(|(t, _)| o.timestamp >= t)
                {
                    e.rating = Some((o.timestamp, r));
                }
            }
        } else if o.timestamp < window_end {
            within += 1;
        } else {
            after += 1;
        }
    }
    // A customer churned unless they bought within the window.
    for h in hist.values_mut() {
        h.churned = true;
    }
    for o in orders {
        if o.timestamp >= cfg.cutoff
            && o.timestamp < window_end
            && let Some(h) = hist.get_mut(o.customer.as_str())
        {
            h.churned = false;
        }
    }
    let mut pairs: Vec<((&str, &str), PairAgg)> = pairs.into_iter().collect();
    pairs.sort_by_key(|((user, _), agg)| (*user, agg.last, agg.last_line));
    let interactions: Vec<Interaction> = pairs
        .into_iter()
        .map(|((user, item), agg)| Interaction {
            user: user.to_string(),
            item: item.to_string(),
            value: agg.rating.map_or(agg.quantity, |(_, r)| r),
            timestamp: agg.last,
        })
        .collect();
    let n = hist.len();
    let width = FEATURE_NAMES.len();
    let mut x = Vec::with_capacity(n * width);
    let mut y = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let day = SECONDS_PER_DAY as f64;
    let recent_start = cfg.cutoff - i64::from(cfg.trend_window_days) * SECONDS_PER_DAY;
    for (customer, h) in &hist {
        let first = *h.occasions.keys().next().expect("at least one order");
        let last = *h.occasions.keys().next_back().expect("at least one order");
        let freq = h.occasions.len() as f64;
        let tenure = (cfg.cutoff - first) as f64 / day;
        let gap = if freq > 1.0 {
            (last - first) as f64 / day / (freq - 1.0)
        } else {
            // With one purchase the gap is at least the time since it.
            tenure
        };
        let recent = h.occasions.range(recent_start..).count() as f64;
        let past = freq - recent;
        let window = f64::from(cfg.trend_window_days.max(1));
        let recent_rate = recent / window * 30.0;
        // The past rate is taken over at least one trend window, as the
        // recent one is: a first order hours before the window opens would
        // otherwise divide by hours (a loyal grocery customer read -461).
        let past_span = ((recent_start - first) as f64 / day).max(window);
        let past_rate = if past > 0.0 {
            past / past_span * 30.0
        } else {
            0.0
        };
        x.extend([
            (cfg.cutoff - last) as f64 / day,
            freq,
            h.monetary,
            tenure,
            h.monetary / freq,
            gap,
            recent_rate - past_rate,
            h.quantity,
        ]);
        y.push(if h.churned { 1.0f32 } else { 0.0 });
        ids.push(customer.to_string());
    }
    let churned = y.iter().filter(|&&v| v > 0.5).count();
    let first_ts = orders.iter().map(|o| o.timestamp).min();
    let last_ts = orders.iter().map(|o| o.timestamp).max();
    let summary = DeriveSummary {
        cutoff: format_date(cfg.cutoff),
        churn_window_days: cfg.churn_window_days,
        customers: n,
        churned,
        label_rate: if n > 0 {
            churned as f64 / n as f64
        } else {
            0.0
        },
        orders_before_cutoff: before,
        orders_in_window: within,
        orders_after_window: after,
        interactions: interactions.len(),
        first_order: first_ts.map(format_date),
        last_order: last_ts.map(format_date),
        window_covered: last_ts.is_some_and(|t| {
            LabelCoverage::of(t, cfg.cutoff, cfg.churn_window_days) == LabelCoverage::Covered
        }),
    };
    // Cells are checked one by one when read, but their sums are not: five
    // lines of 3.3e38 make an infinite monetary value, which broke training
    // later with advice about the learning rate, and one amount of 1e30 made
    // the statistics step's squares infinite, so the merchant's rows, scaled
    // by the others' spread, wrecked the federated churn model (AUC 0.85 →
    // 0.63 on grocery) with no error. Refused here, naming the customer and
    // the feature.
    let width = FEATURE_NAMES.len();
    if let Some(at) = x.iter().position(|v| {
        !((*v as f32).is_finite()) || v.abs() > crate::data::standardize::MAX_FEATURE_MAGNITUDE
    }) {
        return Err(OrdersError::OutOfRange {
            customer: ids[at / width].clone(),
            feature: FEATURE_NAMES[at % width],
            value: x[at],
        });
    }
    let x: Vec<f32> = x.into_iter().map(|v| v as f32).collect();
    Ok(Prepared {
        interactions,
        features: TabularDataset {
            ids,
            x: Array2::from_shape_vec((n, width), x).expect("n rows of `width` features"),
            y: Array1::from(y),
        },
        summary,
    })
}
