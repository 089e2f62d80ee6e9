//! Global feature standardisation agreed through a federated statistics step.
//!
//! Each agent reports only `Σx` and `Σx²` per feature with its row count as
//! the weight; the coordinator's ordinary weighted mean of those updates is
//! then `(E[x], E[x²])`, from which every agent derives the same mean and
//! standard deviation. No row leaves an agent.

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::federation::update::Update;

/// The largest magnitude a feature may have to be standardised. The
/// statistics step sends each feature's `Σx²` as a 32-bit float: a square of
/// 1e30 summed over 10⁸ rows stays below `f32::MAX` (3.4e38), while one value
/// of 1e20 alone makes it infinite, so that merchant's statistics are refused
/// and its own rows, scaled by everyone else's spread, wreck its training.
/// Readers refuse larger cells and features, naming them.
pub const MAX_FEATURE_MAGNITUDE: f64 = 1e15;

/// Per-feature mean and standard deviation used to scale inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    /// Feature means.
    pub mean: Vec<f32>,
    /// Feature standard deviations (constant features get 1, so they map to 0).
    pub std: Vec<f32>,
    /// The rows the statistics were taken over, N. No row among them lies
    /// more than √(N − 1) standard deviations from the mean (Samuelson's
    /// inequality), so [`Standardizer::transform`] clamps standardised
    /// values at [`Standardizer::bound`] = 2√N: only a row the statistics
    /// never saw (a merchant that joined after the statistics step, or whose
    /// export changed) reaches it. Unclamped, one customer with a monetary
    /// value of 9e14 read 1e11 standard deviations and its merchant's
    /// updates wrecked a running churn model for good. `None` (a
    /// standardiser fitted before this was kept): no clamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<f64>,
}

/// The statistics update for a feature matrix: values `[Σx, Σx²]`, weight = rows.
pub fn stats_update(x: &Array2<f32>) -> Update {
    let d = x.ncols();
    let mut values = vec![0.0f32; 2 * d];
    let mut sums = vec![0.0f64; 2 * d];
    for row in x.rows() {
        for (j, &v) in row.iter().enumerate() {
            sums[j] += f64::from(v);
            sums[d + j] += f64::from(v) * f64::from(v);
        }
    }
    for (o, s) in values.iter_mut().zip(&sums) {
        *o = *s as f32;
    }
    Update {
        values,
        coord_weights: Vec::new(),
        weight: x.nrows() as f64,
    }
}

/// The first feature whose `(E[x], E[x²])` in `moments` no rows can have:
/// a mean square below the squared mean beyond rounding (a negative
/// variance), or either not finite. [`Standardizer::from_moments`] clamps
/// such a variance to 0 and takes a standard deviation of 1, which put
/// every customer of every merchant at the clamp bound for the whole run
/// when one merchant forged its statistics (found by an attacker probe).
/// Returns the feature with its mean and mean square.
pub fn impossible_feature(moments: &[f32]) -> Option<(usize, f64, f64)> {
    let d = moments.len() / 2;
    (0..d).find_map(|j| {
        let (mean, square) = (f64::from(moments[j]), f64::from(moments[d + j]));
        // f32 moments, and secure sums quantised at ~1e-6 relative: a
        // constant feature's variance may come out a hair below zero.
        let slack = 1e-4 * square.abs().max(mean * mean).max(1e-12);
        let bad = !mean.is_finite() || !square.is_finite() || square < mean * mean - slack;
        bad.then_some((j, mean, square))
    })
}

impl Standardizer {
    /// Builds the standardiser from the aggregated `(E[x], E[x²])` vector.
    pub fn from_moments(moments: &[f32]) -> Self {
        let d = moments.len() / 2;
        let mean = moments[..d].to_vec();
        let std = (0..d)
            .map(|j| {
                let var = f64::from(moments[d + j]) - f64::from(mean[j]).powi(2);
                let sd = var.max(0.0).sqrt() as f32;
                if sd > 1e-6 { sd } else { 1.0 }
            })
            .collect();
        Self {
            mean,
            std,
            rows: None,
        }
    }

    /// The standardiser of statistics taken over `rows` rows (see
    /// [`Standardizer::rows`]).
    pub fn with_rows(mut self, rows: f64) -> Self {
        self.rows = (rows.is_finite() && rows >= 1.0).then_some(rows);
        self
    }

    /// The largest standardised magnitude [`Standardizer::transform`] keeps:
    /// 2√N, twice the most any row of the statistics can have; `None`
    /// without a row count.
    pub fn bound(&self) -> Option<f32> {
        self.rows.map(|n| (2.0 * n.sqrt()) as f32)
    }

    /// Computes the standardiser from data held in one place (centralised baseline).
    pub fn fit(x: &Array2<f32>) -> Self {
        let u = stats_update(x);
        let n = u.weight.max(1.0);
        let moments: Vec<f32> = u
            .values
            .iter()
            .map(|v| (f64::from(*v) / n) as f32)
            .collect();
        Self::from_moments(&moments).with_rows(u.weight)
    }

    /// Returns a standardised copy of `x`, clamped at [`Standardizer::bound`].
    pub fn transform(&self, x: &Array2<f32>) -> Array2<f32> {
        self.transform_counting(x).0
    }

    /// [`Standardizer::transform`], also counting the values it clamped (a
    /// value the statistics step never saw the like of; the caller says so).
    pub fn transform_counting(&self, x: &Array2<f32>) -> (Array2<f32>, usize) {
        let bound = self.bound().unwrap_or(f32::INFINITY);
        let mut clamped = 0;
        let mut out = x.clone();
        for mut row in out.rows_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                let z = (*v - self.mean[j]) / self.std[j];
                *v = if z.abs() > bound {
                    clamped += 1;
                    bound.copysign(z)
                } else {
                    z
                };
            }
        }
        (out, clamped)
    }
}

#[cfg(test)]
mod tests {
    /// A constant feature's variance may come out a hair below zero and
    /// passes; a negative one beyond rounding, or a non-finite moment, is
    /// named.
    #[test]
    fn moments_no_rows_can_have_are_named() {
        use super::impossible_feature;
        // Feature 0 constant 5 (E[x²] a rounding below 25), feature 1 fine.
        assert_eq!(impossible_feature(&[5.0, 1.0, 24.999_99, 2.0]), None);
        assert_eq!(
            impossible_feature(&[5.0, 1.0, 25.0, -250_000.0]),
            Some((1, 1.0, -250_000.0))
        );
        assert_eq!(
            impossible_feature(&[5.0, 1.0, 20.0, 2.0]).map(|f| f.0),
            Some(0)
        );
        assert_eq!(
            impossible_feature(&[f32::NAN, 1.0, 25.0, 2.0]).map(|f| f.0),
            Some(0)
        );
    }

    use super::*;
    use crate::federation::aggregate::SumAccumulator;
    use crate::federation::update::WeightLayout;
    use ndarray::array;

    #[test]
    fn federated_moments_equal_pooled_moments() {
        let a = array![[1.0f32, 10.0], [3.0, 10.0]];
        let b = array![[5.0f32, 10.0]];
        let mut acc = SumAccumulator::new(4, 0);
        acc.add(&stats_update(&a)).unwrap();
        acc.add(&stats_update(&b)).unwrap();
        let fed = Standardizer::from_moments(&acc.mean_delta(&WeightLayout::uniform()))
            .with_rows(acc.total_weight());
        let pooled = Standardizer::fit(&array![[1.0f32, 10.0], [3.0, 10.0], [5.0, 10.0]]);
        assert_eq!(fed, pooled);
        assert_eq!(fed.mean, vec![3.0, 10.0]);
        assert!((fed.std[0] - (8.0f32 / 3.0).sqrt()).abs() < 1e-6);
        // A constant column is scaled by 1, not divided by zero.
        assert_eq!(fed.std[1], 1.0);
    }

    #[test]
    fn no_row_of_the_statistics_is_clamped_and_a_later_absurd_one_is() {
        // The most extreme sample a spread allows: one value far out, the
        // rest equal (|z| = √(N − 1) exactly).
        let n = 400;
        let mut x = Array2::<f32>::zeros((n, 1));
        x[[0, 0]] = 1e6;
        let st = Standardizer::fit(&x);
        assert_eq!(st.rows, Some(n as f64));
        let (z, clamped) = st.transform_counting(&x);
        assert_eq!(clamped, 0);
        assert!(
            (z[[0, 0]] - (n as f32 - 1.0).sqrt()).abs() < 1e-2,
            "{}",
            z[[0, 0]]
        );
        // A row the statistics never saw, at 9e14: clamped at 2√N.
        let late = array![[9e14f32], [0.0]];
        let (z, clamped) = st.transform_counting(&late);
        assert_eq!(clamped, 1);
        assert_eq!(z[[0, 0]], 40.0);
        // Without a row count (a standardiser kept before): no clamp.
        let old = Standardizer {
            rows: None,
            ..st.clone()
        };
        assert!(old.transform(&late)[[0, 0]] > 1e9);
        // Kept through the spec's JSON; an old spec reads without it.
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<Standardizer>(&json).unwrap(), st);
        let old_json = r#"{"mean":[1.0],"std":[2.0]}"#;
        assert_eq!(
            serde_json::from_str::<Standardizer>(old_json).unwrap().rows,
            None
        );
    }
}
