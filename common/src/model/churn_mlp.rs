//! The churn MLP family: federated parameters are all weights and biases,
//! flat (see [`MlpShape`]), divided uniformly; nothing private. It mirrors
//! [`super::churn_lr`] so the two families federate (and compare) identically.

use std::collections::BTreeMap;

use super::churn::{
    check_valid_fraction, churn_data, evaluate_with_slice, fit_part, pooled_with_validation,
    stats_output,
};
use super::mlp::{Mlp, MlpShape};
use super::{FederatedModel, LocalData, RoundContext, TaskOutput, TrainError, weighted_delta};
use crate::data::standardize::Standardizer;

/// A ReLU multi-layer perceptron for churn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChurnMlp<'a> {
    /// Encoded feature count.
    pub num_features: usize,
    /// Hidden layer widths.
    pub hidden: &'a [usize],
    /// Share of each merchant's training rows kept aside as the validation
    /// slice (`val_auc`); 0 keeps none and turns model selection off.
    pub valid_fraction: f64,
}

impl ChurnMlp<'_> {
    fn shape(&self) -> MlpShape {
        MlpShape {
            num_features: self.num_features,
            hidden: self.hidden.to_vec(),
        }
    }

    /// The checks every non-statistics task makes, in order, and the global
    /// model rebuilt from its flat parameters.
    fn prepare<'s>(
        &self,
        ctx: &RoundContext<'s>,
        global: &[f32],
        data: &LocalData,
    ) -> Result<(&'s Standardizer, Mlp), TrainError> {
        churn_data(data, self.num_features)?;
        let shape = self.shape();
        if global.len() != shape.param_len() {
            return Err(TrainError::ModelLength {
                expected: shape.param_len(),
                got: global.len(),
            });
        }
        let scaler = ctx.standardizer.ok_or(TrainError::MissingStandardizer)?;
        let model =
            Mlp::from_params(shape, global).map_err(|e| TrainError::InvalidModel(e.to_string()))?;
        Ok((scaler, model))
    }
}

impl FederatedModel for ChurnMlp<'_> {
    fn name(&self) -> &'static str {
        "churn-mlp"
    }

    fn data_family(&self) -> &'static str {
        "churn"
    }

    fn model_len(&self) -> usize {
        self.shape().param_len()
    }

    fn stats_len(&self) -> usize {
        2 * self.num_features
    }

    /// Score histograms of the held-out rows, then of the validation slice
    /// if there is one.
    fn eval_len(&self) -> usize {
        let slices = if self.valid_fraction > 0.0 { 2 } else { 1 };
        slices * crate::metrics::histogram::HISTOGRAM_LEN
    }

    fn pooled_metrics(&self, sum: &[f64]) -> BTreeMap<String, f64> {
        pooled_with_validation(sum)
    }

    /// The pooled AUC of the validation slices, when there are slices.
    fn selection_metric(&self) -> Option<(&'static str, bool)> {
        (self.valid_fraction > 0.0).then_some(("val_auc", true))
    }

    /// He-initialised parameters drawn from the run seed (zeros would never
    /// break symmetry); zeros if the shape is unusable, and the first task then
    /// reports [`TrainError::InvalidModel`].
    fn initial_params(&self, seed: u64) -> Vec<f32> {
        match Mlp::he_init(self.shape(), &mut crate::seed::rng(seed, &["mlp-init"])) {
            Ok(m) => m.params().to_vec(),
            Err(_) => vec![0.0; self.model_len()],
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        self.shape()
            .check()
            .map_err(|e| TrainError::InvalidModel(e.to_string()))?;
        check_valid_fraction("churn-mlp", self.valid_fraction)
    }

    fn stats(
        &self,
        _ctx: &RoundContext<'_>,
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        Ok(stats_output(churn_data(data, self.num_features)?))
    }

    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let (scaler, mut model) = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        let part = fit_part(churn, self.valid_fraction, ctx.seed, &data.merchant_id);
        let x = scaler.transform(&part.x);
        let mut rng = crate::seed::rng(
            ctx.seed,
            &["train-mlp", &data.merchant_id, &ctx.round.to_string()],
        );
        let report = model.fit_with(
            &x,
            &part.y,
            ctx.sgd,
            ctx.sgd.early_stopping.as_ref(),
            &mut rng,
        );
        let n = part.len() as f64;
        let update = weighted_delta(model.params(), global, n)?;
        let mut metrics = BTreeMap::from([
            ("train_loss".to_string(), f64::from(report.train_loss)),
            ("epochs_run".to_string(), report.epochs_run as f64),
            ("best_epoch".to_string(), report.best_epoch as f64),
        ]);
        if let Some(v) = report.valid_loss {
            metrics.insert("early_stop_valid_loss".to_string(), f64::from(v));
        }
        Ok(TaskOutput {
            update: Some(update),
            metrics,
            weight: n,
            validation_weight: 0.0,
        })
    }

    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let (scaler, model) = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        Ok(evaluate_with_slice(
            churn,
            self.valid_fraction,
            ctx.seed,
            &data.merchant_id,
            |x| model.predict_proba(&scaler.transform(x)),
        ))
    }

    fn score(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        let (scaler, model) = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        Ok(model.predict_proba(&scaler.transform(&churn.valid.x)))
    }
}
