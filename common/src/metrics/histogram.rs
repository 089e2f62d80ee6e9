//! Classification metrics that stay right when merchants are skewed: AUC and
//! PR-AUC from per-class score histograms summed across merchants.
//!
//! The example-weighted mean of merchants' AUCs is not the AUC of the
//! federation: a merchant whose customers all stayed has no AUC at all, and
//! ranking quality does not average. Instead each merchant counts its
//! held-out scores in [`SCORE_BINS`] fine bins, one histogram per class
//! ([`score_histogram`]). The histograms are plain sums, so they add up
//! across merchants like any update (and could go through secure
//! aggregation unchanged); the AUC of the summed histogram is the AUC of the
//! pooled predictions up to binning: pairs whose scores share a bin count as
//! ties (half a correctly ordered pair), which moves the AUC by at most half
//! the fraction of positive–negative pairs inside one bin.
//!
//! The bins are even in log-odds, not in probability: where churners are
//! rare a calibrated model scores nearly everyone below 0.01, and bins
//! 0.001 wide in probability put most pairs in the same few bins (an exact
//! AUC of 0.914 read 0.856 in the test below). A log-odds bin is the same
//! relative width at 0.0003 as at 0.3, and order is all AUC reads.

/// Bins per class (32 KiB of counts for the two classes).
pub const SCORE_BINS: usize = 4000;

/// The bins span log-odds `[-LOGIT_RANGE, LOGIT_RANGE]`, probabilities
/// 4.5e-5 to 1 − 4.5e-5, each bin 0.005 wide in log-odds (a 0.5 % change
/// in a small probability, 0.00125 around 0.5, where probability bins were
/// 0.001); scores outside fall in the end bins.
const LOGIT_RANGE: f64 = 10.0;

/// Length of the summed vector: negatives' histogram, then positives'.
pub const HISTOGRAM_LEN: usize = 2 * SCORE_BINS;

/// The bin of a probability, by its log-odds (0 and below go to bin 0, 1 and
/// above to the top bin; NaN goes to bin 0, and the model families never
/// send one: their updates are checked finite).
fn bin(p: f32) -> usize {
    let p = f64::from(p);
    if p.is_nan() || p <= 0.0 {
        return 0;
    }
    if p >= 1.0 {
        return SCORE_BINS - 1;
    }
    let logit = (p / (1.0 - p)).ln();
    let x = (logit + LOGIT_RANGE) / (2.0 * LOGIT_RANGE) * SCORE_BINS as f64;
    (x.max(0.0) as usize).min(SCORE_BINS - 1)
}

/// Counts held-out scores per class: `[neg_0 … neg_{B−1}, pos_0 … pos_{B−1}]`
/// (labels above 0.5 are positive). Counts are exact in `f32` up to 2^24 per
/// bin.
pub fn score_histogram(labels: &[f32], probs: &[f32]) -> Vec<f32> {
    let mut h = vec![0.0f32; HISTOGRAM_LEN];
    for (&y, &p) in labels.iter().zip(probs) {
        let offset = if y > 0.5 { SCORE_BINS } else { 0 };
        h[offset + bin(p)] += 1.0;
    }
    h
}

/// The two class histograms of a summed vector of [`HISTOGRAM_LEN`] values.
fn split(h: &[f64]) -> Option<(&[f64], &[f64])> {
    (h.len() == HISTOGRAM_LEN).then(|| h.split_at(SCORE_BINS))
}

/// ROC AUC of summed histograms: the probability that a random positive
/// scores in a higher bin than a random negative, ties counting one half.
/// `None` when either class is absent (the AUC is then undefined) or the
/// vector does not have [`HISTOGRAM_LEN`] values.
pub fn auc_from_histogram(h: &[f64]) -> Option<f64> {
    let (neg, pos) = split(h)?;
    let (n_neg, n_pos): (f64, f64) = (neg.iter().sum(), pos.iter().sum());
    if n_neg <= 0.0 || n_pos <= 0.0 {
        return None;
    }
    let mut below = 0.0; // negatives in lower bins
    let mut pairs = 0.0;
    for (&nb, &pb) in neg.iter().zip(pos) {
        pairs += pb * (below + 0.5 * nb);
        below += nb;
    }
    Some(pairs / (n_pos * n_neg))
}

/// Average precision (PR-AUC as scikit-learn's `average_precision_score`
/// computes it) of summed histograms, with each bin one threshold: Σ over
/// bins from the top of (recall gained) × (precision at that bin). `None`
/// when either class is absent (with positives only it would be a trivial
/// 1) or the vector has the wrong length.
pub fn pr_auc_from_histogram(h: &[f64]) -> Option<f64> {
    let (neg, pos) = split(h)?;
    let (n_neg, n_pos): (f64, f64) = (neg.iter().sum(), pos.iter().sum());
    if n_neg <= 0.0 || n_pos <= 0.0 {
        return None;
    }
    let (mut tp, mut fp, mut ap) = (0.0, 0.0, 0.0);
    for (&nb, &pb) in neg.iter().zip(pos).rev() {
        tp += pb;
        fp += nb;
        if pb > 0.0 {
            ap += (pb / n_pos) * (tp / (tp + fp));
        }
    }
    Some(ap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::auc;
    use rand::RngExt;

    fn sum(parts: &[Vec<f32>]) -> Vec<f64> {
        let mut s = vec![0.0f64; HISTOGRAM_LEN];
        for p in parts {
            for (a, &b) in s.iter_mut().zip(p) {
                *a += f64::from(b);
            }
        }
        s
    }

    #[test]
    fn summed_histograms_give_the_pooled_auc_up_to_binning() {
        let mut rng = crate::seed::rng(7, &["histogram-test"]);
        let (mut ys, mut ps, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        // Four skewed merchants: one holds only negatives, one only positives.
        for (k, rate) in [0.0, 1.0, 0.3, 0.05].into_iter().enumerate() {
            let mut y = Vec::new();
            let mut p = Vec::new();
            for _ in 0..500 + 100 * k {
                let label = if rng.random::<f64>() < rate { 1.0 } else { 0.0 };
                let noise: f32 = rng.random();
                p.push((0.35 * label + 0.65 * noise).clamp(0.0, 1.0));
                y.push(label);
            }
            parts.push(score_histogram(&y, &p));
            ys.extend(y);
            ps.extend(p);
        }
        let exact = auc(&ys, &ps);
        let binned = auc_from_histogram(&sum(&parts)).unwrap();
        assert!(
            (exact - binned).abs() < 1e-3,
            "exact {exact}, binned {binned}"
        );
        // A merchant with one class has no AUC of its own.
        assert_eq!(auc_from_histogram(&sum(&parts[..1])), None);
        assert_eq!(pr_auc_from_histogram(&sum(&parts[..1])), None);
        assert_eq!(pr_auc_from_histogram(&sum(&parts[1..2])), None);
    }

    #[test]
    fn rare_churners_scored_near_zero_keep_their_ranking() {
        // Churners at 1 %, scored near 0.0003 and 0.002: probability bins
        // 0.001 wide made most pairs ties and read 0.856 for an exact 0.914.
        let mut rng = crate::seed::rng(11, &["histogram-rare"]);
        let (mut ys, mut ps) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            let label = if rng.random::<f64>() < 0.01 { 1.0 } else { 0.0 };
            let z: f32 = (0..12).map(|_| rng.random::<f32>()).sum::<f32>() - 6.0;
            let logit = -8.0 + 2.0 * label + z;
            ps.push(1.0 / (1.0 + (-logit).exp()));
            ys.push(label);
        }
        let exact = auc(&ys, &ps);
        let binned = auc_from_histogram(&sum(&[score_histogram(&ys, &ps)])).unwrap();
        assert!(exact > 0.9, "exact {exact}");
        assert!(
            (exact - binned).abs() < 1e-3,
            "exact {exact}, binned {binned}"
        );
    }

    #[test]
    fn histogram_metrics_match_hand_computed_values() {
        // Distinct bins: sklearn roc_auc_score([0,1,0,1],[0.1,0.4,0.5,0.8])
        // == 0.75; average_precision_score == (1/2)(1) + (1/2)(2/3) = 0.8333.
        let h = sum(&[score_histogram(
            &[0.0, 1.0, 0.0, 1.0],
            &[0.1, 0.4, 0.5, 0.8],
        )]);
        assert!((auc_from_histogram(&h).unwrap() - 0.75).abs() < 1e-12);
        assert!((pr_auc_from_histogram(&h).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        // Scores in one bin are ties, as in `auc`; p = 1 lands in the top bin.
        let h = sum(&[score_histogram(&[0.0, 1.0, 1.0], &[0.5, 0.5, 1.0])]);
        assert!((auc_from_histogram(&h).unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(auc_from_histogram(&[0.0; 3]), None);
    }
}
