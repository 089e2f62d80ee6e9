//! Classification metrics that stay right when merchants are skewed: AUC and
//! PR-AUC from per-class score histograms summed across merchants.
//!
//! The example-weighted mean of merchants' AUCs is not the AUC of the
//! federation: a merchant whose customers all stayed has no AUC at all, and
//! ranking quality does not average. Instead each merchant counts its
//! held-out scores in [`SCORE_BINS`] fine bins over `[0, 1]`, one histogram
//! per class ([`score_histogram`]). The histograms are plain sums, so they
//! add up across merchants like any update (and could go through secure
//! aggregation unchanged); the AUC of the summed histogram is the AUC of the
//! pooled predictions up to binning: pairs whose scores share a bin count as
//! ties (half a correctly ordered pair), which moves the AUC by at most half
//! the fraction of positive–negative pairs inside one bin.

/// Bins per class over the probability range `[0, 1]`: a bin is 0.001 wide.
pub const SCORE_BINS: usize = 1000;

/// Length of the summed vector: negatives' histogram, then positives'.
pub const HISTOGRAM_LEN: usize = 2 * SCORE_BINS;

/// The bin of a probability (clamped into `[0, 1]`; NaN goes to bin 0, and
/// the model families never send one: their updates are checked finite).
fn bin(p: f32) -> usize {
    let b = (f64::from(p).clamp(0.0, 1.0) * SCORE_BINS as f64) as usize;
    b.min(SCORE_BINS - 1)
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
