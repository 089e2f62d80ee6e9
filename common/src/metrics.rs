//! Evaluation metrics for the churn classifiers and the recommenders.
//!
//! All functions take plain slices so that any model can use them, and return
//! `f64` so that sums over many merchants stay precise. [`histogram`] holds
//! the federated AUC and PR-AUC: per-class score histograms summed across
//! merchants. [`FigureWeights`] and [`PooledMean`] pool the other figures:
//! each merchant's figure weighted by the rows it is a mean over.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod histogram;

/// Area under the ROC curve, computed from ranks with ties averaged
/// (equivalent to the Mann–Whitney U statistic). Returns 0.5 when only one
/// class is present, since the curve is then undefined.
pub fn auc(labels: &[f32], scores: &[f32]) -> f64 {
    let n = labels.len().min(scores.len());
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0f64; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        // Ranks are 1-based; tied scores share the mean of their ranks.
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = mean_rank;
        }
        i = j + 1;
    }
    let pos = labels[..n].iter().filter(|&&y| y > 0.5).count() as f64;
    let neg = n as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    let rank_sum: f64 = (0..n).filter(|&k| labels[k] > 0.5).map(|k| ranks[k]).sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Mean binary cross-entropy, with probabilities clipped to [1e-7, 1 − 1e-7].
pub fn log_loss(labels: &[f32], probs: &[f32]) -> f64 {
    let n = labels.len().min(probs.len());
    if n == 0 {
        return 0.0;
    }
    let eps = 1e-7f64;
    let total: f64 = labels
        .iter()
        .zip(probs)
        .map(|(&y, &p)| {
            let p = f64::from(p).clamp(eps, 1.0 - eps);
            if y > 0.5 { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum();
    total / n as f64
}

/// Confusion counts at a decision threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Confusion {
    /// True positives.
    pub tp: usize,
    /// False positives.
    pub fp: usize,
    /// True negatives.
    pub tn: usize,
    /// False negatives.
    pub fn_: usize,
}

impl Confusion {
    /// Counts predictions `prob >= threshold` against labels.
    pub fn at(labels: &[f32], probs: &[f32], threshold: f32) -> Self {
        let mut c = Confusion::default();
        for (&y, &p) in labels.iter().zip(probs) {
            match (y > 0.5, p >= threshold) {
                (true, true) => c.tp += 1,
                (false, true) => c.fp += 1,
                (false, false) => c.tn += 1,
                (true, false) => c.fn_ += 1,
            }
        }
        c
    }

    /// Fraction of correct predictions.
    pub fn accuracy(&self) -> f64 {
        let n = self.tp + self.fp + self.tn + self.fn_;
        if n == 0 {
            0.0
        } else {
            (self.tp + self.tn) as f64 / n as f64
        }
    }

    /// tp / (tp + fp), 0 when nothing was predicted positive.
    pub fn precision(&self) -> f64 {
        let d = self.tp + self.fp;
        if d == 0 {
            0.0
        } else {
            self.tp as f64 / d as f64
        }
    }

    /// tp / (tp + fn), 0 when there are no positives.
    pub fn recall(&self) -> f64 {
        let d = self.tp + self.fn_;
        if d == 0 {
            0.0
        } else {
            self.tp as f64 / d as f64
        }
    }
}

/// Root mean squared error.
pub fn rmse(truth: &[f32], pred: &[f32]) -> f64 {
    let n = truth.len().min(pred.len());
    if n == 0 {
        return 0.0;
    }
    let se: f64 = truth
        .iter()
        .zip(pred)
        .map(|(&t, &p)| (f64::from(t) - f64::from(p)).powi(2))
        .sum();
    (se / n as f64).sqrt()
}

/// Whether figure `name` is a root-mean-square error (`rmse`, `val_rmse`),
/// which pools over merchants as the root of the weighted mean of squares.
fn is_root_mean_square(name: &str) -> bool {
    name == "rmse" || name.ends_with("_rmse")
}

/// What one merchant adds, times its weight, to the pooled figure `name`:
/// the value, or its square for an RMSE ([`pooled`]).
pub fn pooling_term(name: &str, value: f64) -> f64 {
    if is_root_mean_square(name) {
        value * value
    } else {
        value
    }
}

/// Whether figure `name` is measured on a merchant's validation slice
/// (`val_auc`, `val_hr@10`, `val_rmse`, …): the figures model selection and
/// early stopping read, which pool by [`FigureWeights::validation`].
pub fn is_validation(name: &str) -> bool {
    name.starts_with("val_")
}

/// The rows one merchant's figures are means over, which are their weights
/// when the federation pools them ([`PooledMean`]).
///
/// An evaluation measures two sets of rows: the held-out rows (`hr@10`,
/// `auc`, `rmse`, …) and the validation slice ([`is_validation`] figures),
/// and a merchant's two counts need not be in proportion (a store with 46
/// test customers may have 41 validation customers, none of whom it hits).
/// Weighting the validation figures by the held-out count made the
/// federation's `val_hr@10` differ from validation hits over validation
/// users (0.0722 against 8/109 = 0.0734 on three grocery stores), and a
/// merchant without validation rows could still weigh on them. Each figure
/// therefore takes the weight of its own rows: pooled, `val_hr@10` is the
/// federation's validation hits over its validation users, and `val_rmse`
/// the RMSE of all its validation ratings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FigureWeights {
    /// The example weight, behind every figure but the validation ones:
    /// the held-out rows of an evaluation, the training rows of a training
    /// task (1 where the count is private: DP, secure aggregation).
    pub examples: f64,
    /// The validation rows behind the [`is_validation`] figures (0 when
    /// the merchant has no validation slice and reports none).
    pub validation: f64,
}

impl FigureWeights {
    /// The weight of figure `name`.
    pub fn of(&self, name: &str) -> f64 {
        if is_validation(name) {
            self.validation
        } else {
            self.examples
        }
    }
}

/// The federation's figures from the merchants' own: each figure the
/// weighted mean over the merchants that reported it, with the weight of its
/// rows ([`FigureWeights`]), and an RMSE the root of the weighted mean of
/// squares ([`pooled`]). A figure whose weights sum to 0 (no merchant
/// measured it on any row) is left out rather than read as 0.
#[derive(Debug, Clone, Default)]
pub struct PooledMean {
    /// Per figure: the weighted sum of [`pooling_term`]s and the weight.
    sums: BTreeMap<String, (f64, f64)>,
}

impl PooledMean {
    /// Adds one merchant's `metrics`, measured on `weights`' rows.
    pub fn add(&mut self, metrics: &BTreeMap<String, f64>, weights: FigureWeights) {
        for (k, v) in metrics {
            let w = weights.of(k);
            let (sum, total) = self.sums.entry(k.clone()).or_default();
            *sum += pooling_term(k, *v) * w;
            *total += w;
        }
    }

    /// The pooled figures.
    pub fn mean(self) -> BTreeMap<String, f64> {
        self.sums
            .into_iter()
            .filter(|(_, (_, w))| *w > 0.0)
            .map(|(k, (sum, w))| {
                let v = pooled(&k, sum / w);
                (k, v)
            })
            .collect()
    }
}

/// The pooled figure `name` from the weighted mean of the merchants'
/// [`pooling_term`]s: that mean, or its root for an RMSE, which is then the
/// RMSE of every merchant's held-out predictions together when the weights
/// are their held-out counts. The weighted mean of the merchants' RMSEs sat
/// below it (0.8610 against 0.8619 on the demo), beside a centralised RMSE
/// computed over all rows (found by a researcher probe).
pub fn pooled(name: &str, mean_of_terms: f64) -> f64 {
    if is_root_mean_square(name) {
        mean_of_terms.sqrt()
    } else {
        mean_of_terms
    }
}

#[cfg(test)]
mod tests {
    /// Two merchants' RMSEs pool as the RMSE of their predictions together.
    #[test]
    fn rmses_pool_as_the_rmse_of_every_prediction() {
        let (truth, pred) = ([1.0f32, 2.0, 3.0, 4.0, 5.0], [1.5f32, 2.0, 2.0, 4.0, 3.0]);
        let a = super::rmse(&truth[..2], &pred[..2]);
        let b = super::rmse(&truth[2..], &pred[2..]);
        let mean =
            (2.0 * super::pooling_term("rmse", a) + 3.0 * super::pooling_term("rmse", b)) / 5.0;
        let all = super::rmse(&truth, &pred);
        assert!((super::pooled("rmse", mean) - all).abs() < 1e-12);
        assert!((super::pooled("val_rmse", mean) - all).abs() < 1e-12);
        assert_eq!(super::pooled("auc", 0.7), 0.7);
        assert_eq!(super::pooling_term("hr@10", 0.3), 0.3);
    }

    /// Validation hit rates pool as the federation's validation hits over
    /// its validation users, not weighted by the test users (the three
    /// grocery stores of the probe: 0/41, 4/39 and 4/29 validation hits,
    /// 46, 40 and 32 test users, read 0.0722 instead of 8/109); a merchant
    /// without validation rows does not dilute them, and the test figures
    /// keep the test weights.
    #[test]
    fn validation_figures_pool_over_validation_rows() {
        let stores = [(0.0, 41.0, 46.0), (4.0, 39.0, 40.0), (4.0, 29.0, 32.0)];
        let mut pool = super::PooledMean::default();
        for (hits, users, tests) in stores {
            let metrics = [
                ("val_hr@10".to_string(), hits / users),
                ("hr@10".into(), 0.5),
            ];
            let weights = super::FigureWeights {
                examples: tests,
                validation: users,
            };
            pool.add(&metrics.into_iter().collect(), weights);
        }
        // A merchant with test rows and no validation slice.
        let no_slice = super::FigureWeights {
            examples: 10.0,
            validation: 0.0,
        };
        pool.add(
            &[("hr@10".to_string(), 1.0)].into_iter().collect(),
            no_slice,
        );
        let pooled = pool.mean();
        assert!(
            (pooled["val_hr@10"] - 8.0 / 109.0).abs() < 1e-12,
            "{pooled:?}"
        );
        assert!(
            (pooled["hr@10"] - (59.0 + 10.0) / 128.0).abs() < 1e-12,
            "{pooled:?}"
        );
    }

    /// A figure measured on no row at all is absent, not a pooled 0.
    #[test]
    fn a_figure_of_no_rows_is_left_out() {
        let mut pool = super::PooledMean::default();
        let metrics = [("val_rmse".to_string(), 0.0)].into_iter().collect();
        pool.add(&metrics, super::FigureWeights::default());
        assert!(pool.mean().is_empty());
    }

    use super::*;

    #[test]
    fn auc_of_perfect_and_inverted_rankings() {
        let y = [0.0, 0.0, 1.0, 1.0];
        assert_eq!(auc(&y, &[0.1, 0.2, 0.8, 0.9]), 1.0);
        assert_eq!(auc(&y, &[0.9, 0.8, 0.2, 0.1]), 0.0);
    }

    #[test]
    fn auc_averages_ties() {
        // sklearn.metrics.roc_auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.7]) == 0.875
        let v = auc(&[0.0, 1.0, 0.0, 1.0], &[0.5, 0.5, 0.2, 0.7]);
        assert!((v - 0.875).abs() < 1e-12);
    }

    #[test]
    fn log_loss_matches_hand_computation() {
        let v = log_loss(&[1.0, 0.0], &[0.8, 0.4]);
        let expect = (-(0.8f64.ln()) - (0.6f64.ln())) / 2.0;
        assert!((v - expect).abs() < 1e-6);
    }

    #[test]
    fn confusion_rates() {
        let c = Confusion::at(&[1.0, 1.0, 0.0, 0.0], &[0.9, 0.3, 0.6, 0.1], 0.5);
        assert_eq!(
            c,
            Confusion {
                tp: 1,
                fp: 1,
                tn: 1,
                fn_: 1
            }
        );
        assert_eq!(c.accuracy(), 0.5);
        assert_eq!(c.precision(), 0.5);
        assert_eq!(c.recall(), 0.5);
    }

    #[test]
    fn rmse_of_known_errors() {
        assert!((rmse(&[1.0, 2.0], &[2.0, 4.0]) - (2.5f64).sqrt()).abs() < 1e-12);
    }
}
