//! Local work on a merchant's data: the one function both the agent process
//! and the simulator call to carry out a task.
//!
//! `run_task` takes the task, the global parameters and the merchant's local
//! data (including any private state, which it may update) and returns the
//! update to send plus local metrics. What it returns is, by construction,
//! only the federated parameters' weighted delta or aggregate statistics.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::data::standardize::{Standardizer, stats_update};
use crate::data::tabular::TabularDataset;
use crate::federation::update::Update;
use crate::metrics::{Confusion, auc, log_loss};
use crate::model::lr::LogisticRegression;
use crate::model::mf::{MfData, MfShape, run_mf_task};
use crate::task::{ModelSpec, TaskKind, TaskSpec};

/// A merchant's churn data, split locally into training and held-out rows.
#[derive(Debug, Clone)]
pub struct ChurnData {
    /// Rows used for training.
    pub train: TabularDataset,
    /// Rows used for local evaluation (never trained on).
    pub valid: TabularDataset,
}

/// Everything a merchant holds locally.
#[derive(Debug, Clone, Default)]
pub struct LocalData {
    /// The merchant's identifier, used to derive its random streams.
    pub merchant_id: String,
    /// Churn data, if the merchant takes part in churn tasks.
    pub churn: Option<ChurnData>,
    /// Recommender data and the private user state, if the merchant takes
    /// part in matrix-factorisation tasks.
    pub mf: Option<MfData>,
}

/// The result of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutput {
    /// The update to send (None for evaluation tasks).
    pub update: Option<Update>,
    /// Local metrics (training loss, or held-out metrics).
    pub metrics: BTreeMap<String, f64>,
    /// Example weight of the metrics and the update.
    pub weight: f64,
}

/// Why a task could not be carried out locally.
#[derive(Debug, Error, PartialEq)]
pub enum TrainError {
    /// The merchant holds no data of the family the task needs.
    #[error("this merchant has no {0} data")]
    NoData(&'static str),
    /// The global parameters do not have the model's length.
    #[error("global model has {got} values, the task's model needs {expected}")]
    ModelLength {
        /// Length the task's model needs.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The features do not match the model's width.
    #[error("local data has {got} features, the model expects {expected}")]
    FeatureWidth {
        /// Width the model expects.
        expected: usize,
        /// Width of the local data.
        got: usize,
    },
    /// Training produced a NaN or infinite value; nothing is sent.
    #[error("local training diverged (non-finite parameter); lower the learning rate")]
    Diverged,
    /// A local interaction names an item index outside the task's catalogue
    /// (the merchant's catalogue is newer than the federation's model).
    #[error("local item index {item} is outside the model's catalogue of {num_items} items")]
    ItemOutOfRange {
        /// The offending dense item index.
        item: usize,
        /// Catalogue size of the task's model.
        num_items: usize,
    },
    /// The model specification itself is unusable (e.g. a zero-width layer).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The update could not be put in its differentially private form.
    #[error("differential privacy: {0}")]
    Privacy(crate::privacy::dp::DpError),
    /// A train task arrived before the statistics step finished.
    #[error("the task needs feature statistics but carries none")]
    MissingStandardizer,
}

impl LocalData {
    /// Example counts per data family, as advertised when joining.
    pub fn examples(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(c) = &self.churn {
            out.insert("churn".into(), c.train.len() as u64);
        }
        if let Some(m) = &self.mf {
            out.insert("mf".into(), m.train.len() as u64);
        }
        out
    }
}

/// Carries out `spec` on `data`, starting from `global`.
///
/// A training task with differential privacy (`spec.dp`) returns the clipped,
/// weight-1 form of the update (see [`crate::privacy::dp::task`]): agent and simulator
/// clip here, in the one function they share.
pub fn run_task(
    spec: &TaskSpec,
    global: &[f32],
    data: &mut LocalData,
) -> Result<TaskOutput, TrainError> {
    let mut out = run_task_plain(spec, global, data)?;
    if let (Some(dp), TaskKind::Train) = (&spec.dp, spec.kind) {
        crate::privacy::dp::privatise(dp, &spec.model.layout(), &mut out)
            .map_err(TrainError::Privacy)?;
    }
    Ok(out)
}

fn run_task_plain(
    spec: &TaskSpec,
    global: &[f32],
    data: &mut LocalData,
) -> Result<TaskOutput, TrainError> {
    match &spec.model {
        ModelSpec::ChurnLr { num_features } => churn_lr_task(spec, *num_features, global, data),
        ModelSpec::Noop { dim } => Ok(noop_task(spec, *dim, &data.merchant_id)),
        ModelSpec::ChurnMlp {
            num_features,
            hidden,
        } => crate::model::churn::mlp_task(spec, *num_features, hidden, global, data),
        ModelSpec::Mf {
            num_items,
            factors,
            hyper,
        }
        | ModelSpec::MfImplicit {
            num_items,
            factors,
            hyper,
        } => {
            let shape = MfShape {
                num_items: *num_items,
                k: *factors,
                implicit: matches!(spec.model, ModelSpec::MfImplicit { .. }),
                hyper,
            };
            let mf = data.mf.as_mut().ok_or(TrainError::NoData("mf"))?;
            run_mf_task(spec, shape, global, mf, &data.merchant_id)
        }
    }
}

/// A seeded random update of `dim` values in [-1, 1), weight 1, no training.
fn noop_task(spec: &TaskSpec, dim: usize, merchant_id: &str) -> TaskOutput {
    if spec.kind == TaskKind::Evaluate {
        return TaskOutput {
            update: None,
            metrics: BTreeMap::new(),
            weight: 1.0,
        };
    }
    let seed = crate::seed::derive(spec.seed, &["noop", merchant_id, &spec.round.to_string()]);
    let values = uniform_pm1(seed, dim);
    let update = Update {
        values,
        coord_weights: Vec::new(),
        weight: 1.0,
    };
    TaskOutput {
        update: Some(update),
        metrics: BTreeMap::new(),
        weight: 1.0,
    }
}

/// `n` values uniform on the grid `k · 2⁻²³ − 1`, k in 0..2²⁴, i.e. in
/// [-1, 1), from `LANES` interleaved xoshiro128+ streams seeded by
/// SplitMix64 from `seed`.
///
/// The noop task stands for "training" in overhead benchmarks, so its cost
/// must be negligible next to what is measured: one `random_range` call per
/// value on ChaCha8 was most of the simulator's noop round. The lanes are
/// independent, so the compiler runs them in SIMD registers (plain SSE2
/// shifts, adds and xors), about 1 ns per 4 values; each 32-bit output keeps
/// its top 24 bits (xoshiro128+'s strong ones), exactly representable in f32.
/// Not a cryptographic or statistically demanding generator: noop only.
// Indexing all four state arrays by lane is the form the vectoriser likes.
#[allow(clippy::needless_range_loop)]
fn uniform_pm1(seed: u64, n: usize) -> Vec<f32> {
    const LANES: usize = 16;
    const SCALE: f32 = 1.0 / (1u32 << 23) as f32;
    let mut sm = seed;
    let mut splitmix = || {
        sm = sm.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = sm;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut s = [[0u32; LANES]; 4];
    for lane in 0..LANES {
        let (a, b) = (splitmix(), splitmix());
        // Never all zero: the top word is odd.
        s[0][lane] = a as u32;
        s[1][lane] = (a >> 32) as u32;
        s[2][lane] = b as u32;
        s[3][lane] = (b >> 32) as u32 | 1;
    }
    // Whole blocks of LANES values (the tail is cut off at the end), so that
    // the conversion below is a fixed-size loop the compiler vectorises.
    let mut out = Vec::with_capacity(n.next_multiple_of(LANES));
    while out.len() < n {
        let [s0, s1, s2, s3] = &mut s;
        let mut r = [0u32; LANES];
        for i in 0..LANES {
            r[i] = s0[i].wrapping_add(s3[i]);
            let t = s1[i] << 9;
            s2[i] ^= s0[i];
            s3[i] ^= s1[i];
            s1[i] ^= s2[i];
            s0[i] ^= s3[i];
            s2[i] ^= t;
            s3[i] = s3[i].rotate_left(11);
        }
        let mut f = [0.0f32; LANES];
        for i in 0..LANES {
            // < 2²⁴ after the shift: a signed conversion is exact (and SIMD).
            f[i] = ((r[i] >> 8) as i32) as f32 * SCALE - 1.0;
        }
        out.extend_from_slice(&f);
    }
    out.truncate(n);
    out
}

fn churn_lr_task(
    spec: &TaskSpec,
    num_features: usize,
    global: &[f32],
    data: &LocalData,
) -> Result<TaskOutput, TrainError> {
    let churn = data.churn.as_ref().ok_or(TrainError::NoData("churn"))?;
    if churn.train.x.ncols() != num_features {
        return Err(TrainError::FeatureWidth {
            expected: num_features,
            got: churn.train.x.ncols(),
        });
    }
    if spec.kind == TaskKind::Stats {
        let update = stats_update(&churn.train.x);
        let weight = update.weight;
        return Ok(TaskOutput {
            update: Some(update),
            metrics: BTreeMap::new(),
            weight,
        });
    }
    if global.len() != spec.model.model_len() {
        return Err(TrainError::ModelLength {
            expected: spec.model.model_len(),
            got: global.len(),
        });
    }
    let scaler = spec
        .standardizer
        .as_ref()
        .ok_or(TrainError::MissingStandardizer)?;
    let mut model = LogisticRegression::from_params(global);
    match spec.kind {
        TaskKind::Train => {
            let x = scaler.transform(&churn.train.x);
            let mut rng = crate::seed::rng(
                spec.seed,
                &["train", &data.merchant_id, &spec.round.to_string()],
            );
            let loss = model.fit_with(&x, &churn.train.y, &spec.sgd, &mut rng);
            let local = model.to_params();
            let n = churn.train.len() as f64;
            let update = weighted_delta(&local, global, n)?;
            let metrics = BTreeMap::from([("train_loss".to_string(), f64::from(loss))]);
            Ok(TaskOutput {
                update: Some(update),
                metrics,
                weight: n,
            })
        }
        TaskKind::Evaluate => {
            let metrics = evaluate_lr(&model, scaler, &churn.valid);
            Ok(TaskOutput {
                update: None,
                metrics,
                weight: churn.valid.len() as f64,
            })
        }
        TaskKind::Stats => unreachable!("handled above"),
    }
}

/// `n · (local − global)` as an update of weight `n`; refuses non-finite values.
pub fn weighted_delta(local: &[f32], global: &[f32], n: f64) -> Result<Update, TrainError> {
    let values: Vec<f32> = local
        .iter()
        .zip(global)
        .map(|(l, g)| ((l - g) as f64 * n) as f32)
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    Ok(Update {
        values,
        coord_weights: Vec::new(),
        weight: n,
    })
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

/// The standard churn metrics from labels and predicted probabilities.
pub fn classification_metrics(y: &[f32], probs: &[f32]) -> BTreeMap<String, f64> {
    let c = Confusion::at(y, probs, 0.5);
    BTreeMap::from([
        ("auc".to_string(), auc(y, probs)),
        ("log_loss".to_string(), log_loss(y, probs)),
        ("accuracy".to_string(), c.accuracy()),
        ("precision".to_string(), c.precision()),
        ("recall".to_string(), c.recall()),
    ])
}

impl LocalData {
    /// Pools several merchants' data into one, for the centralised baseline.
    /// Private per-merchant state is not pooled; each family re-creates it.
    pub fn pooled(merchant_id: &str, parts: &[LocalData]) -> LocalData {
        let churn_parts: Vec<&ChurnData> = parts.iter().filter_map(|p| p.churn.as_ref()).collect();
        let churn = (!churn_parts.is_empty()).then(|| ChurnData {
            train: TabularDataset::concat(
                &churn_parts.iter().map(|c| &c.train).collect::<Vec<_>>(),
            ),
            valid: TabularDataset::concat(
                &churn_parts.iter().map(|c| &c.valid).collect::<Vec<_>>(),
            ),
        });
        let mf_parts: Vec<(&str, &MfData)> = parts
            .iter()
            .filter_map(|p| p.mf.as_ref().map(|m| (p.merchant_id.as_str(), m)))
            .collect();
        let mf = (!mf_parts.is_empty()).then(|| MfData::pooled(&mf_parts));
        LocalData {
            merchant_id: merchant_id.to_string(),
            churn,
            mf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_pm1_is_seeded_bounded_and_centred() {
        let draw = |seed| uniform_pm1(seed, 10_001);
        let a = draw(1);
        assert_eq!(a.len(), 10_001);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        // Uniform on [-1, 1): standard error of the mean is 0.577/√n ≈ 0.006.
        assert!(mean.abs() < 0.03, "mean {mean}");
        let below = a.iter().filter(|&&v| v < -0.5).count() as f64 / a.len() as f64;
        assert!((below - 0.25).abs() < 0.02, "fraction below -0.5: {below}");
        // Neighbouring values (different lanes) are not correlated.
        let lag1 = a.windows(2).map(|w| f64::from(w[0] * w[1])).sum::<f64>() / a.len() as f64;
        assert!(lag1.abs() < 0.02, "lag-1 product mean {lag1}");
    }
}
