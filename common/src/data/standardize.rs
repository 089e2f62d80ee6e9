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
        Self { mean, std }
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
        Self::from_moments(&moments)
    }

    /// Returns a standardised copy of `x`.
    pub fn transform(&self, x: &Array2<f32>) -> Array2<f32> {
        let mut out = x.clone();
        for mut row in out.rows_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) / self.std[j];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
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
        let fed = Standardizer::from_moments(&acc.mean_delta(&WeightLayout::uniform()));
        let pooled = Standardizer::fit(&array![[1.0f32, 10.0], [3.0, 10.0], [5.0, 10.0]]);
        assert_eq!(fed, pooled);
        assert_eq!(fed.mean, vec![3.0, 10.0]);
        assert!((fed.std[0] - (8.0f32 / 3.0).sqrt()).abs() < 1e-6);
        // A constant column is scaled by 1, not divided by zero.
        assert_eq!(fed.std[1], 1.0);
    }
}
