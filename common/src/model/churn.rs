//! What the two churn families (logistic regression and the MLP) share: the
//! local data checks, the statistics step, the classification metrics and the
//! iid partition the simulator, benchmarks and tests build merchants with.

use std::collections::BTreeMap;

use super::{ChurnData, LocalData, TaskOutput, TrainError};
use crate::federation::update::Update;
use crate::metrics::histogram::{auc_from_histogram, pr_auc_from_histogram, score_histogram};
use crate::metrics::{Confusion, auc, log_loss};

/// The merchant's churn data, checked against the model's feature width.
pub fn churn_data(data: &LocalData, num_features: usize) -> Result<&ChurnData, TrainError> {
    let churn = data.churn.as_ref().ok_or(TrainError::NoData("churn"))?;
    if churn.train.x.ncols() != num_features {
        return Err(TrainError::FeatureWidth {
            expected: num_features,
            got: churn.train.x.ncols(),
        });
    }
    Ok(churn)
}

/// The statistics step of a churn family: feature sums and counts of the
/// training rows (see `data::standardize::stats_update`).
pub fn stats_output(churn: &ChurnData) -> TaskOutput {
    let update = crate::data::standardize::stats_update(&churn.train.x);
    let weight = update.weight;
    TaskOutput {
        update: Some(update),
        metrics: BTreeMap::new(),
        weight,
    }
}

/// The standard churn metrics from labels and predicted probabilities. The
/// AUC is reported only where both classes are present, precision only
/// where some customer is predicted to churn and recall only where some
/// customer churned (each is undefined otherwise, and a 0 would be averaged
/// into the federation's figure as if the model had missed); the
/// federation's AUC comes from summed histograms instead
/// ([`pooled_classification_metrics`]).
pub fn classification_metrics(y: &[f32], probs: &[f32]) -> BTreeMap<String, f64> {
    // Nothing to measure on: no figure (a log-loss of 0 read as perfect).
    if y.is_empty() || probs.is_empty() {
        return BTreeMap::new();
    }
    let c = Confusion::at(y, probs, 0.5);
    let mut m = BTreeMap::from([
        ("log_loss".to_string(), log_loss(y, probs)),
        ("accuracy".to_string(), c.accuracy()),
    ]);
    if c.tp + c.fp > 0 {
        m.insert("precision".to_string(), c.precision());
    }
    if c.tp + c.fn_ > 0 {
        m.insert("recall".to_string(), c.recall());
    }
    let positives = y.iter().filter(|&&v| v > 0.5).count();
    if positives > 0 && positives < y.len().min(probs.len()) {
        m.insert("auc".to_string(), auc(y, probs));
    }
    m
}

/// A churn evaluation's output: the merchant's own metrics (weighted by its
/// held-out row count), and its per-class score histogram as the summable
/// evaluation vector. Only the vector's sum is used, so its weight is 1: a
/// merchant without held-out rows still sends its (empty) histogram.
pub fn evaluation_output(y: &[f32], probs: &[f32]) -> TaskOutput {
    let weight = y.len() as f64;
    TaskOutput {
        update: Some(Update {
            values: score_histogram(y, probs),
            coord_weights: Vec::new(),
            weight: 1.0,
        }),
        metrics: classification_metrics(y, probs),
        weight,
    }
}

/// The federation's AUC and PR-AUC from the summed score histograms (absent
/// when a class is absent from every merchant's held-out rows).
pub fn pooled_classification_metrics(sum: &[f64]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if let Some(v) = auc_from_histogram(sum) {
        m.insert("auc".to_string(), v);
    }
    if let Some(v) = pr_auc_from_histogram(sum) {
        m.insert("pr_auc".to_string(), v);
    }
    m
}

/// Deals a churn dataset's rows into `merchants` iid shards (seeded) and
/// splits each shard locally into training and held-out rows, stratified by
/// label — how the simulator, benchmarks and tests build churn merchants.
// `..Default::default()` stays: other model families add fields to `LocalData`.
#[allow(clippy::needless_update)]
pub fn partition_churn(
    ds: &crate::data::tabular::TabularDataset,
    merchants: usize,
    holdout: f64,
    seed: u64,
) -> Vec<LocalData> {
    let all: Vec<usize> = (0..ds.len()).collect();
    crate::data::split::iid_partition(&all, merchants, seed)
        .into_iter()
        .enumerate()
        .map(|(k, rows)| {
            let part = ds.select(&rows);
            let y = part.y.as_slice().expect("contiguous labels");
            let (tr, va) = crate::data::split::stratified_train_test(y, holdout, seed);
            LocalData {
                merchant_id: format!("m{k}"),
                churn: Some(ChurnData {
                    train: part.select(&tr),
                    valid: part.select(&va),
                }),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tabular::Schema;
    use crate::federation::strategy::FedAvg;
    use crate::model::lr::SgdParams;
    use crate::model::mlp::EarlyStopping;
    use crate::reference::{evaluate, federate};
    use crate::task::{ModelSpec, TaskKind, TaskSpec};
    use crate::train::{LocalData, TrainError};

    fn telco() -> crate::data::tabular::TabularDataset {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/telco-churn/Telco-Customer-Churn.csv");
        Schema::telco().load_csv(&path).unwrap()
    }

    fn spec(model: ModelSpec, sgd: SgdParams) -> TaskSpec {
        TaskSpec {
            kind: TaskKind::Train,
            model,
            sgd,
            seed: 42,
            round: 0,
            standardizer: None,
            dp: None,
            best_version: None,
        }
    }

    /// scikit-learn's LogisticRegression scores 0.8457 on this exact split
    /// (exported by `examples/churn_bench.rs --export`).
    #[test]
    fn telco_lr_centralised_reaches_sklearn_auc_and_federated_is_within_0_005() {
        let ds = telco();
        let mut merchants = partition_churn(&ds, 5, 0.2, 42);
        let mut pooled = vec![LocalData::pooled("all", &merchants)];
        let s = spec(
            ModelSpec::ChurnLr {
                num_features: Schema::telco().num_features(),
            },
            SgdParams::default(),
        );
        let c = federate(&s, &mut pooled, 20, &mut FedAvg).unwrap();
        let f = federate(&s, &mut merchants, 20, &mut FedAvg).unwrap();
        let central = c.rounds.last().unwrap()["auc"];
        let mut on_pooled = s.clone();
        on_pooled.standardizer = f.standardizer.clone();
        let fed = evaluate(&on_pooled, &f.params, &mut pooled).unwrap()["auc"];
        assert!(central >= 0.84, "centralised auc {central}");
        assert!(
            (fed - central).abs() <= 0.005,
            "federated {fed} vs {central}"
        );
    }

    #[test]
    fn telco_mlp_federates_through_run_task_deterministically() {
        let ds = telco();
        let mut merchants = partition_churn(&ds, 5, 0.2, 42);
        let s = spec(
            ModelSpec::ChurnMlp {
                num_features: Schema::telco().num_features(),
                hidden: vec![16],
            },
            SgdParams {
                epochs: 3,
                learning_rate: 0.001,
                early_stopping: Some(EarlyStopping::default()),
                ..Default::default()
            },
        );
        let a = federate(&s, &mut merchants, 4, &mut FedAvg).unwrap();
        let b = federate(&s, &mut merchants, 4, &mut FedAvg).unwrap();
        assert_eq!(a.params, b.params);
        assert_eq!(a.params.len(), 45 * 16 + 16 + 16 + 1);
        let auc = a.rounds.last().unwrap()["auc"];
        assert!(auc > 0.83, "auc {auc}");
    }

    #[test]
    fn an_evaluation_without_held_out_rows_still_sends_a_valid_histogram() {
        let out = evaluation_output(&[], &[]);
        let u = out.update.unwrap();
        u.validate(
            crate::metrics::histogram::HISTOGRAM_LEN,
            &Default::default(),
        )
        .unwrap();
        assert!(u.values.iter().all(|&v| v == 0.0));
        assert_eq!(out.weight, 0.0);
        assert!(!out.metrics.contains_key("auc"));
    }

    #[test]
    fn mlp_initial_params_are_seeded_he_and_tasks_check_lengths() {
        let m = ModelSpec::ChurnMlp {
            num_features: 4,
            hidden: vec![3],
        };
        assert_eq!(m.initial_params(1), m.initial_params(1));
        assert_ne!(m.initial_params(1), m.initial_params(2));
        assert_eq!(m.initial_params(1).len(), m.model_len());
        let mut data = partition_churn(&telco(), 1, 0.2, 1).remove(0);
        let mut s = spec(m, SgdParams::default());
        s.kind = TaskKind::Train;
        let err = crate::train::run_task(&s, &[0.0; 3], &mut data).unwrap_err();
        assert_eq!(
            err,
            TrainError::FeatureWidth {
                expected: 4,
                got: 45
            }
        );
    }

    /// A merchant with no churner has no recall, and a model that predicts
    /// no churner no precision: they were 0.0 and averaged in as misses.
    #[test]
    fn undefined_precision_and_recall_are_absent_not_zero() {
        let m = classification_metrics(&[0.0, 0.0], &[0.2, 0.9]);
        assert_eq!(m.get("precision"), Some(&0.0));
        assert!(!m.contains_key("recall") && !m.contains_key("auc"), "{m:?}");
        let m = classification_metrics(&[1.0, 0.0], &[0.2, 0.1]);
        assert_eq!(m.get("recall"), Some(&0.0));
        assert!(!m.contains_key("precision"), "{m:?}");
        let m = classification_metrics(&[1.0, 0.0], &[0.8, 0.1]);
        assert_eq!((m["precision"], m["recall"]), (1.0, 1.0));
        // No held-out row: no figure at all (accuracy and log-loss were 0).
        assert!(classification_metrics(&[], &[]).is_empty());
    }
}
