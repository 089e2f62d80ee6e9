//! Horizontal federated gradient-boosted trees for churn (`churn-gbdt`),
//! histogram-based as in LightGBM and scikit-learn's
//! `HistGradientBoostingClassifier`, run as an [`Analysis`]: the global
//! "model" is the encoded [`Ensemble`] (the trees so far and the tree under
//! construction), each training round is one level of one tree, and
//! [`Analysis::next_version`] computes the next state from the summed
//! histograms.
//!
//! # The rounds
//!
//! 1. The statistics step (as for the other churn families): feature
//!    moments, giving the standardiser every later round uses.
//! 2. One sketch round ([`sketch`]): each agent counts its standardised
//!    values in fixed cells and its churners; the summed sketch fixes every
//!    feature's bin edges and the base score.
//! 3. One round per tree level ([`grow`]): each agent routes its rows
//!    through the tree under construction and sums the logistic loss's
//!    gradients and hessians per open node, feature and bin; the coordinator
//!    picks every open node's split from the summed histograms, makes the
//!    children at the maximum depth leaves, and starts the next tree when
//!    none is open. A tree of depth D costs exactly D rounds, whatever its
//!    number of nodes; with `run.evaluate`, one evaluation round follows
//!    each completed tree ([`Analysis::checkpoint`]).
//!
//! Each agent keeps `valid_fraction` of its training rows aside (stratified,
//! seeded by the run seed and its id): trees never see them, and the
//! evaluation's `val_auc` — the AUC of the pooled validation predictions,
//! from summed score histograms — is the model-selection and
//! early-stopping metric. The held-out rows (`ChurnData::valid`) give `auc`.
//!
//! # Privacy
//!
//! Every update is a sum over the merchant's rows, so secure aggregation
//! applies unchanged (in the statistics step's exact 2^64 ring, like the
//! other analyses). Sensitivity: with gradients in `[−1, 1]` and hessians in
//! `[0, 1/4]` (the logistic loss needs no clipping; a loss without bounded
//! gradients would clip each row's `g` at `C`), one row adds to exactly one
//! bin per feature of one open node, so adding or removing a row moves a
//! level's G histogram by at most `√d` in L2 (`d` features) and the H
//! histogram by `√d/4`; a whole merchant of `n` rows moves it by up to
//! `n·√d`, which is what record- versus merchant-level DP would have to
//! cover. DP noise is not built for this family: `run.dp` is refused, as
//! for every analysis. What the coordinator learns even under secure
//! aggregation: the tree structure (each split's feature and bin edge, i.e.
//! a threshold on the federation's standardised feature), each leaf's
//! value, the sketch (the federation's feature distributions at 1/64 of a
//! standard deviation and its churn rate), and the pooled score histograms
//! of evaluations. The leaf values and the sums behind them describe groups
//! of rows that can be small: `min_child_weight` bounds each leaf's hessian
//! sum (about `4·min_child_weight` rows at least when predictions are near
//! 1/2, fewer once they are confident), not the rows of any one merchant. Without secure
//! aggregation the coordinator sees each merchant's histograms, which give
//! its per-bin gradient sums, hence churn counts per feature range and tree
//! node.

pub mod ensemble;
pub mod grow;
pub mod sketch;

use std::collections::BTreeMap;

use super::churn::{churn_data, evaluation_with_validation, pooled_with_validation};
use super::{Analysis, ChurnData, FederatedModel, LocalData, RoundContext, TaskOutput, TrainError};
use crate::data::standardize::Standardizer;
use crate::federation::update::Update;
use crate::metrics::histogram::HISTOGRAM_LEN;
pub use ensemble::{Ensemble, GbdtError};
pub use grow::GbdtParams;

/// Gradient-boosted trees for churn on `num_features` encoded features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChurnGbdt<'a> {
    /// Encoded feature count.
    pub num_features: usize,
    /// Boosting hyper-parameters.
    pub params: &'a GbdtParams,
    /// Length of this task's update (the current level's histograms, or the
    /// sketch), set by the coordinator from the state ([`level_len`]).
    pub level_len: usize,
}

/// Length of the update a task on state `global` returns: the sketch before
/// the edges are known, the open nodes' histograms after.
pub fn level_len(global: &[f32]) -> Result<usize, GbdtError> {
    let ens = Ensemble::decode(global)?;
    Ok(if ens.sketched {
        grow::level_len(&ens)
    } else {
        sketch::sketch_len(ens.num_features)
    })
}

/// The training rows that grow trees and the validation slice kept aside
/// (the salt keeps the slices of earlier runs).
fn fit_and_valid(
    churn: &ChurnData,
    params: &GbdtParams,
    seed: u64,
    merchant: &str,
) -> (Vec<usize>, Vec<usize>) {
    super::churn::fit_and_valid(churn, params.valid_fraction, seed, "gbdt-valid", merchant)
}

fn invalid(e: GbdtError) -> TrainError {
    TrainError::InvalidModel(e.to_string())
}

impl ChurnGbdt<'_> {
    /// The checks of every task on a model: hyper-parameters, data, the
    /// standardiser, and a state of this width.
    fn prepare<'s>(
        &self,
        ctx: &RoundContext<'s>,
        global: &[f32],
        data: &LocalData,
    ) -> Result<(&'s Standardizer, Ensemble), TrainError> {
        self.check()?;
        churn_data(data, self.num_features)?;
        let scaler = ctx.standardizer.ok_or(TrainError::MissingStandardizer)?;
        let ens = Ensemble::decode(global).map_err(invalid)?;
        if ens.num_features != self.num_features || ens.max_depth != self.params.max_depth {
            return Err(TrainError::InvalidModel(format!(
                "gbdt state has {} features and depth {}, the task {} and {}",
                ens.num_features, ens.max_depth, self.num_features, self.params.max_depth
            )));
        }
        Ok((scaler, ens))
    }
}

/// Churn probabilities of raw feature rows under an encoded ensemble and
/// the run's standardiser: what `fedcart-client score` serves.
pub fn predict(
    global: &[f32],
    scaler: &Standardizer,
    x: &ndarray::Array2<f32>,
) -> Result<Vec<f32>, GbdtError> {
    let ens = Ensemble::decode(global)?;
    if ens.num_features != x.ncols() || scaler.mean.len() != x.ncols() {
        return Err(GbdtError::Features {
            expected: x.ncols(),
            got: ens.num_features,
        });
    }
    Ok(ens.predict_proba(&scaler.transform(x)))
}

impl FederatedModel for ChurnGbdt<'_> {
    fn name(&self) -> &'static str {
        "churn-gbdt"
    }

    fn data_family(&self) -> &'static str {
        "churn"
    }

    /// The length of the first state (before the sketch); later states
    /// are longer.
    fn model_len(&self) -> usize {
        ensemble::HEADER + self.num_features
    }

    fn update_len(&self) -> usize {
        self.level_len
    }

    fn stats_len(&self) -> usize {
        2 * self.num_features
    }

    /// Score histograms of the held-out rows, then of the validation slice.
    fn eval_len(&self) -> usize {
        2 * HISTOGRAM_LEN
    }

    fn pooled_metrics(&self, sum: &[f64]) -> BTreeMap<String, f64> {
        if sum.len() != 2 * HISTOGRAM_LEN {
            return BTreeMap::new();
        }
        pooled_with_validation(sum)
    }

    fn initial_params(&self, _seed: u64) -> Vec<f32> {
        Ensemble::new(self.num_features, self.params.max_depth).encode()
    }

    fn local_epochs(&self, _sgd: &super::sgd::SgdParams) -> usize {
        1
    }

    fn selection_metric(&self) -> Option<(&'static str, bool)> {
        Some(("val_auc", true))
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.num_features == 0 {
            return Err(TrainError::InvalidModel(
                "churn-gbdt needs at least one feature".into(),
            ));
        }
        self.params.check().map_err(TrainError::InvalidModel)
    }

    fn stats(
        &self,
        _ctx: &RoundContext<'_>,
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        Ok(super::churn::stats_output(churn_data(
            data,
            self.num_features,
        )?))
    }

    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let (scaler, ens) = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        let (fit_rows, _) = fit_and_valid(churn, self.params, ctx.seed, &data.merchant_id);
        let part = churn.train.select(&fit_rows);
        let x = scaler.transform(&part.x);
        let y = part.y.as_slice().expect("contiguous labels");
        let values = if ens.sketched {
            grow::histograms(&ens, &x, y)
        } else {
            sketch::sketch(&x, y)
        };
        if values.len() != self.level_len {
            return Err(TrainError::ModelLength {
                expected: self.level_len,
                got: values.len(),
            });
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
        let weight = part.len() as f64;
        Ok(TaskOutput {
            update: Some(Update {
                values,
                coord_weights: Vec::new(),
                weight,
            }),
            metrics: BTreeMap::new(),
            weight,
            validation_weight: 0.0,
        })
    }

    /// The held-out rows' metrics (`auc`, …) and the validation slice's
    /// (`val_auc`, …), with both score histograms as the summable vector.
    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let (scaler, ens) = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        let (_, valid_rows) = fit_and_valid(churn, self.params, ctx.seed, &data.merchant_id);
        let slice = churn.train.select(&valid_rows);
        let y_test = churn.valid.y.as_slice().expect("contiguous labels");
        let y_val = slice.y.as_slice().expect("contiguous labels");
        let p_test = ens.predict_proba(&scaler.transform(&churn.valid.x));
        let p_val = ens.predict_proba(&scaler.transform(&slice.x));
        let mut out = evaluation_with_validation(y_test, &p_test, Some((y_val, &p_val)));
        out.metrics.insert("trees".into(), ens.trees.len() as f64);
        Ok(out)
    }

    fn score(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        let (scaler, ens) = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        Ok(ens.predict_proba(&scaler.transform(&churn.valid.x)))
    }

    fn analysis(&self) -> Option<&dyn Analysis> {
        Some(self)
    }
}

impl Analysis for ChurnGbdt<'_> {
    fn next_version(
        &self,
        global: &[f32],
        sums: &[f64],
        total_weight: f64,
    ) -> Result<Vec<f32>, TrainError> {
        self.check()?;
        let mut ens = Ensemble::decode(global).map_err(invalid)?;
        if ens.sketched {
            grow::grow_level(&mut ens, sums, self.params).map_err(invalid)?;
        } else {
            let (edges, base) = sketch::edges_from_sketch(
                sums,
                ens.num_features,
                total_weight,
                self.params.max_bins,
            )
            .map_err(invalid)?;
            ens.edges = edges;
            ens.base_score = base;
            ens.sketched = true;
            ens.building = Some(ensemble::Tree::open_root(ens.max_depth));
        }
        Ok(ens.encode())
    }

    fn complete(&self, global: &[f32]) -> bool {
        Ensemble::decode(global)
            .is_ok_and(|e| e.sketched && e.building.is_none() && e.trees.len() >= self.params.trees)
    }

    /// Only states between trees are worth evaluating.
    fn checkpoint(&self, global: &[f32]) -> bool {
        Ensemble::decode(global).is_ok_and(|e| {
            !e.trees.is_empty()
                && e.building
                    .is_none_or(|t| t.nodes[0] == ensemble::Node::Open)
        })
    }

    /// Every value of a sketch or histogram is bounded by the rows behind
    /// it: counts and churners lie in `[0, n]`, gradient sums in `[−n, n]`,
    /// hessian sums in `[0, n/4]`. A value outside `[−n, n]` cannot come
    /// from an honest merchant.
    fn first_bad_value(&self, _sender: &str, update: &Update) -> Option<usize> {
        update
            .values
            .iter()
            .position(|&v| !(v.is_finite() && f64::from(v).abs() <= update.weight))
    }
}

#[cfg(test)]
mod tests;
