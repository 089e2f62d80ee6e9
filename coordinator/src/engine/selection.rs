//! Model selection over the same merchants: an evaluation is compared with
//! the best one only over the merchants that reported in both.
//!
//! A version's federated validation figure is pooled over whoever reported
//! it. When a merchant drops out of one evaluation (its agent died, its
//! result was rejected), the two figures are over different merchants, and a
//! version can win only because a weaker merchant was missing. Evaluations
//! are not secure (each merchant's figures reach the coordinator), so the
//! engine keeps each merchant's part of the best version's evaluation and,
//! when the merchant sets differ, recomputes both figures over the merchants
//! common to both.

use std::collections::BTreeMap;

use fedcart_common::task::ModelSpec;
use serde::{Deserialize, Serialize};

use super::{BestVersion, Submission};

/// One merchant's part of an evaluation: the selection metric it reported
/// and that figure's weight, and the non-zero entries of its evaluation vector
/// (score histograms, for the families whose metric is pooled from them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MerchantEvaluation {
    /// The weight of the merchant's selection metric: its validation rows
    /// (`metrics::FigureWeights`; a store written before read its example
    /// weight here).
    pub weight: f64,
    /// The selection metric, when the merchant reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `(index, value)` of each non-zero entry of the evaluation vector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vector: Vec<(u32, f64)>,
}

impl MerchantEvaluation {
    /// What model selection keeps of `sub` for `metric`, whose figure
    /// weighs `weight`.
    pub(super) fn of(sub: &Submission, weight: f64, metric: &str) -> Self {
        Self {
            weight,
            value: sub.metrics.get(metric).copied(),
            vector: sub
                .update
                .iter()
                .flat_map(|u| u.values.iter().enumerate())
                .filter(|(_, v)| **v != 0.0)
                .map(|(i, v)| (i as u32, f64::from(*v)))
                .collect(),
        }
    }
}

/// `metric` over `parts` as the evaluation's record computes it: pooled
/// from the summed evaluation vectors when the family pools it, otherwise
/// the mean over the merchants that reported it, weighted by their rows of
/// it (an RMSE as the root of the mean of squares, `metrics::pooled`).
/// `None` when no merchant's part defines it.
pub(super) fn metric_over<'a>(
    model: &ModelSpec,
    metric: &str,
    vector_len: usize,
    parts: impl Iterator<Item = &'a MerchantEvaluation> + Clone,
) -> Option<f64> {
    if vector_len > 0 {
        let mut sum = vec![0.0f64; vector_len];
        for p in parts.clone() {
            for &(i, v) in &p.vector {
                if let Some(s) = sum.get_mut(i as usize) {
                    *s += v;
                }
            }
        }
        if let Some(v) = model.pooled_metrics(&sum).get(metric) {
            return v.is_finite().then_some(*v);
        }
    }
    let term = |v: f64| fedcart_common::metrics::pooling_term(metric, v);
    let (total, weight) = parts
        .filter_map(|p| p.value.map(|v| (term(v) * p.weight, p.weight)))
        .fold((0.0, 0.0), |(s, w), (a, b)| (s + a, w + b));
    (weight > 0.0)
        .then(|| fedcart_common::metrics::pooled(metric, total / weight))
        .filter(|v| v.is_finite())
}

/// The two figures to compare: this evaluation's `value` and the best
/// version's, both over the merchants that reported in both evaluations.
/// When the two evaluations had the same merchants (or the best version's
/// parts are not known: a store written before they were kept), the figures
/// are the records' own; so they are, with nothing better to go on, when
/// the two evaluations share no merchant or the metric is undefined over
/// the common ones.
pub(super) fn comparable(
    model: &ModelSpec,
    vector_len: usize,
    value: f64,
    parts: &BTreeMap<String, MerchantEvaluation>,
    best: &BestVersion,
) -> Comparison {
    let whole = Comparison {
        value,
        best: best.value,
        merchants: None,
    };
    if best.by_merchant.is_empty() || best.by_merchant.keys().eq(parts.keys()) {
        return whole;
    }
    let common: Vec<&String> = parts
        .keys()
        .filter(|m| best.by_merchant.contains_key(*m))
        .collect();
    let over = |of: &BTreeMap<String, MerchantEvaluation>| {
        metric_over(
            model,
            &best.metric,
            vector_len,
            common.iter().map(move |m| &of[*m]),
        )
    };
    match (common.is_empty(), over(parts), over(&best.by_merchant)) {
        (false, Some(value), Some(best)) => Comparison {
            value,
            best,
            merchants: Some(common.len()),
        },
        _ => whole,
    }
}

/// Two validation figures over the same merchants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Comparison {
    /// The evaluated version's.
    pub value: f64,
    /// The best version's.
    pub best: f64,
    /// How many merchants, when fewer than either evaluation had.
    pub merchants: Option<usize>,
}
