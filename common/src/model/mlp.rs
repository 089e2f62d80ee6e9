//! A small multi-layer perceptron for churn: ReLU hidden layers, a sigmoid
//! output, weighted binary cross-entropy, trained by mini-batch Adam on ndarray.
//!
//! The federated parameters are every weight and bias as one flat vector in a
//! fixed layout (see [`MlpShape`]): for each layer in order, its weight
//! matrix row-major (`inputs × outputs`) and then its bias. Nothing is private,
//! so the coordinator divides the summed update uniformly.
//!
//! **Adam state is local to one round.** Each round starts from the global
//! parameters with fresh (zero) first and second moments; the moments are never
//! sent or kept between rounds. Keeping them would make an agent's step depend
//! on rounds it may have missed and on a model it no longer holds, and sending
//! them would triple the update size. With a few local epochs per round the
//! moments warm up quickly, and bias correction keeps the first steps sane.
//!
//! Early stopping (optional, [`EarlyStopping`]) carves a seeded, stratified
//! validation split out of the rows it is given to *train* on — never out of
//! the merchant's held-out rows — and keeps the parameters of the epoch with
//! the lowest validation loss.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::Rng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::model::sgd::EarlyStopping;
use crate::model::sgd::{SgdParams, example_weights, split_rows};

/// Adam's decay rates and stabiliser, the values of Kingma & Ba (2015).
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const ADAM_EPS: f32 = 1e-8;

/// Probabilities are clipped to `[P_EPS, 1 − P_EPS]` inside the loss.
const P_EPS: f64 = 1e-7;

/// Why an MLP could not be built.
#[derive(Debug, Error, PartialEq)]
pub enum MlpError {
    /// The flat parameter vector does not match the architecture.
    #[error("MLP with layers {layers:?} needs {expected} parameters, got {got}")]
    ParamLength {
        /// Layer widths, input first.
        layers: Vec<usize>,
        /// Parameters the architecture needs.
        expected: usize,
        /// Parameters supplied.
        got: usize,
    },
    /// A layer of width zero.
    #[error("MLP layer widths must be positive, got {0:?}")]
    ZeroWidth(Vec<usize>),
}

/// The architecture of an MLP: input width and hidden widths (output is one logit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpShape {
    /// Number of input features.
    pub num_features: usize,
    /// Widths of the hidden ReLU layers, in order.
    pub hidden: Vec<usize>,
}

impl MlpShape {
    /// Layer widths from input to the single output.
    pub fn widths(&self) -> Vec<usize> {
        let mut w = vec![self.num_features];
        w.extend(&self.hidden);
        w.push(1);
        w
    }

    /// `(inputs, outputs, offset)` of each layer's block in the flat vector;
    /// the bias follows the weights at `offset + inputs · outputs`.
    pub fn layers(&self) -> Vec<(usize, usize, usize)> {
        let w = self.widths();
        let mut off = 0;
        w.windows(2)
            .map(|p| {
                let l = (p[0], p[1], off);
                off += p[0] * p[1] + p[1];
                l
            })
            .collect()
    }

    /// Total number of parameters.
    pub fn param_len(&self) -> usize {
        self.widths().windows(2).map(|p| p[0] * p[1] + p[1]).sum()
    }

    /// Refuses zero-width layers (the only unusable shape).
    pub fn check(&self) -> Result<(), MlpError> {
        if self.widths().contains(&0) {
            return Err(MlpError::ZeroWidth(self.widths()));
        }
        Ok(())
    }
}

/// What a call to [`Mlp::fit_with`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Epochs actually run (fewer than asked when early stopping fired).
    pub epochs_run: usize,
    /// The 1-based epoch whose parameters were kept.
    pub best_epoch: usize,
    /// Mean weighted training loss of the kept epoch.
    pub train_loss: f32,
    /// Validation loss of the kept epoch, when early stopping was on.
    pub valid_loss: Option<f32>,
}

/// A binary classifier `x → σ(f(x))` with ReLU hidden layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    shape: MlpShape,
    params: Vec<f32>,
}

fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Mlp {
    /// He-initialised weights (normal, variance `2 / fan_in`), zero biases.
    pub fn he_init<R: Rng>(shape: MlpShape, rng: &mut R) -> Result<Self, MlpError> {
        shape.check()?;
        let mut params = vec![0.0f32; shape.param_len()];
        for (i, o, off) in shape.layers() {
            let normal = Normal::new(0.0f32, (2.0 / i as f32).sqrt()).expect("positive std");
            for p in &mut params[off..off + i * o] {
                *p = normal.sample(rng);
            }
        }
        Ok(Self { shape, params })
    }

    /// Rebuilds a model from its flat parameters.
    pub fn from_params(shape: MlpShape, params: &[f32]) -> Result<Self, MlpError> {
        shape.check()?;
        if params.len() != shape.param_len() {
            return Err(MlpError::ParamLength {
                layers: shape.widths(),
                expected: shape.param_len(),
                got: params.len(),
            });
        }
        Ok(Self {
            shape,
            params: params.to_vec(),
        })
    }

    /// The flat parameter vector.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The architecture.
    pub fn shape(&self) -> &MlpShape {
        &self.shape
    }

    fn layer(
        &self,
        (i, o, off): (usize, usize, usize),
    ) -> (ArrayView2<'_, f32>, ArrayView1<'_, f32>) {
        let w = ArrayView2::from_shape((i, o), &self.params[off..off + i * o]).expect("layout");
        let b = ArrayView1::from(&self.params[off + i * o..off + i * o + o]);
        (w, b)
    }

    /// Activations of every layer (input first) and the output logits.
    fn forward(&self, x: ArrayView2<f32>) -> (Vec<Array2<f32>>, Array1<f32>) {
        let layers = self.shape.layers();
        let mut acts = vec![x.to_owned()];
        for (k, &l) in layers.iter().enumerate() {
            let (w, b) = self.layer(l);
            let mut z = acts[k].dot(&w);
            z += &b;
            if k + 1 < layers.len() {
                z.mapv_inplace(|v| v.max(0.0));
                acts.push(z);
            } else {
                return (acts, z.column(0).to_owned());
            }
        }
        unreachable!("an MLP always has an output layer")
    }

    /// Probability of the positive class for each row.
    pub fn predict_proba(&self, x: &Array2<f32>) -> Vec<f32> {
        self.forward(x.view())
            .1
            .iter()
            .map(|&z| sigmoid(z))
            .collect()
    }

    /// Mean weighted cross-entropy of the rows.
    fn loss(&self, x: ArrayView2<f32>, y: ArrayView1<f32>, cw: ArrayView1<f32>) -> f32 {
        let logits = self.forward(x).1;
        let mut total = 0.0f64;
        for ((&z, &yi), &w) in logits.iter().zip(y).zip(cw) {
            let p = f64::from(sigmoid(z)).clamp(P_EPS, 1.0 - P_EPS);
            total += f64::from(w) * if yi > 0.5 { -p.ln() } else { -(1.0 - p).ln() };
        }
        (total / y.len().max(1) as f64) as f32
    }

    /// Gradient of the batch's mean weighted loss (plus L2 on weights and the
    /// proximal term) into `grad`; returns the batch's summed loss.
    fn gradient(
        &self,
        x: ArrayView2<f32>,
        y: &[f32],
        cw: &[f32],
        params: &SgdParams,
        anchor: &[f32],
        grad: &mut [f32],
    ) -> f64 {
        let (acts, logits) = self.forward(x);
        let m = y.len() as f32;
        let mut loss = 0.0f64;
        let mut delta = Array2::<f32>::zeros((y.len(), 1));
        for k in 0..y.len() {
            let p = sigmoid(logits[k]);
            delta[[k, 0]] = (p - y[k]) * cw[k] / m;
            let pc = f64::from(p).clamp(P_EPS, 1.0 - P_EPS);
            loss += f64::from(cw[k])
                * if y[k] > 0.5 {
                    -pc.ln()
                } else {
                    -(1.0 - pc).ln()
                };
        }
        let layers = self.shape.layers();
        for (k, &(i, o, off)) in layers.iter().enumerate().rev() {
            let (w, _) = self.layer((i, o, off));
            let gw = acts[k].t().dot(&delta);
            let gb = delta.sum_axis(Axis(0));
            // `gw` may come back in column-major order; iterate logically.
            for (g, &v) in grad[off..off + i * o + o]
                .iter_mut()
                .zip(gw.iter().chain(&gb))
            {
                *g = v;
            }
            for (g, p) in grad[off..off + i * o].iter_mut().zip(&self.params[off..]) {
                *g += params.l2 * p;
            }
            if k > 0 {
                let mut d = delta.dot(&w.t());
                d.zip_mut_with(&acts[k], |d, &a| {
                    if a <= 0.0 {
                        *d = 0.0;
                    }
                });
                delta = d;
            }
        }
        if params.prox_mu > 0.0 {
            for ((g, p), a) in grad.iter_mut().zip(&self.params).zip(anchor) {
                *g += params.prox_mu * (p - a);
            }
        }
        loss
    }

    /// Trains in place from the current (global) parameters with Adam, fresh
    /// moments, shuffling with `rng`. With `early` set, a stratified
    /// `validation_fraction` of these rows is held back and the best epoch's
    /// parameters are kept.
    pub fn fit_with<R: Rng>(
        &mut self,
        x: &Array2<f32>,
        y: &Array1<f32>,
        params: &SgdParams,
        early: Option<&EarlyStopping>,
        rng: &mut R,
    ) -> FitReport {
        let cw_all = example_weights(y.view(), params.class_weight);
        let (train_rows, valid_rows) = match early {
            Some(e) if x.nrows() >= 10 => split_rows(y, e.validation_fraction, rng),
            _ => ((0..x.nrows()).collect(), Vec::new()),
        };
        let valid = (!valid_rows.is_empty()).then(|| {
            (
                x.select(Axis(0), &valid_rows),
                y.select(Axis(0), &valid_rows),
                cw_all.select(Axis(0), &valid_rows),
            )
        });
        let anchor = self.params.clone();
        let n_params = self.params.len();
        let (mut m1, mut m2) = (vec![0.0f32; n_params], vec![0.0f32; n_params]);
        let mut grad = vec![0.0f32; n_params];
        let mut order = train_rows.clone();
        let bs = params.batch_size.max(1);
        let epochs = params.epochs.max(1);
        let mut step = 0i32;
        let mut best = (f32::INFINITY, self.params.clone(), 0usize, 0.0f32);
        let mut report = FitReport {
            epochs_run: 0,
            best_epoch: 0,
            train_loss: 0.0,
            valid_loss: None,
        };
        for epoch in 1..=epochs {
            order.shuffle(rng);
            let mut loss_sum = 0.0f64;
            for batch in order.chunks(bs) {
                let xb = x.select(Axis(0), batch);
                let yb: Vec<f32> = batch.iter().map(|&i| y[i]).collect();
                let cb: Vec<f32> = batch.iter().map(|&i| cw_all[i]).collect();
                loss_sum += self.gradient(xb.view(), &yb, &cb, params, &anchor, &mut grad);
                step += 1;
                let c1 = 1.0 - BETA1.powi(step);
                let c2 = 1.0 - BETA2.powi(step);
                for j in 0..n_params {
                    m1[j] = BETA1 * m1[j] + (1.0 - BETA1) * grad[j];
                    m2[j] = BETA2 * m2[j] + (1.0 - BETA2) * grad[j] * grad[j];
                    let mh = m1[j] / c1;
                    let vh = m2[j] / c2;
                    self.params[j] -= params.learning_rate * mh / (vh.sqrt() + ADAM_EPS);
                }
            }
            let train_loss = (loss_sum / order.len().max(1) as f64) as f32;
            report.epochs_run = epoch;
            let Some((vx, vy, vc)) = &valid else {
                report.best_epoch = epoch;
                report.train_loss = train_loss;
                continue;
            };
            let vl = self.loss(vx.view(), vy.view(), vc.view());
            if vl < best.0 {
                best = (vl, self.params.clone(), epoch, train_loss);
            } else if epoch - best.2 >= early.map_or(usize::MAX, |e| e.patience.max(1)) {
                break;
            }
        }
        if valid.is_some() {
            self.params = best.1;
            report.best_epoch = best.2;
            report.train_loss = best.3;
            report.valid_loss = Some(best.0);
        }
        report
    }
}

#[cfg(test)]
mod tests;
