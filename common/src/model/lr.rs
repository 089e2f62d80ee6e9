//! Logistic regression for churn, trained by mini-batch SGD on ndarray.
//!
//! The federated parameters are `[w_1 … w_d, b]`; there is nothing private.
//! Training starts from the global parameters (`fit_with`), supports L2
//! regularisation, class weights and a FedProx proximal term.

use ndarray::{Array1, Array2, Axis};
use rand::Rng;
use rand::seq::SliceRandom;

pub use crate::model::sgd::{ClassWeight, SgdParams, example_weights};

/// A binary logistic-regression model.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticRegression {
    /// Feature weights.
    pub weights: Array1<f32>,
    /// Intercept.
    pub bias: f32,
}

fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl LogisticRegression {
    /// A model with all parameters zero (the usual starting point).
    pub fn zeros(num_features: usize) -> Self {
        Self {
            weights: Array1::zeros(num_features),
            bias: 0.0,
        }
    }

    /// Rebuilds a model from its flat parameter vector `[w, b]`.
    pub fn from_params(params: &[f32]) -> Self {
        let d = params.len().saturating_sub(1);
        Self {
            weights: Array1::from(params[..d].to_vec()),
            bias: params.get(d).copied().unwrap_or(0.0),
        }
    }

    /// The flat parameter vector `[w, b]`.
    pub fn to_params(&self) -> Vec<f32> {
        let mut v = self.weights.to_vec();
        v.push(self.bias);
        v
    }

    /// Probability of the positive class for each row.
    pub fn predict_proba(&self, x: &Array2<f32>) -> Vec<f32> {
        x.dot(&self.weights)
            .iter()
            .map(|z| sigmoid(z + self.bias))
            .collect()
    }

    /// Trains in place starting from the current parameters, shuffling with
    /// `rng`. Returns the mean weighted log-loss of the last epoch (of the
    /// kept epoch with early stopping, which holds back a stratified
    /// validation split of these rows and keeps the best epoch's parameters).
    pub fn fit_with<R: Rng>(
        &mut self,
        x: &Array2<f32>,
        y: &Array1<f32>,
        params: &SgdParams,
        rng: &mut R,
    ) -> f32 {
        let n = x.nrows();
        if n == 0 {
            return 0.0;
        }
        let cw = example_weights(y.view(), params.class_weight);
        let anchor_w = self.weights.clone();
        let anchor_b = self.bias;
        let (mut order, valid) = match &params.early_stopping {
            Some(e) if n >= 10 => crate::model::sgd::split_rows(y, e.validation_fraction, rng),
            _ => ((0..n).collect(), Vec::new()),
        };
        let patience = params
            .early_stopping
            .map_or(usize::MAX, |e| e.patience.max(1));
        let mut best = (f64::INFINITY, self.clone(), 0usize, 0.0f32);
        let bs = params.batch_size.max(1);
        let mut last_loss = 0.0;
        for epoch in 1..=params.epochs.max(1) {
            order.shuffle(rng);
            let mut loss_sum = 0.0f64;
            for batch in order.chunks(bs) {
                let xb = x.select(Axis(0), batch);
                let z = xb.dot(&self.weights);
                let mut g = Array1::<f32>::zeros(batch.len());
                for (k, &i) in batch.iter().enumerate() {
                    let p = sigmoid(z[k] + self.bias);
                    let yi = y[i];
                    g[k] = (p - yi) * cw[i];
                    let pc = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
                    loss_sum +=
                        f64::from(cw[i]) * if yi > 0.5 { -pc.ln() } else { -(1.0 - pc).ln() };
                }
                let m = batch.len() as f32;
                let mut grad_w = xb.t().dot(&g) / m;
                grad_w.scaled_add(params.l2, &self.weights);
                let mut grad_b = g.sum() / m;
                if params.prox_mu > 0.0 {
                    grad_w.scaled_add(params.prox_mu, &(&self.weights - &anchor_w));
                    grad_b += params.prox_mu * (self.bias - anchor_b);
                }
                self.weights.scaled_add(-params.learning_rate, &grad_w);
                self.bias -= params.learning_rate * grad_b;
            }
            last_loss = (loss_sum / order.len().max(1) as f64) as f32;
            if valid.is_empty() {
                continue;
            }
            let probs = self.predict_proba(&x.select(Axis(0), &valid));
            let vl: f64 = valid
                .iter()
                .zip(&probs)
                .map(|(&i, &p)| {
                    let pc = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
                    f64::from(cw[i])
                        * if y[i] > 0.5 {
                            -pc.ln()
                        } else {
                            -(1.0 - pc).ln()
                        }
                })
                .sum();
            if vl < best.0 {
                best = (vl, self.clone(), epoch, last_loss);
            } else if epoch - best.2 >= patience {
                break;
            }
        }
        if !valid.is_empty() {
            *self = best.1;
            last_loss = best.3;
        }
        last_loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::auc;
    use crate::model::sgd::EarlyStopping;
    use ndarray::array;

    #[test]
    fn params_round_trip() {
        let m = LogisticRegression {
            weights: array![1.0, -2.0],
            bias: 0.5,
        };
        assert_eq!(LogisticRegression::from_params(&m.to_params()), m);
    }

    #[test]
    fn learns_a_separable_problem_deterministically() {
        let x = array![
            [0.0f32, 1.0],
            [1.0, 0.0],
            [0.1, 0.9],
            [0.9, 0.2],
            [0.2, 0.8],
            [0.8, 0.1]
        ];
        let y = array![1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0];
        let params = SgdParams {
            epochs: 200,
            batch_size: 2,
            learning_rate: 0.5,
            ..Default::default()
        };
        let mut a = LogisticRegression::zeros(2);
        let mut b = LogisticRegression::zeros(2);
        a.fit_with(&x, &y, &params, &mut crate::seed::rng(1, &[]));
        b.fit_with(&x, &y, &params, &mut crate::seed::rng(1, &[]));
        assert_eq!(a, b);
        assert_eq!(auc(y.as_slice().unwrap(), &a.predict_proba(&x)), 1.0);
    }

    #[test]
    fn early_stopping_keeps_the_best_epoch_on_a_held_back_split() {
        // Noise labels on random features: the validation loss cannot keep
        // improving, so training stops well before the epoch budget.
        let mut r = crate::seed::rng(3, &["data"]);
        let x = Array2::from_shape_fn((200, 20), |_| {
            rand::RngExt::random_range(&mut r, -1.0f32..1.0)
        });
        let y = Array1::from_shape_fn(200, |i| ((i * 7 + 3) % 5 < 2) as u8 as f32);
        let params = SgdParams {
            epochs: 500,
            learning_rate: 0.1,
            l2: 0.0,
            early_stopping: Some(EarlyStopping {
                validation_fraction: 0.2,
                patience: 3,
            }),
            ..Default::default()
        };
        let mut a = LogisticRegression::zeros(20);
        a.fit_with(&x, &y, &params, &mut crate::seed::rng(1, &[]));
        let mut b = LogisticRegression::zeros(20);
        b.fit_with(&x, &y, &params, &mut crate::seed::rng(1, &[]));
        assert_eq!(a, b);
        // Without early stopping the same budget moves much further from zero.
        let mut full = LogisticRegression::zeros(20);
        let no_stop = SgdParams {
            early_stopping: None,
            ..params.clone()
        };
        full.fit_with(&x, &y, &no_stop, &mut crate::seed::rng(1, &[]));
        let norm = |m: &LogisticRegression| m.weights.dot(&m.weights).sqrt();
        assert!(
            norm(&a) < 0.5 * norm(&full),
            "{} vs {}",
            norm(&a),
            norm(&full)
        );
    }

    #[test]
    fn balanced_weights_equalise_classes() {
        let w = example_weights(array![1.0f32, 0.0, 0.0, 0.0].view(), ClassWeight::Balanced);
        assert_eq!(w.to_vec(), vec![2.0, 2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0]);
    }
}
