//! The model families federated by fedcart, behind one seam: [`FederatedModel`].
//!
//! A family is a module implementing [`FederatedModel`]: its federated
//! parameter layout (`model_len`, [`WeightLayout`]), its first global
//! parameters, the statistics step, the local fit starting from the global
//! model (returning only the weighted update; private state such as MF user
//! factors stays inside [`LocalData`]), held-out evaluation and scoring. In the spirit
//! of linfa's `Fit`: hyper-parameters are plain data, checked by
//! [`FederatedModel::check`], and `fit` always starts from the global version.
//!
//! The families: churn logistic regression ([`churn_lr`]), the churn MLP
//! ([`churn_mlp`]), churn gradient-boosted trees ([`gbdt`], an [`Analysis`]
//! growing one tree level per round), explicit and implicit (BPR) matrix factorisation ([`mf`]),
//! k-means segments ([`kmeans`]; the whole segmentation pipeline — candidate
//! initialisation, choice of k, Lloyd rounds — is [`segments`], an
//! [`Analysis`]), frequent itemsets ([`itemsets`], an [`Analysis`]) and the overhead-benchmark [`noop`]. Their numerical cores are [`lr`],
//! [`mlp`] (sharing [`sgd`]) and `mf`'s kernels; [`churn`] holds what both
//! churn families share.
//!
//! Layering: this module and its children never import `task` or `train`;
//! `task::ModelSpec::model` (the serde wire enum's one `match`) picks the
//! family and `train::run_task` dispatches through the trait.
//!
//! # Adding a model
//!
//! 1. Write `common/src/model/<family>.rs` with a struct holding the family's
//!    shape and hyper-parameters and `impl FederatedModel for it`: `name`,
//!    `data_family`, `model_len`, `layout` (default: uniform),
//!    `initial_params` (default: zeros), `check`, `stats`, `fit`, `evaluate`,
//!    `score`.
//!    Keep private state in [`LocalData`] and return only `n · (local − global)`
//!    (see [`weighted_delta`]). Declare it here with `pub mod <family>;`.
//! 2. Register it: add a variant to `task::ModelSpec` (its JSON is the wire
//!    format) and one arm to `ModelSpec::model`, the only `match` listing families.
//! 3. Test it in the module: `model_len` equals the initial parameters' and
//!    the layout's length; a fit from the initial model on a tiny seeded dataset
//!    returns a finite update of that length and replays bit-identically; and an
//!    end-to-end `reference::federate` run if the family has a baseline figure.

pub mod churn;
pub mod churn_lr;
pub mod churn_mlp;
pub mod gbdt;
pub mod itemsets;
pub mod kmeans;
pub mod lr;
pub mod mf;
pub mod mlp;
pub mod noop;
pub mod segments;
pub mod sgd;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::data::standardize::Standardizer;
use crate::data::tabular::TabularDataset;
use crate::federation::update::{Update, WeightLayout};
use crate::itemsets::Basket;
use mf::MfData;
use sgd::SgdParams;

/// What one round tells a model about the local work, besides the global
/// parameters: the optimiser settings, the random streams and the scaling.
#[derive(Debug, Clone, Copy)]
pub struct RoundContext<'a> {
    /// Local optimiser settings (churn families).
    pub sgd: &'a SgdParams,
    /// The run seed; agents derive their streams from it, their id and the round.
    pub seed: u64,
    /// The round this work belongs to.
    pub round: u64,
    /// Global feature scaling agreed in the statistics step, if any.
    pub standardizer: Option<&'a Standardizer>,
    /// The version the run serves so far, if any ([`TaskSpec::best_version`](crate::task::TaskSpec::best_version)).
    pub best_version: Option<u64>,
}

/// One federated model family: the seam `train::run_task` dispatches through.
///
/// Implementations are cheap views of a `task::ModelSpec` (its shape and
/// hyper-parameters); they hold no parameters themselves. The global
/// parameters come in as a flat vector of length [`model_len`](Self::model_len);
/// the family's private state lives in [`LocalData`].
pub trait FederatedModel {
    /// Short name for logs and reports (e.g. `churn-lr`).
    fn name(&self) -> &'static str;

    /// Which local dataset the family trains on; also the key agents use to
    /// advertise their example counts.
    fn data_family(&self) -> &'static str;

    /// Number of federated f32 parameters.
    fn model_len(&self) -> usize;

    /// How summed updates are divided back into a step.
    fn layout(&self) -> WeightLayout {
        WeightLayout::uniform()
    }

    /// Length of a training update: the parameter count, except for an
    /// [`Analysis`] whose update is sized by the task (itemset counts).
    fn update_len(&self) -> usize {
        self.model_len()
    }

    /// The family's [`Analysis`] side when its next version is computed from
    /// the summed updates rather than stepped by a strategy (frequent
    /// itemsets); `None` for trained models.
    fn analysis(&self) -> Option<&dyn Analysis> {
        None
    }

    /// Length of the statistics vector of a `Stats` task (0 if the family
    /// needs no statistics step).
    fn stats_len(&self) -> usize {
        0
    }

    /// Length of the vector an `Evaluate` task returns besides its metrics,
    /// summed across merchants like an update (0: metrics only). The churn
    /// families send per-class score histograms (`metrics::histogram`).
    fn eval_len(&self) -> usize {
        0
    }

    /// Metrics of the whole federation from the sum of the merchants'
    /// evaluation vectors ([`eval_len`](Self::eval_len) values): for churn
    /// the AUC and PR-AUC of the pooled predictions, up to binning. They
    /// replace the weighted means of the same names.
    fn pooled_metrics(&self, _sum: &[f64]) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }

    /// The first global model version, from the run seed.
    fn initial_params(&self, _seed: u64) -> Vec<f32> {
        vec![0.0; self.model_len()]
    }

    /// Local passes over the data per round (the simulator's clock models a
    /// task's duration from it): `sgd.epochs` unless the family has its own.
    fn local_epochs(&self, sgd: &SgdParams) -> usize {
        sgd.epochs
    }

    /// The evaluation metric model selection and early stopping look at,
    /// and whether higher is better: a metric of the agents' validation
    /// slices, never of their test data. `None` when the family reports none.
    fn selection_metric(&self) -> Option<(&'static str, bool)> {
        None
    }

    /// Checks the shape and hyper-parameters once, before any work. Tasks
    /// with an unusable model also fail on their own (with the same error),
    /// so calling this is an early warning, not a requirement.
    fn check(&self) -> Result<(), TrainError> {
        Ok(())
    }

    /// The statistics step: local aggregate statistics (feature sums and
    /// counts for churn), or an empty output if the family needs none.
    fn stats(&self, ctx: &RoundContext<'_>, data: &mut LocalData)
    -> Result<TaskOutput, TrainError>;

    /// Local training starting from `global`: returns the weighted update of
    /// the federated parameters and training metrics, and updates any private
    /// state inside `data`.
    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError>;

    /// Held-out metrics of `global` (with the merchant's private state).
    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError>;

    /// Scores of `global` (with the merchant's private state) on each of the
    /// merchant's held-out examples, in order: the churn probability of each
    /// validation row, or the predicted rating (explicit MF, clipped) or
    /// preference `b_i + p_u·q_i` (implicit MF) of each test interaction.
    /// Makes the same checks as [`evaluate`](Self::evaluate).
    fn score(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError>;
}

/// A federated analysis: a family whose rounds sum exact statistics (counts)
/// and whose next global version is a function of that sum, not a model
/// step. The engine calls [`next_version`](Self::next_version) instead of the
/// strategy, stops when the state is [`complete`](Self::complete), and
/// then hands the final state to the agents (one evaluation task). Under
/// secure aggregation its sums use the statistics step's exact 2^64 ring.
pub trait Analysis {
    /// The next global version from the current one and the round's summed
    /// updates (`sums`, one per update value) and summed weight.
    fn next_version(
        &self,
        global: &[f32],
        sums: &[f64],
        total_weight: f64,
    ) -> Result<Vec<f32>, TrainError>;

    /// True when `global` needs no further round.
    fn complete(&self, global: &[f32]) -> bool;

    /// Whether `global` is a finished model worth evaluating when the run
    /// evaluates (`run.evaluate`): every version of the itemsets, only the
    /// states between two trees for boosting.
    fn checkpoint(&self, _global: &[f32]) -> bool {
        true
    }

    /// The most training rounds the analysis can take, when it knows
    /// (segments: the candidates plus the Lloyd rounds); `run.rounds` must
    /// leave room for them. `None`: `run.rounds` is the cap (itemsets).
    fn max_versions(&self) -> Option<u64> {
        None
    }

    /// The first value of merchant `sender`'s update that cannot be what
    /// the analysis asks for (for counts: a whole number between 0 and the
    /// update's weight, the merchant's number of baskets; for segment
    /// candidates also: only in the sender's own slot), so the engine can
    /// refuse that update and let the round go on. `None` when it is fine.
    fn first_bad_value(&self, sender: &str, update: &Update) -> Option<usize>;
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
    /// Explicit MF diverged: the span of the merchant's training ratings and
    /// the one farthest from their mean, which is where to look (a rating of
    /// 1000 among 0.5–5 stars diverges whatever the learning rate).
    #[error(
        "local training diverged (non-finite parameter): this merchant's training ratings run from {} to {} around a mean of {}, customer `{customer}`'s {} farthest from it; check such ratings, or lower the learning rate",
        short(*.min), short(*.max), short(*.mean), short(*.farthest)
    )]
    DivergedRatings {
        /// Smallest training rating.
        min: f32,
        /// Largest training rating.
        max: f32,
        /// Mean training rating.
        mean: f32,
        /// The customer of the rating farthest from the mean.
        customer: String,
        /// That rating.
        farthest: f32,
    },
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
    /// A closed-form solve (iALS) met normal equations that are not
    /// positive definite or not finite; names the item or user.
    #[error("singular normal equations for {0}: the solve has no unique finite solution")]
    Singular(String),
    /// A train task arrived before the statistics step finished.
    #[error("the task needs feature statistics but carries none")]
    MissingStandardizer,
}

/// A number as a person reads it: `4.5`, `3.412`, `1e30` (not 31 digits).
fn short(v: f32) -> String {
    if v.is_finite() && v.abs() < 1e6 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{v:.3e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let m = mantissa.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{exp}")
            }
            None => s,
        }
    }
}

impl TrainError {
    /// What an agent may tell the coordinator about this failure: a fixed
    /// text per kind, without the values, user or item names the full
    /// message carries (a singular solve names a user). A divergence
    /// starts with "local training diverged", which the coordinator reads
    /// to name a round's cause when every merchant's training diverged.
    pub fn public_reason(&self) -> &'static str {
        match self {
            Self::NoData(_) => "the merchant has no data of the task's family",
            Self::ModelLength { .. } => "the global model does not have the task's length",
            Self::FeatureWidth { .. } => "the local features do not have the model's width",
            Self::Diverged | Self::DivergedRatings { .. } => {
                "local training diverged (non-finite parameter)"
            }
            Self::ItemOutOfRange { .. } => "a local item is outside the model's catalogue",
            Self::InvalidModel(_) => "invalid model",
            Self::Privacy(_) => "the update could not be put in its differentially private form",
            Self::Singular(_) => "singular normal equations in a closed-form solve",
            Self::MissingStandardizer => "the task needs feature statistics but carries none",
        }
    }
}

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
    /// Baskets (one per order, items as catalogue indices), if the merchant
    /// takes part in frequent-itemset tasks.
    pub baskets: Option<Vec<Basket>>,
}

/// The result of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutput {
    /// The update to send (None for evaluation tasks).
    pub update: Option<Update>,
    /// Local metrics (training loss, or held-out metrics).
    pub metrics: BTreeMap<String, f64>,
    /// Example weight of the update and of every metric but the validation
    /// ones: the training rows, or an evaluation's held-out rows.
    pub weight: f64,
    /// The validation rows the validation metrics (`val_*`,
    /// [`metrics::is_validation`](crate::metrics::is_validation)) are means
    /// over, their weight when the federation pools them; 0 without them.
    pub validation_weight: f64,
}

impl TaskOutput {
    /// The weights this output's metrics pool with
    /// ([`PooledMean`](crate::metrics::PooledMean)).
    pub fn figure_weights(&self) -> crate::metrics::FigureWeights {
        crate::metrics::FigureWeights {
            examples: self.weight,
            validation: self.validation_weight,
        }
    }

    /// Adds this output's update values into `sum` (an evaluation's summable
    /// vector, whose total gives the metrics that do not average, AUC and
    /// PR-AUC: `ModelSpec::pooled_metrics`); nothing without an update.
    pub fn add_values_to(&self, sum: &mut [f64]) {
        if let Some(u) = &self.update {
            for (s, &v) in sum.iter_mut().zip(&u.values) {
                *s += f64::from(v);
            }
        }
    }
}

impl LocalData {
    /// Example counts per data family, as advertised when joining.
    pub fn examples(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(c) = &self.churn {
            out.insert("churn".into(), c.train.len() as u64);
        }
        if let Some(b) = &self.baskets {
            out.insert("baskets".into(), b.len() as u64);
        }
        if let Some(m) = &self.mf {
            out.insert("mf".into(), m.train.len() as u64);
        }
        out
    }

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
        let baskets: Vec<Basket> = parts
            .iter()
            .filter_map(|p| p.baskets.as_ref())
            .flatten()
            .cloned()
            .collect();
        LocalData {
            merchant_id: merchant_id.to_string(),
            churn,
            mf,
            baskets: parts.iter().any(|p| p.baskets.is_some()).then_some(baskets),
        }
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

#[cfg(test)]
mod tests;
