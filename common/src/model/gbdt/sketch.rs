//! The federated statistics step of boosting: a mergeable quantile sketch of
//! every feature, and the bin edges chosen from the merged sketch.
//!
//! A sketch that secure aggregation can merge must be a plain sum, so each
//! merchant counts its standardised feature values in [`SKETCH_CELLS`] fixed
//! cells over `[−SKETCH_RANGE, SKETCH_RANGE]` (values outside fall into the
//! end cells), and its churners once. The summed counts are the pooled
//! distribution up to a cell (1/64 of a standard deviation), and the edges
//! are its quantiles: like scikit-learn's `HistGradientBoosting`, a feature
//! with at most `max_bins` occupied cells gets one bin per occupied cell
//! (one-hot columns: two), any other `max_bins` bins of near-equal mass. A
//! rank-based sketch (GK, KLL) would be smaller but cannot be summed under
//! secure aggregation, and would carry individual values.
//!
//! What the sketch reveals without secure aggregation: the merchant's
//! number of rows and churners and each feature's histogram at that
//! resolution; with secure aggregation, only the federation's.

use super::ensemble::GbdtError;

/// Cells per feature.
pub const SKETCH_CELLS: usize = 1024;
/// Half-width of the sketched range, in standard deviations.
pub const SKETCH_RANGE: f32 = 8.0;

/// Length of a merchant's sketch over `d` features: the cells, then the
/// number of churners.
pub fn sketch_len(d: usize) -> usize {
    d * SKETCH_CELLS + 1
}

/// The cell of a standardised value.
fn cell(z: f32) -> usize {
    let t = (z + SKETCH_RANGE) / (2.0 * SKETCH_RANGE) * SKETCH_CELLS as f32;
    if t.is_nan() || t < 0.0 {
        0
    } else {
        (t as usize).min(SKETCH_CELLS - 1)
    }
}

/// Upper boundary of a cell, the value used as a bin edge.
fn cell_upper(c: usize) -> f32 {
    -SKETCH_RANGE + (c + 1) as f32 * (2.0 * SKETCH_RANGE / SKETCH_CELLS as f32)
}

/// One merchant's sketch of standardised rows `x` (`rows × d`) and labels.
pub fn sketch(x: &ndarray::Array2<f32>, y: &[f32]) -> Vec<f32> {
    let d = x.ncols();
    let mut out = vec![0.0f32; sketch_len(d)];
    for row in x.rows() {
        for (f, &z) in row.iter().enumerate() {
            out[f * SKETCH_CELLS + cell(z)] += 1.0;
        }
    }
    out[d * SKETCH_CELLS] = y.iter().filter(|&&v| v > 0.5).count() as f32;
    out
}

/// Bin edges of every feature and the base score (log-odds of the churn
/// rate) from the federation's summed sketch and row count.
pub fn edges_from_sketch(
    sums: &[f64],
    d: usize,
    rows: f64,
    max_bins: usize,
) -> Result<(Vec<Vec<f32>>, f32), GbdtError> {
    if sums.len() != sketch_len(d) {
        return Err(GbdtError::SumLength {
            expected: sketch_len(d),
            got: sums.len(),
        });
    }
    if let Some(i) = sums.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(GbdtError::Sum(format!(
            "sketch count {i} is {} (not a count)",
            sums[i]
        )));
    }
    if rows.is_nan() || rows < 1.0 {
        return Err(GbdtError::Sum(
            "the sketch round counted no training rows".into(),
        ));
    }
    let edges = (0..d)
        .map(|f| feature_edges(&sums[f * SKETCH_CELLS..(f + 1) * SKETCH_CELLS], max_bins))
        .collect();
    let rate = (sums[d * SKETCH_CELLS] / rows).clamp(1e-6, 1.0 - 1e-6);
    Ok((edges, (rate / (1.0 - rate)).ln() as f32))
}

/// Edges of one feature from its summed cells.
fn feature_edges(cells: &[f64], max_bins: usize) -> Vec<f32> {
    let occupied: Vec<usize> = (0..cells.len()).filter(|&c| cells[c] > 0.0).collect();
    let Some(&last) = occupied.last() else {
        return Vec::new();
    };
    if occupied.len() <= max_bins {
        // One bin per occupied cell: an edge above each but the last.
        return occupied[..occupied.len() - 1]
            .iter()
            .map(|&c| cell_upper(c))
            .collect();
    }
    let total: f64 = cells.iter().sum();
    let mut edges = Vec::with_capacity(max_bins - 1);
    let mut cum = 0.0;
    let mut k = 1;
    for &c in &occupied {
        cum += cells[c];
        if c == last {
            break;
        }
        if cum >= total * k as f64 / max_bins as f64 {
            edges.push(cell_upper(c));
            while k < max_bins && cum >= total * k as f64 / max_bins as f64 {
                k += 1;
            }
        }
    }
    edges
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn merged_sketches_give_the_pooled_edges_and_base_score() {
        // Two merchants; a one-hot column and a column with four values.
        let a = array![[0.0f32, -1.0], [1.0, 0.0]];
        let b = array![[0.0f32, 1.0], [0.0, 2.0]];
        let sa = sketch(&a, &[1.0, 0.0]);
        let sb = sketch(&b, &[0.0, 0.0]);
        let sum: Vec<f64> = sa
            .iter()
            .zip(&sb)
            .map(|(x, y)| f64::from(*x) + f64::from(*y))
            .collect();
        let pooled = ndarray::concatenate(ndarray::Axis(0), &[a.view(), b.view()]).unwrap();
        let sp = sketch(&pooled, &[1.0, 0.0, 0.0, 0.0]);
        assert!(sum.iter().zip(&sp).all(|(s, p)| *s == f64::from(*p)));
        let (edges, base) = edges_from_sketch(&sum, 2, 4.0, 255).unwrap();
        // The one-hot column: one edge between 0 and 1.
        assert_eq!(edges[0].len(), 1);
        assert!(edges[0][0] >= 0.0 && edges[0][0] < 1.0);
        // Four distinct values, four bins, each value alone in its bin.
        assert_eq!(edges[1].len(), 3);
        let bins: Vec<usize> = [-1.0f32, 0.0, 1.0, 2.0]
            .iter()
            .map(|&z| super::super::ensemble::Ensemble::bin_of(&edges[1], z))
            .collect();
        assert_eq!(bins, vec![0, 1, 2, 3]);
        assert!((base - (1.0f32 / 3.0).ln()).abs() < 1e-6);
        // Two bins of a column with many values split it at the median cell.
        let many: Vec<f64> = (0..SKETCH_CELLS).map(|c| f64::from(c % 2 == 0)).collect();
        let e = feature_edges(&many, 2);
        assert_eq!(e.len(), 1);
        assert!((e[0] - cell_upper(510)).abs() < 1e-6, "{e:?}");
    }

    #[test]
    fn a_sketch_sum_with_a_negative_count_or_no_rows_is_refused() {
        let mut sum = vec![0.0; sketch_len(1)];
        assert!(edges_from_sketch(&sum, 1, 0.0, 8).is_err());
        sum[3] = -1.0;
        assert!(edges_from_sketch(&sum, 1, 3.0, 8).is_err());
        assert!(edges_from_sketch(&sum[1..], 1, 3.0, 8).is_err());
    }
}
