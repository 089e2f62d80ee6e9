//! What a round asks of an agent: the task kind, the model family and its
//! hyper-parameters. Serialised as JSON inside the `TaskAssignment` message,
//! and built directly by the simulator.

use serde::{Deserialize, Serialize};

use crate::data::standardize::Standardizer;
use crate::federation::update::WeightLayout;
use crate::model::churn_lr::ChurnLr;
use crate::model::churn_mlp::ChurnMlp;
use crate::model::gbdt::{ChurnGbdt, GbdtParams};
use crate::model::itemsets::Itemsets;
use crate::model::kmeans::KMeans;
use crate::model::lr::SgdParams;
use crate::model::mf::{MfHyper, MfShape};
use crate::model::noop::Noop;
use crate::model::segments::{Exchange, Segments};
use crate::model::{FederatedModel, RoundContext, TrainError};
use crate::privacy::dp::DpTask;

pub use crate::kind::TaskKind;

/// The model family being federated, with its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum ModelSpec {
    /// Logistic regression for churn on `num_features` encoded features.
    ChurnLr {
        /// Encoded feature count (see `tabular::Schema::num_features`).
        num_features: usize,
        /// Share of each merchant's training rows kept aside as its
        /// validation slice (`val_auc`, model selection and early stopping);
        /// 0 keeps none.
        #[serde(default = "default_valid_fraction")]
        valid_fraction: f64,
    },
    /// No model: agents return a seeded random update of `dim` values without
    /// training. Used to measure the coordinator's and transport's overhead.
    Noop {
        /// Update length.
        dim: usize,
    },
    /// Explicit-feedback matrix factorisation (ratings, RMSE); see `mf`.
    Mf {
        /// Catalogue size.
        num_items: usize,
        /// Latent factors k.
        factors: usize,
        /// Local training hyper-parameters: the keys a configuration
        /// gives over [`MfHyper::explicit`].
        #[serde(
            default = "MfHyper::explicit",
            deserialize_with = "crate::model::mf::explicit_hyper"
        )]
        hyper: MfHyper,
    },
    /// Implicit-feedback matrix factorisation (purchases, BPR, HR@10/NDCG@10).
    MfImplicit {
        /// Catalogue size.
        num_items: usize,
        /// Latent factors k.
        factors: usize,
        /// Local training hyper-parameters: the keys a configuration
        /// gives over the defaults of its `algorithm` ([`MfHyper::implicit`]).
        #[serde(
            default = "MfHyper::bpr",
            deserialize_with = "crate::model::mf::implicit_hyper"
        )]
        hyper: MfHyper,
    },
    /// A ReLU multi-layer perceptron for churn (see `mlp`): federated
    /// parameters are all weights and biases, flat, divided uniformly.
    ChurnMlp {
        /// Encoded feature count.
        num_features: usize,
        /// Hidden layer widths (one or two layers in practice).
        hidden: Vec<usize>,
        /// Share of each merchant's training rows kept aside as its
        /// validation slice, as for `ChurnLr`.
        #[serde(default = "default_valid_fraction")]
        valid_fraction: f64,
    },
    /// Federated k-means segmentation on `num_features` standardised
    /// features (see `model::kmeans`): the parameters are the k centres.
    KMeans {
        /// Number of segments.
        k: usize,
        /// Feature width.
        num_features: usize,
        /// The first centres agreed from the merchants' candidates (`k · d`).
        #[serde(default)]
        init: Vec<f32>,
    },
    /// Gradient-boosted trees for churn (see `model::gbdt`): the global
    /// "model" is the encoded ensemble, each round one tree level.
    ChurnGbdt {
        /// Encoded feature count.
        num_features: usize,
        /// Boosting hyper-parameters.
        #[serde(default)]
        params: GbdtParams,
        /// Length of a task's update (the sketch or the current level's
        /// histograms): set by the coordinator for each task
        /// ([`ModelSpec::for_task`]).
        #[serde(default)]
        level_len: usize,
    },
    /// Customer segmentation, the whole pipeline as rounds (see
    /// `model::segments`): candidate initialisation, the choice of k among
    /// `ks` by the federated inertia elbow, and the chosen k's Lloyd
    /// rounds. The global "model" is the encoded pipeline state.
    Segments {
        /// Feature width.
        num_features: usize,
        /// The candidate k, increasing; one k skips the choice.
        ks: Vec<usize>,
        /// Lloyd rounds of every candidate k before their inertias are
        /// compared.
        #[serde(default = "default_choose_rounds")]
        choose_rounds: usize,
        /// Lloyd updates of the chosen k in all (at least the choice's);
        /// fewer once a round no longer moves a centre.
        lloyd_rounds: usize,
        /// This task's exchange: set by the coordinator for each task
        /// ([`ModelSpec::for_task`]).
        #[serde(default)]
        exchange: Exchange,
    },
    /// Federated frequent itemsets (level-wise Apriori, see
    /// `model::itemsets`): the global "model" is the encoded Apriori state.
    Itemsets {
        /// Catalogue size.
        num_items: usize,
        /// Minimum support in baskets across the federation.
        min_count: u64,
        /// Candidates of the level a task counts (its update length): set
        /// by the coordinator for each task ([`ModelSpec::for_task`]).
        #[serde(default)]
        candidates: usize,
    },
}

impl ModelSpec {
    /// Churn logistic regression on `num_features` features, with the
    /// default validation slice.
    pub fn churn_lr(num_features: usize) -> Self {
        ModelSpec::ChurnLr {
            num_features,
            valid_fraction: default_valid_fraction(),
        }
    }

    /// The churn MLP with `hidden` layer widths, with the default
    /// validation slice.
    pub fn churn_mlp(num_features: usize, hidden: Vec<usize>) -> Self {
        ModelSpec::ChurnMlp {
            num_features,
            hidden,
            valid_fraction: default_valid_fraction(),
        }
    }

    /// The family's implementation of [`FederatedModel`]: the one place that
    /// lists the families (adding one is a variant above plus an arm here).
    pub fn model(&self) -> Box<dyn FederatedModel + '_> {
        match self {
            ModelSpec::ChurnLr {
                num_features,
                valid_fraction,
            } => Box::new(ChurnLr {
                num_features: *num_features,
                valid_fraction: *valid_fraction,
            }),
            ModelSpec::Noop { dim } => Box::new(Noop { dim: *dim }),
            ModelSpec::Mf { .. } | ModelSpec::MfImplicit { .. } => {
                Box::new(self.mf_shape().expect("an MF spec has an MF shape"))
            }
            ModelSpec::ChurnMlp {
                num_features,
                hidden,
                valid_fraction,
            } => Box::new(ChurnMlp {
                num_features: *num_features,
                hidden,
                valid_fraction: *valid_fraction,
            }),
            ModelSpec::KMeans {
                k,
                num_features,
                init,
            } => Box::new(KMeans {
                k: *k,
                num_features: *num_features,
                init,
            }),
            ModelSpec::ChurnGbdt {
                num_features,
                params,
                level_len,
            } => Box::new(ChurnGbdt {
                num_features: *num_features,
                params,
                level_len: *level_len,
            }),
            ModelSpec::Segments {
                num_features,
                ks,
                choose_rounds,
                lloyd_rounds,
                exchange,
            } => Box::new(Segments {
                num_features: *num_features,
                ks,
                choose_rounds: *choose_rounds,
                lloyd_rounds: *lloyd_rounds,
                exchange,
            }),
            ModelSpec::Itemsets {
                num_items,
                min_count,
                candidates,
            } => Box::new(Itemsets {
                num_items: *num_items,
                min_count: *min_count,
                candidates: *candidates,
            }),
        }
    }

    /// The spec of a task on global version `global` for the `selected`
    /// merchants (sorted): the same, except that an itemsets task carries
    /// the number of candidates of the state's current level (its update
    /// length), and a segments task its exchange (the phase and chosen k of
    /// the state and, for the candidate exchange, the selected merchants,
    /// one slot each). Fails on a state whose header does not decode.
    pub fn for_task(&self, global: &[f32], selected: &[String]) -> Result<ModelSpec, TrainError> {
        match self {
            ModelSpec::Segments {
                num_features,
                ks,
                choose_rounds,
                lloyd_rounds,
                ..
            } => {
                let (phase, chosen) = crate::model::segments::Segmentation::header(global)?;
                let slots = if phase == crate::model::segments::Phase::Candidates {
                    selected.to_vec()
                } else {
                    Vec::new()
                };
                Ok(ModelSpec::Segments {
                    num_features: *num_features,
                    ks: ks.clone(),
                    choose_rounds: *choose_rounds,
                    lloyd_rounds: *lloyd_rounds,
                    exchange: Exchange {
                        phase,
                        chosen,
                        slots,
                    },
                })
            }
            ModelSpec::Itemsets {
                num_items,
                min_count,
                ..
            } => {
                let (_, candidates) = crate::itemsets::Apriori::header(global)
                    .map_err(|e| TrainError::InvalidModel(e.to_string()))?;
                Ok(ModelSpec::Itemsets {
                    num_items: *num_items,
                    min_count: *min_count,
                    candidates,
                })
            }
            ModelSpec::ChurnGbdt {
                num_features,
                params,
                ..
            } => Ok(ModelSpec::ChurnGbdt {
                num_features: *num_features,
                params: params.clone(),
                level_len: crate::model::gbdt::level_len(global)
                    .map_err(|e| TrainError::InvalidModel(e.to_string()))?,
            }),
            other => Ok(other.clone()),
        }
    }

    /// True for an analysis (see [`crate::model::Analysis`]): its rounds sum
    /// exact counts and its versions are states, not trained parameters.
    pub fn is_analysis(&self) -> bool {
        self.model().analysis().is_some()
    }

    /// Coordinates that hold a statistic of the merchants' data rather than
    /// a learned weight, whose update is `value − base` (explicit MF's global
    /// mean μ). An update computed on an older version must be taken against
    /// the version it is applied to (FedBuff), or each stale update adds the
    /// whole statistic again.
    pub fn statistic_coordinates(&self) -> &'static [usize] {
        match self {
            ModelSpec::Mf { .. } => &[crate::model::mf::MU],
            _ => &[],
        }
    }

    /// The matrix-factorisation shape of an `Mf` or `MfImplicit` spec (what
    /// the recommender needs to score items), `None` for other families.
    pub fn mf_shape(&self) -> Option<MfShape<'_>> {
        match self {
            ModelSpec::Mf {
                num_items,
                factors,
                hyper,
            }
            | ModelSpec::MfImplicit {
                num_items,
                factors,
                hyper,
            } => Some(MfShape {
                num_items: *num_items,
                k: *factors,
                implicit: matches!(self, ModelSpec::MfImplicit { .. }),
                hyper,
            }),
            _ => None,
        }
    }

    /// Which local dataset the family trains on; also the key agents use to
    /// advertise their example counts.
    pub fn data_family(&self) -> &'static str {
        self.model().data_family()
    }

    /// The key under which an agent keeps this model's latest global version
    /// in its local state: the data family, except for analyses that share a
    /// family's data without replacing its model (k-means segments on the
    /// churn features must not overwrite the churn model).
    pub fn state_key(&self) -> &'static str {
        match self {
            ModelSpec::KMeans { .. } | ModelSpec::Segments { .. } => "segments",
            ModelSpec::Itemsets { .. } => "itemsets",
            other => other.data_family(),
        }
    }

    /// Short name for logs and reports.
    pub fn name(&self) -> &'static str {
        self.model().name()
    }

    /// Whether local training adds FedProx's proximal term `μ/2 ‖w − w_g‖²`
    /// (`SgdParams::prox_mu`): the gradient-trained churn models do; MF's
    /// solvers, the trees and the analyses do not, so a FedProx strategy
    /// there would be FedAvg under another name.
    pub fn takes_proximal_term(&self) -> bool {
        matches!(self, ModelSpec::ChurnLr { .. } | ModelSpec::ChurnMlp { .. })
    }

    /// The validation metric model selection looks at, and whether higher
    /// is better (see `FederatedModel::selection_metric`).
    pub fn selection_metric(&self) -> Option<(&'static str, bool)> {
        self.model().selection_metric()
    }

    /// Number of federated f32 parameters.
    pub fn model_len(&self) -> usize {
        self.model().model_len()
    }

    /// How summed updates are divided back into a step.
    pub fn layout(&self) -> WeightLayout {
        self.model().layout()
    }

    /// Length of the statistics vector of a `Stats` task (0 if the family
    /// needs no statistics step).
    pub fn stats_len(&self) -> usize {
        self.model().stats_len()
    }

    /// Length of an `Evaluate` task's summable vector (see
    /// [`FederatedModel::eval_len`]).
    pub fn eval_len(&self) -> usize {
        self.model().eval_len()
    }

    /// The federation's metrics from the summed evaluation vectors (see
    /// [`FederatedModel::pooled_metrics`]).
    pub fn pooled_metrics(&self, sum: &[f64]) -> std::collections::BTreeMap<String, f64> {
        self.model().pooled_metrics(sum)
    }

    /// The first global model version: zeros for LR; He-initialised weights
    /// drawn from the run seed for the MLP (zeros would never break symmetry);
    /// small seeded random item factors for MF.
    pub fn initial_params(&self, seed: u64) -> Vec<f32> {
        self.model().initial_params(seed)
    }

    /// Checks the shape and hyper-parameters once (see [`FederatedModel::check`]).
    pub fn check(&self) -> Result<(), TrainError> {
        self.model().check()
    }
}

fn default_valid_fraction() -> f64 {
    crate::model::churn::DEFAULT_VALID_FRACTION
}

fn default_choose_rounds() -> usize {
    crate::model::segments::DEFAULT_CHOOSE_ROUNDS
}

/// Everything an agent needs to carry out one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Stats, train or evaluate.
    pub kind: TaskKind,
    /// The model family and shape.
    pub model: ModelSpec,
    /// Local optimiser settings.
    pub sgd: SgdParams,
    /// The run seed; agents derive their own streams from it, their id and
    /// the round, so a run replays exactly.
    pub seed: u64,
    /// The round this task belongs to.
    pub round: u64,
    /// Global feature scaling agreed in the statistics step, if any.
    #[serde(default)]
    pub standardizer: Option<Standardizer>,
    /// Differential privacy of a training task: the clip norm (and, in
    /// distributed mode, the agent's noise). `run_task` clips accordingly.
    #[serde(default)]
    pub dp: Option<DpTask>,
    /// An evaluation's view of model selection: the version the run serves
    /// so far (its best by the federated validation metric), if any. An MF
    /// agent keeps the user side it evaluated that version with however
    /// many versions follow, so the final serving task can pair the best
    /// version with its own users (`mf::UserState::pair_with_version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_version: Option<u64>,
}

impl TaskSpec {
    /// What the model needs to know about this round besides the global parameters.
    pub fn context(&self) -> RoundContext<'_> {
        RoundContext {
            sgd: &self.sgd,
            seed: self.seed,
            round: self.round,
            standardizer: self.standardizer.as_ref(),
            best_version: self.best_version,
        }
    }

    /// Length of the update vector this task produces.
    pub fn update_len(&self) -> usize {
        match self.kind {
            TaskKind::Stats => self.model.stats_len(),
            TaskKind::Train => {
                self.model.model().update_len() + self.dp.as_ref().map_or(0, DpTask::extra_len)
            }
            TaskKind::Evaluate => self.model.eval_len(),
        }
    }

    /// Weight layout of this task's update.
    pub fn update_layout(&self) -> WeightLayout {
        match self.kind {
            TaskKind::Train => match &self.dp {
                Some(dp) => dp.layout(self.model.layout()),
                None => self.model.layout(),
            },
            TaskKind::Stats | TaskKind::Evaluate => WeightLayout::uniform(),
        }
    }
}
