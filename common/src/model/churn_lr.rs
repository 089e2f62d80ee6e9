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
            validation_weight: 0.0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChurnData;
    use crate::model::lr::SgdParams;

    fn merchant(extra: Option<[f32; 2]>) -> LocalData {
        let n = 200;
        let mut x = ndarray::Array2::from_shape_fn((n, 2), |(i, j)| {
            let k = i as f32;
            if j == 0 {
                (k * 0.37).sin() * 300.0 + 500.0
            } else {
                (k * 1.3).cos()
            }
        });
        if let Some(row) = extra {
            for i in 0..5 {
                x[[i, 0]] = row[0];
                x[[i, 1]] = row[1];
            }
        }
        let y = ndarray::Array1::from_shape_fn(n, |i| f32::from(u8::from(x[[i, 0]] > 500.0)));
        let ds = TabularDataset {
            ids: (0..n).map(|i| format!("c{i}")).collect(),
            x,
            y,
        };
        LocalData {
            merchant_id: "m4".into(),
            churn: Some(ChurnData {
                train: ds.clone(),
                valid: ds,
            }),
            ..Default::default()
        }
    }

    /// A merchant the statistics step never saw, five of whose customers
    /// have a monetary value of 9e14 (4e12 standard deviations): its update
    /// stays the size of an ordinary one instead of wrecking the model.
    #[test]
    fn a_customer_far_outside_the_statistics_cannot_dominate_the_update() {
        let model = ChurnLr {
            num_features: 2,
            valid_fraction: 0.0,
        };
        let seen = merchant(None);
        let scaler = Standardizer::fit(&seen.churn.as_ref().unwrap().train.x);
        // Every row trained on (no early-stopping slice to hide it in).
        let sgd = SgdParams {
            early_stopping: None,
            ..SgdParams::default()
        };
        let ctx = RoundContext {
            sgd: &sgd,
            seed: 3,
            round: 1,
            standardizer: Some(&scaler),
            best_version: None,
        };
        let global = vec![0.0f32; 3];
        let norm = |data: &mut LocalData| -> f64 {
            let out = model.fit(&ctx, &global, data).unwrap();
            let u = out.update.unwrap();
            let w = u.weight;
            u.values
                .iter()
                .map(|v| (f64::from(*v) / w).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let ordinary = norm(&mut merchant(None));
        let absurd = norm(&mut merchant(Some([9e14, 0.0])));
        assert!(absurd.is_finite() && ordinary > 0.0);
        assert!(absurd < 3.0 * ordinary, "{absurd} against {ordinary}");
        // Unclamped, the same row moves the model by orders of magnitude.
        let unclamped = Standardizer {
            rows: None,
            ..scaler.clone()
        };
        let ctx = RoundContext {
            standardizer: Some(&unclamped),
            ..ctx
        };
        let out = model
            .fit(&ctx, &global, &mut merchant(Some([9e14, 0.0])))
            .unwrap();
        let u = out.update.unwrap();
        let wild = u
            .values
            .iter()
            .map(|v| (f64::from(*v) / u.weight).abs())
            .fold(0.0, f64::max);
        assert!(wild > 100.0 * ordinary, "{wild} against {ordinary}");
    }
}
