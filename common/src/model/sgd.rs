//! Mini-batch SGD settings and helpers shared by the churn models (logistic
//! regression and the MLP): hyper-parameters, class weights, early stopping and
//! the stratified validation split. Both models import this module, never each other.

use ndarray::{Array1, ArrayView1};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// How examples of each class are weighted in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeight {
    /// Every example counts once.
    #[default]
    None,
    /// Each class weighted by `n / (2 · n_class)` on the local data, as
    /// scikit-learn's `class_weight="balanced"`.
    Balanced,
}

/// Hyper-parameters of local SGD training, shared by the churn models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SgdParams {
    /// Passes over the local training data per round.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Step size.
    pub learning_rate: f32,
    /// L2 penalty on the weights (not the bias).
    pub l2: f32,
    /// Class weighting of the loss.
    #[serde(default)]
    pub class_weight: ClassWeight,
    /// FedProx proximal coefficient μ: adds `μ/2 ‖w − w_global‖²` (0 = off).
    #[serde(default)]
    pub prox_mu: f32,
    /// Early stopping on a validation split carved from the local training
    /// rows (`None` trains for exactly `epochs`).
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
}

/// Defaults tuned on Telco churn with five merchants (see BENCHMARKS.md,
/// "Churn and orders pipeline"): ten local epochs at step 0.02 bring logistic
/// regression to scikit-learn's AUC, centrally and federated, within 20
/// rounds; a larger step makes the centralised last iterate noisy. The MLP
/// uses Adam and wants a step near 0.001.
impl Default for SgdParams {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            learning_rate: 0.02,
            l2: 1e-4,
            class_weight: ClassWeight::None,
            prox_mu: 0.0,
            early_stopping: None,
        }
    }
}

/// Stop training when the loss on a local validation split stops improving.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Fraction of the training rows held back for validation (stratified).
    pub validation_fraction: f64,
    /// Epochs without improvement tolerated before stopping.
    pub patience: usize,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        Self {
            validation_fraction: 0.1,
            patience: 3,
        }
    }
}

/// Per-example loss weights for the given labels and class-weight policy.
pub fn example_weights(y: ArrayView1<f32>, policy: ClassWeight) -> Array1<f32> {
    match policy {
        ClassWeight::None => Array1::ones(y.len()),
        ClassWeight::Balanced => {
            let n = y.len() as f32;
            let pos = y.iter().filter(|&&v| v > 0.5).count() as f32;
            let neg = n - pos;
            let wp = if pos > 0.0 { n / (2.0 * pos) } else { 1.0 };
            let wn = if neg > 0.0 { n / (2.0 * neg) } else { 1.0 };
            y.mapv(|v| if v > 0.5 { wp } else { wn })
        }
    }
}

/// A stratified split of `0..y.len()` into (train, validation), drawn from `rng`.
pub fn split_rows<R: Rng>(y: &Array1<f32>, fraction: f64, rng: &mut R) -> (Vec<usize>, Vec<usize>) {
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for class in [true, false] {
        let mut idx: Vec<usize> = (0..y.len()).filter(|&i| (y[i] > 0.5) == class).collect();
        idx.shuffle(rng);
        let k = ((idx.len() as f64) * fraction.clamp(0.0, 0.5)).round() as usize;
        valid.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    valid.sort_unstable();
    (train, valid)
}
