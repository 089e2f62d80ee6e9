//! Customer segmentation as ordinary federated tasks: the whole k-means
//! pipeline of [`kmeans`] — candidate initialisation, the choice of k and
//! the Lloyd rounds — as an [`Analysis`] whose rounds the engine runs over
//! either transport, like the frequent itemsets of [`super::itemsets`].
//!
//! The "global model" is the encoded [`Segmentation`] state (the phase, the
//! candidate k, the chosen k, the inertia curve and the centres of every k);
//! its length never changes. After the engine's statistics step (the
//! federation's feature means and deviations, as for churn), each training
//! round is one exchange, and [`Analysis::next_version`] computes the next
//! state from the summed answers:
//!
//! 1. **Candidates** (one round). Each merchant runs k-means++ and Lloyd on
//!    its own standardised customers and, for every candidate k, proposes
//!    the means and sizes of `3 · k` local clusters
//!    ([`kmeans::local_candidates`]); a cluster of fewer than
//!    [`kmeans::MIN_CANDIDATE_SIZE`] customers is not proposed, so every
//!    candidate is the mean of at least that many customers, never one
//!    customer's row. The task names the selected merchants (sorted), and
//!    each writes its proposals into its own slot of the update, zeros
//!    elsewhere: the sum is the concatenation of everyone's candidates,
//!    which the coordinator clusters ([`kmeans::centres_from_candidates`],
//!    weighted k-means++ and Lloyd, best of ten seeds by the run seed).
//! 2. **Choice of k** (when several k are tried). `choose_rounds` Lloyd
//!    rounds for every k at once — per k and cluster the sum of the
//!    merchant's customers, their count and its inertia against the current
//!    centres — then one more whose summed inertias, measured at the centres
//!    after `choose_rounds` updates, form the curve whose elbow
//!    ([`kmeans::elbow`]) is k.
//! 3. **Lloyd rounds** of the chosen k, continuing from its centres, until
//!    `lloyd_rounds` updates in all (at least those of the choice) or a
//!    round that no longer moves the centres (by more than
//!    [`state::CONVERGED_SHIFT`], which is above the secure ring's
//!    quantisation, so both paths stop at the same round). The engine then hands the final
//!    state to every agent (one evaluation task); `fedcart-client segments`
//!    labels the merchant's customers with it.
//!
//! # What leaves a merchant
//!
//! Lloyd answers are sums and counts, hidden by secure aggregation like
//! any update (summed in the statistics step's 2^64 ring, quantised at
//! about 4·10⁻⁶·n per value for n merchants, counts exact). The candidate
//! answer is a sum too, but of disjoint slots: **secure aggregation does
//! not hide candidates** — the sum reveals every merchant's local cluster
//! means and sizes, i.e. a coarse picture of its customer distribution (how
//! many customers of which broad RFM profile), never a row of fewer than
//! [`kmeans::MIN_CANDIDATE_SIZE`] customers. The candidate task also tells
//! every selected merchant who else was selected (the slot list). Each
//! merchant's number of customers travels in the clear, as in every family.

pub mod state;

use std::collections::BTreeMap;

use ndarray::Array2;

use super::kmeans::{self, MIN_CANDIDATE_SIZE};
use super::{Analysis, FederatedModel, LocalData, RoundContext, TaskOutput, TrainError};
use crate::federation::update::Update;
pub use state::{Phase, Segmentation};

/// The k tried when none is given: 2 to 8.
pub const DEFAULT_KS: std::ops::RangeInclusive<usize> = 2..=8;
/// Lloyd rounds of every candidate k before their inertias are compared.
pub const DEFAULT_CHOOSE_ROUNDS: usize = 10;
/// Largest k (the state encodes k and counts exactly as f32).
pub const MAX_K: usize = 256;

/// What the coordinator tells the agents about the exchange of one task
/// (set per task from the state, `task::ModelSpec::for_task`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exchange {
    /// The state's phase.
    pub phase: Phase,
    /// The chosen k (0 before the choice).
    pub chosen: usize,
    /// The candidate exchange's merchants, sorted: merchant i writes its
    /// proposals into slot i. Empty for the other exchanges.
    #[serde(default)]
    pub slots: Vec<String>,
}

/// The segmentation pipeline on `num_features` standardised features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segments<'a> {
    /// Feature width (the RFM features of the orders pipeline).
    pub num_features: usize,
    /// The candidate k, increasing; one k skips the choice.
    pub ks: &'a [usize],
    /// Lloyd rounds before the k are compared.
    pub choose_rounds: usize,
    /// Lloyd updates of the chosen k in all (fewer once converged).
    pub lloyd_rounds: usize,
    /// This task's exchange.
    pub exchange: &'a Exchange,
}

impl Segments<'_> {
    /// The largest number of versions (training rounds) the pipeline needs:
    /// the candidates, then the Lloyd updates of the chosen k (at least the
    /// choice's `choose_rounds + 1` when several k are tried).
    pub fn max_versions(&self) -> u64 {
        let lloyd = if self.ks.len() > 1 {
            self.lloyd_rounds.max(self.choose_rounds + 1)
        } else {
            self.lloyd_rounds
        };
        1 + lloyd as u64
    }

    fn decode(&self, global: &[f32]) -> Result<Segmentation, TrainError> {
        Segmentation::decode(global, self.num_features, self.ks)
    }

    /// The state, checked to be at this task's exchange.
    fn state(&self, global: &[f32]) -> Result<Segmentation, TrainError> {
        let s = self.decode(global)?;
        if s.phase != self.exchange.phase || s.chosen != self.exchange.chosen {
            return Err(TrainError::InvalidModel(format!(
                "the task is for the {:?} exchange (k = {}), the state is at {:?} (k = {})",
                self.exchange.phase, self.exchange.chosen, s.phase, s.chosen
            )));
        }
        Ok(s)
    }

    fn rows(&self, ctx: &RoundContext<'_>, data: &LocalData) -> Result<Array2<f32>, TrainError> {
        let scaler = ctx.standardizer.ok_or(TrainError::MissingStandardizer)?;
        kmeans::standardised_rows(data, self.num_features, scaler)
    }

    fn candidates(&self, x: &Array2<f32>, ctx: &RoundContext<'_>, id: &str) -> Update {
        let d = self.num_features;
        let slot = state::slot_len(self.ks, d);
        let mut values = vec![0.0f32; self.exchange.slots.len() * slot];
        let own = self
            .exchange
            .slots
            .iter()
            .position(|s| s == id)
            .expect("checked by fit");
        for &k in self.ks {
            let m = state::CANDIDATES_PER_SEGMENT * k;
            let base = own * slot + state::slot_offset(self.ks, d, k);
            // The same stream for every k, as the in-process initialisation.
            let mut rng = crate::seed::rng(ctx.seed, &["kmeans-candidates", id]);
            let (means, sizes) = kmeans::local_candidates(x, m, &mut rng);
            values[base..base + means.len()].copy_from_slice(&means);
            for (c, s) in sizes.iter().enumerate() {
                values[base + m * d + c] = *s as f32;
            }
        }
        Update {
            values,
            coord_weights: Vec::new(),
            weight: x.nrows() as f64,
        }
    }
}

impl FederatedModel for Segments<'_> {
    fn name(&self) -> &'static str {
        "segments"
    }

    fn data_family(&self) -> &'static str {
        "churn"
    }

    fn model_len(&self) -> usize {
        Segmentation::encoded_len(self.num_features, self.ks)
    }

    fn update_len(&self) -> usize {
        state::exchange_len(
            self.exchange.phase,
            self.exchange.chosen,
            self.ks,
            self.num_features,
            self.exchange.slots.len(),
        )
    }

    fn analysis(&self) -> Option<&dyn Analysis> {
        Some(self)
    }

    fn stats_len(&self) -> usize {
        2 * self.num_features
    }

    fn initial_params(&self, seed: u64) -> Vec<f32> {
        Segmentation::new(self.num_features, self.ks, seed).encode()
    }

    fn local_epochs(&self, _sgd: &super::sgd::SgdParams) -> usize {
        1
    }

    fn check(&self) -> Result<(), TrainError> {
        if self.num_features == 0 || self.ks.is_empty() {
            return Err(TrainError::InvalidModel(
                "segments need at least one feature and one k".into(),
            ));
        }
        if self.ks.iter().any(|&k| k == 0 || k > MAX_K) || self.ks.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(TrainError::InvalidModel(format!(
                "segments need increasing k in 1..={MAX_K}, not {:?}",
                self.ks
            )));
        }
        Ok(())
    }

    /// The feature sums and squares of the merchant's customers, as
    /// k-means's statistics step.
    fn stats(
        &self,
        ctx: &RoundContext<'_>,
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let km = kmeans::KMeans {
            k: 1,
            num_features: self.num_features,
            init: &[],
        };
        km.stats(ctx, data)
    }

    fn fit(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        self.check()?;
        let state = self.state(global)?;
        let x = self.rows(ctx, data)?;
        let n = x.nrows() as f64;
        let mut metrics = BTreeMap::new();
        let update = match state.phase {
            Phase::Candidates => {
                if !self.exchange.slots.contains(&data.merchant_id) {
                    return Err(TrainError::InvalidModel(format!(
                        "merchant {} has no slot in the candidate exchange",
                        data.merchant_id
                    )));
                }
                self.candidates(&x, ctx, &data.merchant_id)
            }
            Phase::Choose | Phase::Lloyd => {
                let active = state.active();
                let mut values = Vec::with_capacity(self.update_len());
                for &k in &active {
                    let centres = state.centres_of(k).expect("active k is a candidate");
                    let step = kmeans::lloyd_step(&x, centres, k);
                    values.extend(step.sums.iter().map(|&v| v as f32));
                    values.extend(step.counts.iter().map(|&c| c as f32));
                    values.push(step.inertia as f32);
                    let name = if active.len() == 1 {
                        "inertia".to_string()
                    } else {
                        format!("inertia_k{k}")
                    };
                    metrics.insert(name, step.inertia / n.max(1.0));
                }
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(TrainError::Diverged);
                }
                Update {
                    values,
                    coord_weights: Vec::new(),
                    weight: n,
                }
            }
            Phase::Done => {
                return Err(TrainError::InvalidModel(
                    "the segmentation is finished; nothing to train".into(),
                ));
            }
        };
        Ok(TaskOutput {
            update: Some(update),
            metrics,
            weight: n,
            validation_weight: 0.0,
        })
    }

    /// The chosen centres' inertia per customer (none before the choice).
    fn evaluate(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<TaskOutput, TrainError> {
        let state = self.decode(global)?;
        let x = self.rows(ctx, data)?;
        let n = x.nrows() as f64;
        let mut metrics = BTreeMap::new();
        if let Some((k, centres)) = state.chosen_centres() {
            metrics.insert(
                "inertia".to_string(),
                kmeans::inertia(&x, centres, k) / n.max(1.0),
            );
        }
        Ok(TaskOutput {
            update: None,
            metrics,
            weight: n,
            validation_weight: 0.0,
        })
    }

    /// The segment (0..k, as f32) of each of the merchant's customers,
    /// training rows then held-out rows, once k is chosen.
    fn score(
        &self,
        ctx: &RoundContext<'_>,
        global: &[f32],
        data: &mut LocalData,
    ) -> Result<Vec<f32>, TrainError> {
        let state = self.decode(global)?;
        let x = self.rows(ctx, data)?;
        let (k, centres) = state
            .chosen_centres()
            .ok_or_else(|| TrainError::InvalidModel("no k chosen yet".into()))?;
        Ok(kmeans::assign(&x, centres, k)
            .into_iter()
            .map(|(c, _)| c as f32)
            .collect())
    }
}

impl Analysis for Segments<'_> {
    fn next_version(
        &self,
        global: &[f32],
        sums: &[f64],
        _total_weight: f64,
    ) -> Result<Vec<f32>, TrainError> {
        let mut state = self.state(global)?;
        state.on_sum(
            sums,
            self.exchange.slots.len(),
            self.choose_rounds,
            self.lloyd_rounds,
        )?;
        Ok(state.encode())
    }

    fn max_versions(&self) -> Option<u64> {
        Some(Segments::max_versions(self))
    }

    fn complete(&self, global: &[f32]) -> bool {
        Segmentation::header(global).is_ok_and(|(phase, _)| phase == Phase::Done)
    }

    /// Counts (candidate sizes, cluster counts) must be whole numbers up to
    /// the merchant's customers, a candidate must hold at least
    /// [`MIN_CANDIDATE_SIZE`] of them, inertias must be non-negative, and a
    /// candidate answer may fill the sender's own slot only (a merchant
    /// cannot propose in another's name). Under secure aggregation none of
    /// this can be checked per merchant: a malicious merchant can add into
    /// others' slots, as it can move any summed value.
    fn first_bad_value(&self, sender: &str, update: &Update) -> Option<usize> {
        let d = self.num_features;
        let count_ok =
            |v: f32| v.is_finite() && v >= 0.0 && v.fract() == 0.0 && f64::from(v) <= update.weight;
        let v = &update.values;
        match self.exchange.phase {
            Phase::Candidates => {
                let slot = state::slot_len(self.ks, d);
                let own = self.exchange.slots.iter().position(|s| s == sender);
                for s in 0..self.exchange.slots.len() {
                    for &k in self.ks {
                        let m = state::CANDIDATES_PER_SEGMENT * k;
                        let base = s * slot + state::slot_offset(self.ks, d, k);
                        for c in 0..m {
                            let i = base + m * d + c;
                            let size = *v.get(i)?;
                            if !count_ok(size) || (size > 0.0 && size < MIN_CANDIDATE_SIZE as f32) {
                                return Some(i);
                            }
                            if size > 0.0 && own != Some(s) {
                                return Some(i);
                            }
                        }
                    }
                }
                None
            }
            Phase::Choose | Phase::Lloyd => {
                let mut at = 0;
                for k in state::active_ks(self.exchange.phase, self.exchange.chosen, self.ks) {
                    if let Some(c) = (at + k * d..at + k * d + k)
                        .find(|&i| !v.get(i).is_some_and(|&c| count_ok(c)))
                    {
                        return Some(c);
                    }
                    let inertia = at + k * d + k;
                    if !v.get(inertia).is_some_and(|&x| x.is_finite() && x >= 0.0) {
                        return Some(inertia);
                    }
                    at += k * d + k + 1;
                }
                None
            }
            Phase::Done => Some(0),
        }
    }
}

#[cfg(test)]
mod tests;
