//! The churn logistic-regression family: federated parameters `[w_1 … w_d, b]`,
//! divided uniformly; nothing private. The numerics live in [`super::lr`].

use std::collections::BTreeMap;

use super::churn::{
    check_valid_fraction, churn_data, classification_metrics, evaluate_with_slice, fit_part,
    pooled_with_validation, stats_output,
};
use super::lr::LogisticRegression;
use super::{FederatedModel, LocalData, RoundContext, TaskOutput, TrainError, weighted_delta};
use crate::data::standardize::Standardizer;
use crate::data::tabular::TabularDataset;

/// Logistic regression for churn on `num_features` encoded features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChurnLr {
    /// Encoded feature count (see `tabular::Schema::num_features`).
    pub num_features: usize,
    /// Share of each merchant's training rows kept aside as the validation
    /// slice (`val_auc`); 0 keeps none and turns model selection off.
    pub valid_fraction: f64,
}

impl ChurnLr {
    /// The checks every non-statistics task makes, in order: the data, the
    /// global model's length, then the standardiser.
    fn prepare<'a>(
        &self,
        ctx: &RoundContext<'a>,
        global: &[f32],
        data: &LocalData,
    ) -> Result<&'a Standardizer, TrainError> {
        churn_data(data, self.num_features)?;
        if global.len() != self.model_len() {
            return Err(TrainError::ModelLength {
                expected: self.model_len(),
                got: global.len(),
            });
        }
        ctx.standardizer.ok_or(TrainError::MissingStandardizer)
    }
}

impl FederatedModel for ChurnLr {
    fn name(&self) -> &'static str {
        "churn-lr"
    }

    fn data_family(&self) -> &'static str {
        "churn"
    }

    fn model_len(&self) -> usize {
        self.num_features + 1
    }

    fn stats_len(&self) -> usize {
        2 * self.num_features
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.num_features == 0 {
            return Err(TrainError::InvalidModel(
                "churn-lr needs at least one feature (`num_features` ≥ 1)".into(),
            ));
        }
        check_valid_fraction("churn-lr", self.valid_fraction)
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
        let scaler = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        let mut model = LogisticRegression::from_params(global);
        let part = fit_part(churn, self.valid_fraction, ctx.seed, &data.merchant_id);
        let x = scaler.transform(&part.x);
        let mut rng = crate::seed::rng(
            ctx.seed,
            &["train", &data.merchant_id, &ctx.round.to_string()],
        );
        let loss = model.fit_with(&x, &part.y, ctx.sgd, &mut rng);
        let local = model.to_params();
        let n = part.len() as f64;
        let update = weighted_delta(&local, global, n)?;
        let metrics = BTreeMap::from([("train_loss".to_string(), f64::from(loss))]);
        Ok(TaskOutput {
            update: Some(update),
            metrics,
            weight: n,
        })
    }

    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let scaler = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        let model = LogisticRegression::from_params(global);
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
        let scaler = self.prepare(ctx, global, data)?;
        let churn = churn_data(data, self.num_features)?;
        let model = LogisticRegression::from_params(global);
        Ok(model.predict_proba(&scaler.transform(&churn.valid.x)))
    }
}

/// Held-out metrics of a logistic-regression model: AUC, log-loss, accuracy,
/// precision and recall at 0.5.
pub fn evaluate_lr(
    model: &LogisticRegression,
    scaler: &Standardizer,
    ds: &TabularDataset,
) -> BTreeMap<String, f64> {
    let probs = model.predict_proba(&scaler.transform(&ds.x));
    let y = ds.y.as_slice().expect("contiguous labels");
    classification_metrics(y, &probs)
}
