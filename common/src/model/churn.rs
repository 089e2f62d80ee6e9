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
        validation_weight: 0.0,
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
        validation_weight: 0.0,
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

/// Default share of a merchant's training rows a churn model keeps aside as
/// its validation slice: the federated `val_auc` model selection and early
/// stopping look at (see BENCHMARKS.md, "Churn model selection", for how it
/// was chosen).
pub const DEFAULT_VALID_FRACTION: f64 = 0.1;

/// Refuses a validation share outside `[0, 0.5)`, naming the family's key.
pub fn check_valid_fraction(family: &str, fraction: f64) -> Result<(), TrainError> {
    if (0.0..0.5).contains(&fraction) {
        Ok(())
    } else {
        Err(TrainError::InvalidModel(format!(
            "{family} valid_fraction {fraction} is not in [0, 0.5) (the share of each \
             merchant's training rows kept aside for validation; 0 keeps none)"
        )))
    }
}

/// The training rows a model fits on and the validation slice kept aside,
/// split by label (stratified), seeded by the run seed, `salt` and the
/// merchant: the same rows every round, never trained on.
pub fn fit_and_valid(
    churn: &ChurnData,
    fraction: f64,
    seed: u64,
    salt: &str,
    merchant: &str,
) -> (Vec<usize>, Vec<usize>) {
    let y = churn.train.y.as_slice().expect("contiguous labels");
    let s = crate::seed::derive(seed, &[salt, merchant]);
    crate::data::split::stratified_train_test(y, fraction, s)
}

/// The training rows churn LR or the MLP fits on: all but its validation
/// slice (`valid_fraction` of them, the same every round).
pub fn fit_part(
    churn: &ChurnData,
    valid_fraction: f64,
    seed: u64,
    merchant: &str,
) -> crate::data::tabular::TabularDataset {
    let (fit, _) = fit_and_valid(churn, valid_fraction, seed, "churn-valid", merchant);
    churn.train.select(&fit)
}

/// The evaluation of churn LR or the MLP: `predict` (raw feature rows to
/// probabilities) on the held-out rows and, if it keeps one, on the
/// validation slice ([`evaluation_with_validation`]).
pub fn evaluate_with_slice(
    churn: &ChurnData,
    valid_fraction: f64,
    seed: u64,
    merchant: &str,
    predict: impl Fn(&ndarray::Array2<f32>) -> Vec<f32>,
) -> TaskOutput {
    let p_test = predict(&churn.valid.x);
    let y_test = churn.valid.y.as_slice().expect("contiguous labels");
    if valid_fraction == 0.0 {
        return evaluation_with_validation(y_test, &p_test, None);
    }
    let (_, valid) = fit_and_valid(churn, valid_fraction, seed, "churn-valid", merchant);
    let slice = churn.train.select(&valid);
    let p_val = predict(&slice.x);
    let y_val = slice.y.as_slice().expect("contiguous labels");
    evaluation_with_validation(y_test, &p_test, Some((y_val, &p_val)))
}

/// A churn evaluation that also scores the validation slice, if there is
/// one: the held-out rows' metrics (`auc`, …) and the slice's (`val_auc`,
/// …), the former weighted by the held-out row count and the latter by the
/// slice's, with both score histograms as the summable vector (held-out first; see [`pooled_with_validation`]).
/// Without a slice it is [`evaluation_output`].
pub fn evaluation_with_validation(
    y_test: &[f32],
    p_test: &[f32],
    validation: Option<(&[f32], &[f32])>,
) -> TaskOutput {
    let mut out = evaluation_output(y_test, p_test);
    let Some((y_val, p_val)) = validation else {
        return out;
    };
    for (k, v) in classification_metrics(y_val, p_val) {
        out.metrics.insert(format!("val_{k}"), v);
    }
    out.validation_weight = y_val.len() as f64;
    if let Some(u) = &mut out.update {
        u.values.extend(score_histogram(y_val, p_val));
    }
    out
}

/// The federation's metrics from summed [`evaluation_with_validation`]
/// vectors: the held-out `auc`/`pr_auc`, and the slice's `val_auc`/
/// `val_pr_auc` when the vector has the slice's histogram.
pub fn pooled_with_validation(sum: &[f64]) -> BTreeMap<String, f64> {
    use crate::metrics::histogram::HISTOGRAM_LEN;
    if sum.len() != 2 * HISTOGRAM_LEN {
        return pooled_classification_metrics(sum);
    }
    let (held_out, valid) = sum.split_at(HISTOGRAM_LEN);
    let mut m = pooled_classification_metrics(held_out);
    for (k, v) in pooled_classification_metrics(valid) {
        m.insert(format!("val_{k}"), v);
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
            ModelSpec::churn_lr(Schema::telco().num_features()),
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
            ModelSpec::churn_mlp(Schema::telco().num_features(), vec![16]),
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

    /// The validation slice is never trained on: with the standardiser
    /// fixed, scrambling the slice's rows leaves every training update of
    /// both families bit for bit unchanged (and changes it without a slice),
    /// while the evaluation's `val_*` figures move and the held-out ones do
    /// not. The slice is what model selection reads.
    #[test]
    fn churn_models_keep_a_validation_slice_they_never_train_on() {
        let nf = Schema::telco().num_features();
        let scramble = |m: &mut LocalData, fraction: f64| {
            let churn = m.churn.as_mut().unwrap();
            let (_, va) = fit_and_valid(churn, fraction, 42, "churn-valid", &m.merchant_id);
            let scramble_all = fraction == 0.0;
            let rows: Vec<usize> = if scramble_all { vec![0, 1, 2] } else { va };
            for i in rows {
                churn.train.x.row_mut(i).mapv_inplace(|v| -3.0 * v + 1.0);
            }
        };
        for (fraction, model) in [
            (DEFAULT_VALID_FRACTION, ModelSpec::churn_lr(nf)),
            (DEFAULT_VALID_FRACTION, ModelSpec::churn_mlp(nf, vec![8])),
            (
                0.0,
                ModelSpec::ChurnLr {
                    num_features: nf,
                    valid_fraction: 0.0,
                },
            ),
        ] {
            let mut base = partition_churn(&telco(), 2, 0.2, 7);
            let mut s = spec(
                model.clone(),
                SgdParams {
                    epochs: 2,
                    ..Default::default()
                },
            );
            s.standardizer = crate::reference::stats_step(&s, &mut base).unwrap();
            let params = model.initial_params(42);
            let mut changed = base.clone();
            for m in &mut changed {
                scramble(m, fraction);
            }
            let run =
                |s: &TaskSpec, m: &mut LocalData| crate::train::run_task(s, &params, m).unwrap();
            let (a, b) = (run(&s, &mut base[0]), run(&s, &mut changed[0]));
            // Evaluated at the locally trained model (the initial LR scores 1/2 everywhere).
            let u = a.update.as_ref().unwrap();
            let trained: Vec<f32> = params
                .iter()
                .zip(&u.values)
                .map(|(p, v)| p + v / u.weight as f32)
                .collect();
            let mut e = s.clone();
            e.kind = TaskKind::Evaluate;
            let eval = |m: &mut LocalData| crate::train::run_task(&e, &trained, m).unwrap();
            let (ea, eb) = (eval(&mut base[0]), eval(&mut changed[0]));
            assert_eq!(ea.metrics["auc"], eb.metrics["auc"], "{}", model.name());
            if fraction == 0.0 {
                assert_ne!(a.update, b.update, "without a slice every row trains");
                assert!(model.selection_metric().is_none());
                assert!(!ea.metrics.contains_key("val_auc"));
                continue;
            }
            assert_eq!(
                a.update,
                b.update,
                "{} trained on its validation slice",
                model.name()
            );
            assert_eq!(model.selection_metric(), Some(("val_auc", true)));
            assert_ne!(ea.metrics["val_auc"], eb.metrics["val_auc"]);
            // The pooled evaluation carries the slice's AUC as well.
            let sum: Vec<f64> = ea
                .update
                .unwrap()
                .values
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let pooled = model.model().pooled_metrics(&sum);
            assert!(pooled["val_auc"] > 0.6 && pooled["auc"] > 0.6, "{pooled:?}");
        }
    }

    #[test]
    fn a_validation_share_outside_0_to_one_half_is_refused_naming_the_key() {
        // A configuration without the key keeps the default slice.
        let m: ModelSpec =
            serde_json::from_str(r#"{"family":"churn_mlp","num_features":3,"hidden":[4]}"#)
                .unwrap();
        assert_eq!(m, ModelSpec::churn_mlp(3, vec![4]));
        assert_eq!(m.selection_metric(), Some(("val_auc", true)));
        for bad in [-0.1, 0.5, f64::NAN] {
            let m = ModelSpec::ChurnLr {
                num_features: 3,
                valid_fraction: bad,
            };
            let err = m.model().check().unwrap_err().to_string();
            assert!(err.contains("churn-lr valid_fraction"), "{err}");
        }
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
        let m = ModelSpec::churn_mlp(4, vec![3]);
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
